"""`dreamcore train`: pretrain on Ray Train + DeepSpeed over a curated data folder.

Examples:
  dreamcore train --data demo-output/data --output runs/tiny --preset tiny --set max_steps=300
  dreamcore train --data /nfs/mmc4-tok --output /nfs/runs/stage2 --preset dreamllm-7b --gpu \
      --workers 64 --stage II --set init_from=/nfs/runs/stage1/model --address ray://head:10001
Running the same command again with the same --output resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from dreamcore.config import PRESETS, STAGES, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="curated data folder (Parquet shards, manifest, tokenizer/)")
    parser.add_argument("--output", required=True, help="run folder: checkpoints, metrics, model/ export")
    parser.add_argument("--config", help="YAML file of TrainConfig fields (see pipelines/train/config.py)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default tiny)")
    parser.add_argument("--stage", choices=STAGES, help="training stage: what trains, loss weights")
    parser.add_argument("--workers", type=int, help="Ray Train workers (one per GPU); 0 = in-process")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


def main(args: argparse.Namespace) -> int:
    from pipelines.train.config import load_train_config
    from pipelines.train.job import train

    try:
        cfg = load_train_config(
            args.preset, args.config, args.overrides, stage=args.stage, workers=args.workers,
            gpu=args.gpu or None,
        )
        result = train(cfg, args.data, args.output, address=args.address)
    except ConfigError as e:
        print(f"dreamcore train: {e}", file=sys.stderr)
        return 2
    loss = result.metrics.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, float) else ""
    print(f"trained {result.steps} steps{loss_text}; model exported to {result.export_dir}")
    return 0
