"""`dreamcore serve`: serve a checkpoint on Ray Serve until interrupted.

Runs on the Ray it finds (RAY_ADDRESS, or a cluster started with `ray start`) or starts a local
one. Configuration is the ServeConfig tree (pipelines/serve/config.py): `--config FILE` then
`--set key=value`, then the flags below.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from dreamcore.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="folder written by save_pretrained (or training)")
    p.add_argument("--config", help="ServeConfig YAML (deployment sizes, limits, auth)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; without an API key always 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set decoder.autoscaling.max_replicas=2 (repeatable)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.serve import load_serve_config, shutdown, start_local

    try:
        cfg = load_serve_config(args.config, args.set, checkpoint=args.checkpoint, host=args.host, port=args.port)
        url = start_local(config=cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dreamcore serving {cfg.checkpoint} at {url} (API docs: {url}/docs); Ctrl-C stops", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    shutdown()
    return 0
