"""`dreamcore train`: pretrain on Ray Train + DeepSpeed over one curated data folder or a weighted mixture.

Examples:
  dreamcore train --data demo-output/data --output runs/tiny --model tiny --set max_steps=300
  dreamcore train --data /nfs/mmc4-tok@0.6 --data /nfs/pairs-tok@0.4 --output /nfs/runs/stage2 ...
  dreamcore train --data /nfs/mmc4-tok --output /nfs/runs/stage2 --model dreamllm-7b --gpu \
      --workers 64 --stage II --set init_from=/nfs/runs/stage1/model --address ray://head:10001
  dreamcore train --data s3://corpus/mmc4-tok --output s3://runs/stage2 ...   (object storage)
Running the same command again with the same --output resumes from its latest checkpoint.
Configuration (pipelines/train/config.py): the --model preset <- --config FILE <- --set <- flags.
"""

from __future__ import annotations

import argparse
import sys

from dreamcore.config import PRESETS, STAGES, ConfigError
from pipelines.cli_args import Flag, add_config_arguments, apply_flags, config_from_args
from pipelines.train.config import TrainConfig, mixture_from_data_args, with_recipe

# Named flags: shorthands for one TrainConfig key each, applied after --set.
FLAGS = (
    Flag("--stage", "model.stage", "training stage: what trains, loss weights", choices=STAGES),
    Flag("--workers", "scaling.workers", "Ray Train workers (one per GPU); 0 = in-process", type=int,
         metavar="N"),
    Flag("--gpu", "scaling.gpu", "one GPU per worker, bf16", const=True),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", metavar="FOLDER[@WEIGHT]",
                        help="curated data folder (Parquet shards, manifest, tokenizer/); repeat it for a "
                             "weighted mixture, e.g. --data mmc4@0.6 --data pairs@0.4 (weights default to 1; "
                             "= --set data.mixture=[{path: FOLDER, weight: WEIGHT}, ...]; needed unless "
                             "--config sets data.mixture)"),
    parser.add_argument("--output", required=True, help="run folder: checkpoints, metrics, model/ export; a local "
                        "folder or an s3://bucket/prefix URI (as --data; see docs/operations.md, Object storage)")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                        help="model preset the configuration starts from (default tiny)")
    add_config_arguments(parser, FLAGS, config_help="YAML file of TrainConfig fields (see pipelines/train/config.py)",
                         set_example="optim.lr=3e-4")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


def load(args: argparse.Namespace) -> TrainConfig:
    """The validated TrainConfig of a parsed `dreamcore train` command line.

    `--data` (repeatable, FOLDER[@WEIGHT]) is applied with the named flags: it replaces data.mixture.
    """
    cfg = with_recipe(args.model, lambda base: config_from_args(base, args, FLAGS))
    cfg = apply_flags(cfg, {"data.mixture": mixture_from_data_args(args.data)}).validate()
    if not cfg.data.mixture:
        raise ConfigError("no training data: give --data FOLDER[@WEIGHT] (repeatable), or data.mixture "
                          "(a list of {path, weight}) in --config")
    return cfg


def main(args: argparse.Namespace) -> int:
    from pipelines.train.job import train

    try:
        cfg = load(args)
        result = train(cfg, None, args.output, address=args.address)
    except ConfigError as e:
        print(f"dreamcore train: {e}", file=sys.stderr)
        return 2
    loss = result.metrics.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, float) else ""
    print(f"trained {result.steps} steps{loss_text}; model exported to {result.export_dir}")
    return 0
