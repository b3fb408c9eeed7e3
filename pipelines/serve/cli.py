"""`dreamcore serve`: serve a checkpoint on Ray Serve until interrupted.

Runs on the Ray it finds (RAY_ADDRESS, or a cluster started with `ray start`) or starts a local
one. Configuration is the ServeConfig tree (pipelines/serve/config.py): defaults <- `--config FILE`
<- `--set key=value` <- the named flags below.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from dreamcore.config import ConfigError
from pipelines.cli_args import Flag, add_config_arguments, config_from_args
from pipelines.serve.config import ServeConfig

# Named flags: shorthands for one ServeConfig key each, applied after --set.
FLAGS = (
    Flag("--checkpoint", "checkpoint", "folder written by save_pretrained (or training); an s3:// URI is "
         "downloaded once into $DREAMCORE_CACHE_DIR (default ~/.cache/dreamcore)", metavar="DIR"),
    Flag("--host", "host", "HTTP host (default 127.0.0.1; without an API key always 127.0.0.1)"),
    Flag("--port", "port", "HTTP port (default 8000)", type=int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, FLAGS, config_help="ServeConfig YAML (deployment sizes, limits, auth)",
                         set_example="decoder.autoscaling.max_replicas=2")


def load(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of a parsed `dreamcore serve` command line; it must name a checkpoint."""
    cfg = config_from_args(ServeConfig(), args, FLAGS)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint to serve: pass --checkpoint DIR (or set checkpoint in --config)")
    return cfg


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args)
        from pipelines.serve import shutdown, start_local

        url = start_local(config=cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dreamcore serve: {e}", file=sys.stderr)
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
