"""The `dreamcore` command. Each verb lives in the module that does the work; this file only routes.

A verb module exposes `add_arguments(parser)` and `main(args) -> int`. Modules are imported only
when their verb runs, so `dreamcore generate` (an HTTP client) never imports Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "run every stage on a local Ray with the embedded default"),
    "curate": ("pipelines.curate.cli", "crawl, filter and tokenize documents into Parquet (Ray Data)"),
    "train": ("pipelines.train_cli", "pretrain on Ray Train + DeepSpeed"),
    "serve": ("pipelines.serve_cli", "serve a checkpoint on Ray Serve (blocks)"),
    "generate": ("dreamcore.client", "ask a served endpoint for an interleaved document, save HTML"),
    "submit": ("pipelines.submit", "submit a stage to a Ray cluster as a job; status, logs, stop"),
}


def _defaults() -> None:
    # Set before Ray or albumentations are imported anywhere below.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if verb in sys.argv[1:2] or "-h" in sys.argv[1:2] or "--help" in sys.argv[1:2]:
            # Only the verb being run (or the top-level help) pays for importing its module.
            if verb in sys.argv[1:2]:
                importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    _defaults()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
