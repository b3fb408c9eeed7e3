"""The driver side: check inputs, write the run's configs, launch TorchTrainer, report the result.

`train(cfg, data_dir, run_dir)` is the function a Ray job calls; `data_dir` is one curated folder,
or None to train on the folders and weights of `cfg.data.mixture`. The run folder is Ray Train's
storage for this run (`RunConfig(storage_path=parent, name=folder name)`): relaunching with the same
folder resumes from its latest checkpoint. It also holds train_config.yaml, deepspeed_config.json,
metrics.jsonl/.csv, tensorboard/ and, at the end, model/ (the export that serving loads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from dreamcore.config import ConfigError, save_yaml, to_dict
from pipelines.train.config import MixtureEntry, TrainConfig
from pipelines.train.data import (
    build_dataset,
    check_data_folder,
    dataset_key,
    decoded_size_mib,
    read_manifest,
)
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


def resolve_mixture(cfg: TrainConfig, data_dir: str | Path | None) -> TrainConfig:
    """`cfg` with data.mixture as this run trains on it: absolute paths, names, normalised weights.

    `data_dir` (one folder) is a mixture of one; it and a configured data.mixture are exclusive.
    """
    mixture = cfg.data.mixture
    if data_dir is not None:
        if mixture:
            raise ConfigError(
                f"train data given twice: data_dir={data_dir} and data.mixture "
                f"({', '.join(e.path for e in mixture)}); give one of them"
            )
        mixture = [MixtureEntry(path=str(data_dir))]
    if not mixture:
        raise ConfigError("no training data: pass --data FOLDER[@WEIGHT] (repeatable) or set data.mixture "
                          "(a list of {path, weight}) in --config")
    data = replace(cfg.data, mixture=[replace(e, path=str(Path(e.path).resolve())) for e in mixture])
    entries = [MixtureEntry(path=e.path, weight=w, name=n)
               for e, w, n in zip(data.mixture, data.weights(), data.names())]
    return replace(cfg, data=replace(data, mixture=entries)).validate()


def _check_same_tokenizer(folders: list[Path]) -> None:
    """Every folder of a mixture must hold the same tokenizer: the model loads the first one's."""
    if len(folders) < 2:
        return
    from dreamcore.tokenizer import DreamTokenizer

    def content_hash(folder: Path) -> str:
        try:
            return DreamTokenizer.from_pretrained(folder / "tokenizer").content_hash()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--data {folder}: cannot load tokenizer/ ({e})") from None

    first = content_hash(folders[0])
    for folder in folders[1:]:
        if content_hash(folder) != first:
            raise ConfigError(
                f"--data {folder}: its tokenizer/ differs from the one in {folders[0]} (the model loads the "
                f"first folder's), so its token ids mean other tokens; curate every folder of a mixture with one "
                f"tokenizer: re-run curation of {folder} with "
                f"--set model_overrides.tokenizer.name_or_path={folders[0] / 'tokenizer'}"
            )


def _check_same_mixture(cfg: TrainConfig, run_dir: Path) -> None:
    """A relaunch resumes each folder's position: the checkpointed run's mixture must be this one."""
    previous = run_dir / "train_config.yaml"
    if not previous.is_file() or not any(p.is_dir() for p in run_dir.glob("checkpoint_*")):
        return
    before = ((yaml.safe_load(previous.read_text()) or {}).get("data") or {}).get("mixture")
    if not before:  # a run folder from before mixtures: one folder, nothing to compare
        return
    old = [(e.get("name"), round(float(e.get("weight", 0)), 6)) for e in before]
    new = [(e.name, round(e.weight, 6)) for e in cfg.data.mixture]
    if old != new:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run on the mixture {_show(old)}, this launch gives {_show(new)}; "
            "a relaunch resumes each folder where it stopped, so give the same --data folders and weights, "
            "or train into a new --output (with --set init_from=<previous export> to continue from its weights)"
        )


def _show(mixture: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name}@{weight:g}" for name, weight in mixture)


def _cache_or_stream(datasets: list[Any], files: list[list[Path]], cfg: TrainConfig) -> list[Any]:
    """Decode small folders once into the object store (smallest first, all within data.cache_max_mib);
    the others stream (re-read and re-decode) every epoch."""
    sizes = [decoded_size_mib(f, cfg.model) for f in files]
    names, budget = cfg.data.names(), cfg.data.cache_max_mib
    out = list(datasets)
    for i in sorted(range(len(datasets)), key=lambda j: sizes[j]):
        if 0 < sizes[i] <= budget:
            budget -= sizes[i]
            out[i] = datasets[i].materialize()
            say(f"[train] {names[i]}: decoded dataset cached in the object store: {out[i].count():,} rows, "
                f"~{sizes[i]:.0f} MiB (data.cache_max_mib={cfg.data.cache_max_mib})")
        else:
            say(f"[train] {names[i]}: streaming the dataset each epoch (~{sizes[i]:.0f} MiB decoded; "
                f"{budget:.0f} MiB of data.cache_max_mib={cfg.data.cache_max_mib} left)")
    return out


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.scaling.gpu else "cpu"
    return env


def train(
    cfg: TrainConfig, data_dir: str | Path | None, run_dir: str | Path, address: str | None = None
) -> TrainResult:
    """Pretrain on Ray Train + DeepSpeed; resumes if `run_dir` already holds checkpoints of this run.

    `data_dir`: one curated folder; None: the folders and weights of `cfg.data.mixture`.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve_mixture(cfg.validate(), data_dir)
    run_dir = Path(run_dir).resolve()
    folders = [Path(e.path) for e in cfg.data.mixture]
    # 1. Check inputs before any cluster time is spent.
    files = [check_data_folder(folder, cfg.model) for folder in folders]
    for folder in folders:
        _check_model_matches_data(cfg, folder)
    _check_same_tokenizer(folders)
    _check_same_mixture(cfg, run_dir)
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise ConfigError(f"init_from={cfg.init_from}: no such folder; give the model/ folder of the previous stage")

    # 2. The run folder: the configs this run trains with, for the record.
    run_dir.mkdir(parents=True, exist_ok=True)
    world = max(1, cfg.scaling.workers)
    save_yaml(cfg, run_dir / "train_config.yaml")
    (run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(cfg, world), indent=2) + "\n")

    # 3. Ray: a cluster address, or a local Ray sized to this machine. One dataset per folder.
    env = _worker_env(cfg)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env})
    datasets = [build_dataset(f, cfg.model, cfg.data.decode_batch_rows) for f in files]
    datasets = _cache_or_stream(datasets, files, cfg)
    if len(folders) > 1:
        say("[train] mixture: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(cfg.data.names(), cfg.data.weights())))
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the data position of a checkpoint must mean the same rows on resume

    # 4. The trainer.
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "run_dir": str(run_dir)},
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
        datasets={dataset_key(i): ds for i, ds in enumerate(datasets)},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_dir=run_dir, export_dir=run_dir / "model", steps=int(metrics.get("step", 0)), metrics=metrics
    )
