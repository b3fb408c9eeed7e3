"""`dreamcore curate INPUT... --output DIR [--profile default|embedded] [--model PRESET] [--config FILE]
[--set k=v ...] [--address ADDR]`.

Configuration (pipelines/curate/config.py): the --profile <- --config FILE <- --set <- named flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamcore.config import PRESETS, ConfigError
from pipelines.cli_args import Flag, add_config_arguments, config_from_args

from .config import PRESETS as PROFILES
from .config import CurateConfig

# Named flags: shorthands for one CurateConfig key each, applied after --set.
FLAGS = (
    Flag("--model", "model", "model preset whose layout (sequence length, image tokens, tokenizer) the "
         "data is tokenized for", choices=sorted(PRESETS)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="MMC4 JSONL(.gz) / OBELICS Parquet shards, folders, globs or s3:// gs:// URIs")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="output folder, a local or shared POSIX path (resumes if present)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default",
                        help="curation settings to start from: default (public web) or embedded "
                             "(loopback demo: private addresses allowed, small images accepted)")
    add_config_arguments(parser, FLAGS, config_help="YAML file of CurateConfig fields",
                         set_example="crawl.timeout_s=5")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: the running/local Ray)")


def load(args: argparse.Namespace) -> CurateConfig:
    """The CurateConfig of a parsed `dreamcore curate` command line."""
    return config_from_args(PROFILES[args.profile](), args, FLAGS)


def main(args: argparse.Namespace) -> int:
    from .readers import InputError

    try:
        cfg = load(args)
    except ConfigError as e:
        print(f"dreamcore curate: config error: {e}", file=sys.stderr)
        return 2
    from .job import CurateError, check_output, curate

    try:
        check_output(args.output)  # before any Ray work (curate() checks again for API callers)
        manifest = curate(args.inputs, args.output, cfg, address=args.address)
    except (InputError, CurateError, ConfigError, FileNotFoundError) as e:
        print(f"dreamcore curate: {e}", file=sys.stderr)
        return 2
    summary = {
        "output": args.output,
        "samples": manifest["outputs"]["samples"],
        "files": len(manifest["outputs"]["files"]),
        "documents_in": manifest["stages"]["read"]["in"]["documents"],
        "documents_out": manifest["stages"]["write"]["out"]["documents"],
        "images_in": manifest["stages"]["read"]["in"]["images"],
        "images_out": manifest["stages"]["write"]["out"]["images"],
        "skipped_shards": len(manifest["shards"].get("skipped_on_resume", [])),
    }
    print(json.dumps(summary, indent=2))
    return 0
