"""`dreamcore train`: pretrain on Ray Train + DeepSpeed over a curated data folder.

Examples:
  dreamcore train --data demo-output/data --output runs/tiny --model tiny --set max_steps=300
  dreamcore train --data /nfs/mmc4-tok --output /nfs/runs/stage2 --model dreamllm-7b --gpu \
      --workers 64 --stage II --set init_from=/nfs/runs/stage1/model --address ray://head:10001
Running the same command again with the same --output resumes from its latest checkpoint.
Configuration (pipelines/train/config.py): the --model preset <- --config FILE <- --set <- flags.
"""

from __future__ import annotations

import argparse
import sys

from dreamcore.config import PRESETS, STAGES, ConfigError, preset
from pipelines.cli_args import Flag, add_config_arguments, config_from_args
from pipelines.train.config import TrainConfig

# Named flags: shorthands for one TrainConfig key each, applied after --set.
FLAGS = (
    Flag("--stage", "model.stage", "training stage: what trains, loss weights", choices=STAGES),
    Flag("--workers", "scaling.workers", "Ray Train workers (one per GPU); 0 = in-process", type=int,
         metavar="N"),
    Flag("--gpu", "scaling.gpu", "one GPU per worker, bf16", const=True),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="curated data folder (Parquet shards, manifest, tokenizer/)")
    parser.add_argument("--output", required=True, help="run folder: checkpoints, metrics, model/ export")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                        help="model preset the configuration starts from (default tiny)")
    add_config_arguments(parser, FLAGS, config_help="YAML file of TrainConfig fields (see pipelines/train/config.py)",
                         set_example="optim.lr=3e-4")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


def load(args: argparse.Namespace) -> TrainConfig:
    """The validated TrainConfig of a parsed `dreamcore train` command line."""
    return config_from_args(TrainConfig(model=preset(args.model)), args, FLAGS).validate()


def main(args: argparse.Namespace) -> int:
    from pipelines.train.job import train

    try:
        cfg = load(args)
        result = train(cfg, args.data, args.output, address=args.address)
    except ConfigError as e:
        print(f"dreamcore train: {e}", file=sys.stderr)
        return 2
    loss = result.metrics.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, float) else ""
    print(f"trained {result.steps} steps{loss_text}; model exported to {result.export_dir}")
    return 0
