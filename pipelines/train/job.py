"""The driver side: check inputs, write the run's configs, launch TorchTrainer, report the result.

`train(cfg, data_dir, run_dir)` is the function a Ray job calls. The run folder is Ray Train's
storage for this run (`RunConfig(storage_path=parent, name=folder name)`): relaunching with the same
folder resumes from its latest checkpoint. It also holds train_config.yaml, deepspeed_config.json,
metrics.jsonl/.csv, tensorboard/ and, at the end, model/ (the export that serving loads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamcore.config import ConfigError, save_yaml, to_dict
from pipelines.train.config import TrainConfig
from pipelines.train.data import build_dataset, check_data_folder, decoded_size_mib, read_manifest
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.loop import say, train_loop_per_worker

# Environment every worker needs (DeepSpeed picks its accelerator from DS_ACCELERATOR at import).
WORKER_ENV_KEYS = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_DATA_DISABLE_PROGRESS_BARS")


@dataclass
class TrainResult:
    """What a finished run leaves: the step reached, the export folder, the last checkpointed metrics."""

    run_dir: Path
    export_dir: Path
    steps: int
    metrics: dict[str, Any]


def _check_model_matches_data(cfg: TrainConfig, data_dir: Path) -> None:
    """The manifest records the model layout curation tokenized for; a different one is an error."""
    layout = read_manifest(data_dir).get("model")
    if layout is None:  # a folder without manifest.json: nothing to compare with
        return
    checks = {
        "max_seq_len": (layout["max_seq_len"], cfg.model.max_seq_len),
        "dream.num_queries": (layout["dream"]["num_queries"], cfg.model.dream.num_queries),
        "vision.image_size": (layout["vision"]["image_size"], cfg.model.vision.image_size),
        "vision.patch_size": (layout["vision"]["patch_size"], cfg.model.vision.patch_size),
    }
    for key, (data_value, model_value) in checks.items():
        if data_value != model_value:
            raise ConfigError(
                f"{data_dir}/manifest.json: data was tokenized with model.{key}={data_value} but training "
                f"uses {model_value}; pass --set model.{key}={data_value} or re-run curation"
            )


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.scaling.gpu else "cpu"
    return env


def train(
    cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path, address: str | None = None
) -> TrainResult:
    """Pretrain on Ray Train + DeepSpeed; resumes if `run_dir` already holds checkpoints of this run."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    data_dir, run_dir = Path(data_dir).resolve(), Path(run_dir).resolve()
    # 1. Check inputs before any cluster time is spent.
    files = check_data_folder(data_dir, cfg.model)
    _check_model_matches_data(cfg, data_dir)
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise ConfigError(f"init_from={cfg.init_from}: no such folder; give the model/ folder of the previous stage")

    # 2. The run folder: the configs this run trains with, for the record.
    run_dir.mkdir(parents=True, exist_ok=True)
    world = max(1, cfg.scaling.workers)
    save_yaml(cfg, run_dir / "train_config.yaml")
    (run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(cfg, world), indent=2) + "\n")

    # 3. Ray: a cluster address, or a local Ray sized to this machine.
    env = _worker_env(cfg)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env})
    dataset = build_dataset(files, cfg.model, cfg.data.decode_batch_rows)
    size = decoded_size_mib(files, cfg.model)
    if 0 < size <= cfg.data.cache_max_mib:
        # Small corpus: decode once, keep the blocks (in order) in the object store for all epochs.
        dataset = dataset.materialize()
        say(f"[train] decoded dataset cached in the object store: {dataset.count():,} rows, ~{size:.0f} MiB "
            f"(data.cache_max_mib={cfg.data.cache_max_mib})")
    else:
        say(f"[train] streaming the dataset each epoch (~{size:.0f} MiB decoded > data.cache_max_mib="
            f"{cfg.data.cache_max_mib})")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the data position of a checkpoint must mean the same rows on resume

    # 4. The trainer.
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "data_dir": str(data_dir), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_dir=run_dir, export_dir=run_dir / "model", steps=int(metrics.get("step", 0)), metrics=metrics
    )
