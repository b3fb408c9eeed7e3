"""`dreamcore curate INPUT... --output DIR [--config FILE] [--set k=v ...] [--address ADDR]`."""

from __future__ import annotations

import argparse
import json
import sys

from dreamcore.config import ConfigError, load_config

from .config import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="MMC4 JSONL(.gz) / OBELICS Parquet shards, folders, globs or s3:// gs:// URIs")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (resumes if present)")
    parser.add_argument("--config", metavar="FILE", help="YAML file of CurateConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one field, e.g. --set crawl.timeout_s=5 (repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting point: default (public web) or embedded (loopback demo)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: the running/local Ray)")


def main(args: argparse.Namespace) -> int:
    from .readers import InputError

    try:
        cfg = load_config(PRESETS[args.preset](), args.config, args.overrides)
    except ConfigError as e:
        print(f"dreamcore curate: config error: {e}", file=sys.stderr)
        return 2
    from .job import CurateError, curate

    try:
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
