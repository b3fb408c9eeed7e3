"""`dreamcore generate --checkpoint DIR --input prompts.jsonl --output DIR [--config FILE] [--set k=v ...]
[--address ADDR]`: offline batch generation on Ray Data (pipelines/generate/job.py).

Configuration (pipelines/generate/config.py): defaults <- --config FILE <- --set <- named flags.
`dreamcore generate --endpoint URL PROMPT` is the HTTP client of a served endpoint (dreamcore/client.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamcore.config import ConfigError
from pipelines.cli_args import Flag, add_config_arguments, config_from_args

from .config import GenerateConfig

# Named flags: shorthands for one GenerateConfig key each, applied after --set.
FLAGS = (
    Flag("--checkpoint", "checkpoint", "folder written by save_pretrained (or training)", metavar="DIR"),
    Flag("--device", "device", "where the model halves run", choices=("auto", "cpu", "cuda")),
    Flag("--llm-actors", "llm.actors", "LLM actors per text round", type=int, metavar="N"),
    Flag("--decoder-actors", "decoder.actors", "decoder actors per image round", type=int, metavar="N"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="FILE",
                        help='JSONL(.gz), one prompt a line: {"id": ..., "prompt": "text"} or {"id": ..., '
                             '"parts": [...]} plus optional max_new_tokens, max_images, temperature, top_p, '
                             "seed, num_inference_steps, guidance_scale")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="output folder: documents/*.parquet + manifest.json (a rerun resumes)")
    add_config_arguments(parser, FLAGS, config_help="YAML file of GenerateConfig fields",
                         set_example="decoder.batch_size=4")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: the running/local Ray)")


def load(args: argparse.Namespace) -> GenerateConfig:
    """The GenerateConfig of a parsed `dreamcore generate` command line; it must name a checkpoint."""
    cfg = config_from_args(GenerateConfig(), args, FLAGS)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint: pass --checkpoint DIR (or set checkpoint in --config)")
    return cfg


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load(args)
    except ConfigError as e:
        print(f"dreamcore generate: config error: {e}", file=sys.stderr)
        return 2
    from .job import GenerateError, generate

    try:
        manifest = generate(args.input, args.output, cfg, address=args.address)
    except (GenerateError, ConfigError) as e:
        print(f"dreamcore generate: {e}", file=sys.stderr)
        return 2
    runs = manifest["runs"][-1]
    print(json.dumps({"output": args.output, **manifest["counts"], "dropped_by_reason": manifest["dropped_by_reason"],
                      "skipped_on_resume": runs["skipped_on_resume"], "files": len(manifest["files"])}, indent=2))
    return 0
