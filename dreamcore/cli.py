"""The `dreamcore` command. Each verb lives in the module that does the work; this file only routes.

A verb module exposes `add_arguments(parser)` and `main(args) -> int`. Modules are imported only
when their verb runs, so `dreamcore generate --endpoint` (an HTTP client) never imports Ray or torch. The stage
verbs live in `pipelines/<stage>/cli.py` and map their flags onto their config one way
(`pipelines/cli_args.py`: `--config FILE`, `--set KEY=VALUE`, named flags that are shorthands).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "run every stage on a local Ray with the embedded default"),
    "curate": ("pipelines.curate.cli", "crawl, filter and tokenize documents into Parquet (Ray Data)"),
    "train": ("pipelines.train.cli", "pretrain on Ray Train + DeepSpeed"),
    "serve": ("pipelines.serve.cli", "serve a checkpoint on Ray Serve (blocks)"),
    "generate": ("pipelines.generate.cli", "generate documents from a JSONL of prompts on Ray Data (--checkpoint), "
                 "or ask a served endpoint for one (--endpoint URL PROMPT, saves HTML)"),
    "evaluate": ("pipelines.evaluate", "CLIP score and FID of a checkpoint's images, with models given by path"),
    "submit": ("pipelines.submit", "submit a stage to a Ray cluster as a job; status, logs, stop"),
}
# A verb with two forms: given this flag, `dreamcore generate` is the HTTP client of a served endpoint.
ALTERNATE: dict[str, tuple[str, str]] = {"generate": ("--endpoint", "dreamcore.client")}


def _module_of(verb: str, argv: list[str]) -> str:
    flag, module = ALTERNATE.get(verb, ("", ""))
    if flag and argv[:1] == [verb] and any(a == flag or a.startswith(flag + "=") for a in argv[1:]):
        return module
    return VERBS[verb][0]


def _defaults() -> None:
    # Set before Ray or albumentations are imported anywhere below.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. Only the verb named first in `argv` (default: sys.argv) imports its
    module and declares its arguments; the others appear in `dreamcore --help` by name."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dreamcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_, help_text) in VERBS.items():
        module = _module_of(verb, argv)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv[:1] == [verb]:
            importlib.import_module(module).add_arguments(p)
            parser.set_defaults(_verb_parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    _defaults()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the verb's parser (its usage, `dreamcore train: error: ...`), exit 2
        getattr(args, "_verb_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
