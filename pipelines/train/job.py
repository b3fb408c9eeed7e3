"""The driver side: check inputs, write the run's configs, launch TorchTrainer, report the result.

`train(cfg, data_dir, run_dir)` is the function a Ray job calls; `data_dir` is one curated folder,
or None to train on the folders and weights of `cfg.data.mixture`. The run folder is Ray Train's
storage for this run (`RunConfig(storage_path=parent, name=folder name)`): relaunching with the same
folder resumes from its latest checkpoint. It also holds train_config.yaml, deepspeed_config.json,
metrics.jsonl/.csv, tensorboard/ and, at the end, model/ (the export that serving loads).

Data folders, `init_from` and the run folder may be object-store URIs (s3://bucket/prefix; see
dreamcore/storage.py). Ray Train then keeps checkpoints in the bucket (`RunConfig(storage_filesystem)`),
and `_loop_on_object_storage` wraps the unchanged per-worker loop: it fetches what the loop reads
from local disk (the tokenizer, init_from) and publishes what it writes there (metrics, model/).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dreamcore import storage
from dreamcore.config import ConfigError, to_dict
from pipelines.train.config import MixtureEntry, TrainConfig
from pipelines.train.data import (
    build_dataset,
    check_data_folder,
    check_rows_per_worker,
    count_rows,
    dataset_key,
    decoded_size_mib,
    held_out_split,
    read_held_out,
    read_manifest,
)
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.loop import checkpoint_text, say, train_loop_per_worker
from pipelines.train.metrics import METRICS_DIRS, METRICS_FILES

# Environment every worker needs (DeepSpeed picks its accelerator from DS_ACCELERATOR at import).
WORKER_ENV_KEYS = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_DATA_DISABLE_PROGRESS_BARS")


@dataclass
class TrainResult:
    """What a finished run leaves: the step reached, the export folder, the last checkpointed metrics."""

    run_dir: Path | str  # a str when the run folder is an object-store URI
    export_dir: Path | str
    steps: int
    metrics: dict[str, Any]


def _check_model_matches_data(cfg: TrainConfig, data_dir: str) -> None:
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
    data = replace(cfg.data, mixture=[replace(e, path=storage.resolve(e.path)) for e in mixture])
    entries = [MixtureEntry(path=e.path, weight=w, name=n)
               for e, w, n in zip(data.mixture, data.weights(), data.names())]
    return replace(cfg, data=replace(data, mixture=entries)).validate()


def _check_same_tokenizer(folders: list[str]) -> None:
    """Every folder of a mixture must hold the same tokenizer: the model loads the first one's."""
    if len(folders) < 2:
        return
    from dreamcore.tokenizer import DreamTokenizer

    def content_hash(folder: str) -> str:
        tokenizer = storage.join(folder, "tokenizer")
        try:
            local = storage.cached_copy(tokenizer) if storage.is_uri(tokenizer) else tokenizer
            return DreamTokenizer.from_pretrained(local).content_hash()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--data {folder}: cannot load tokenizer/ ({e})") from None

    first = content_hash(folders[0])
    for folder in folders[1:]:
        if content_hash(folder) != first:
            raise ConfigError(
                f"--data {folder}: its tokenizer/ differs from the one in {folders[0]} (the model loads the "
                f"first folder's), so its token ids mean other tokens; curate every folder of a mixture with one "
                f"tokenizer: re-run curation of {folder} with "
                f"--set model_overrides.tokenizer.name_or_path={storage.join(folders[0], 'tokenizer')}"
            )


def _check_same_mixture(cfg: TrainConfig, run_dir: str | Path) -> None:
    """A relaunch resumes each folder's position: the checkpointed run's mixture must be this one."""
    previous = storage.join(run_dir, "train_config.yaml")
    if not storage.is_file(previous) or not any(d.startswith("checkpoint_") for d in storage.list_dirs(run_dir)):
        return
    before = ((yaml.safe_load(storage.read_text(previous)) or {}).get("data") or {}).get("mixture")
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


def _cache_or_stream(datasets: list[Any], files: list[list[str]], cfg: TrainConfig) -> list[Any]:
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
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve_mixture(cfg.validate(), data_dir)
    run = storage.resolve(run_dir)
    folders = [e.path for e in cfg.data.mixture]
    # 1. Check inputs before any cluster time is spent (object stores first: one clear line for a
    #    wrong endpoint, missing credentials or bucket).
    _check_object_storage(cfg, run)
    files = [check_data_folder(folder, cfg.model) for folder in folders]
    for folder in folders:
        _check_model_matches_data(cfg, folder)
    _check_same_tokenizer(folders)
    _check_same_mixture(cfg, run)
    validating = cfg.validation.every_steps > 0
    training_rows = held_out_split(files[0], cfg.validation.rows, folders[0]) if validating else None
    for i, (folder, folder_files) in enumerate(zip(folders, files)):
        rows = training_rows if i == 0 and validating else count_rows(folder_files)
        check_rows_per_worker(folder, rows, max(1, cfg.scaling.workers), cfg.micro_batch_size)
    if cfg.init_from and not storage.is_dir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from}: no such folder; give the model/ folder of the previous stage")

    # 2. The run folder: the configs this run trains with, for the record.
    world = max(1, cfg.scaling.workers)
    storage.write_text(storage.join(run, "train_config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    storage.write_text(storage.join(run, "deepspeed_config.json"),
                       json.dumps(deepspeed_config(cfg, world), indent=2) + "\n")

    # 3. Ray: a cluster address, or a local Ray sized to this machine. One dataset per folder.
    env = _worker_env(cfg)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env})
    # Each epoch of each folder re-runs the ingest split: its Ray Data progress bars and start lines
    # would repeat every epoch beside the training progress line, which already says where the run is.
    data_ctx = ray.data.DataContext.get_current()
    saved = data_ctx.enable_progress_bars, data_ctx.print_on_execution_start
    data_ctx.enable_progress_bars, data_ctx.print_on_execution_start = False, False
    held_out = None
    try:
        datasets = [build_dataset(f, cfg.model, cfg.data.decode_batch_rows) for f in files]
        if validating:  # the first folder's last rows: held out of training, into the object store
            datasets[0] = datasets[0].limit(training_rows)
            held_out = ray.put(read_held_out(files[0], cfg.validation.rows))
        datasets = _cache_or_stream(datasets, files, cfg)
    finally:
        data_ctx.enable_progress_bars, data_ctx.print_on_execution_start = saved
    if len(folders) > 1:
        say("[train] mixture: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(cfg.data.names(), cfg.data.weights())))
    with warnings.catch_warnings():  # Ray's own defaults set a field it has deprecated; not ours to fix
        warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.*")
        ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the data position of a checkpoint must mean the same rows on resume

    # 4. The trainer (its storage: the run folder's filesystem, local or the object store).
    resources = ({"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.gpu else {})
                 | cfg.scaling.resources_per_worker)
    fs, storage_dir = storage.filesystem(run)
    storage_path, name = storage_dir.rsplit("/", 1)
    remote = ObjectStorePaths.of(cfg, run)
    trainer = TorchTrainer(
        functools.partial(_loop_on_object_storage, remote) if remote.any() else train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "run_dir": str(local_run_dir(run)), "held_out": held_out},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path or "/",
            storage_filesystem=fs if storage.is_uri(run) else None,
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
    out: Path | str = run if storage.is_uri(run) else Path(run)
    return TrainResult(
        run_dir=out, export_dir=storage.join(run, "model") if remote.run else Path(run) / "model",
        steps=int(metrics.get("step", 0)), metrics=metrics,
    )


# ----------------------------------------------------------------------------------------------
# Object storage: data, init_from and the run folder as s3:// (or other) URIs


def _check_object_storage(cfg: TrainConfig, run: str) -> None:
    """Every URI this run touches must be reachable (one line naming it and the fix), before Ray starts."""
    if storage.is_uri(run) and "/" not in storage.filesystem(run)[1]:
        raise ConfigError(f"--output {run}: give a folder inside the bucket, e.g. {run}/runs/NAME")
    storage.check_access(run, "--output")
    for e in cfg.data.mixture:
        storage.check_access(e.path, "--data")
    if cfg.init_from:
        storage.check_access(cfg.init_from, "init_from")


def local_run_dir(run: str) -> Path:
    """Where the workers write the run folder's files: the run folder itself, or for a URI a local
    staging folder (fixed per URI, so a restart on the same node finds the loop's fault marker)."""
    if not storage.is_uri(run):
        return Path(run)
    return Path(tempfile.gettempdir()) / "dreamcore-runs" / hashlib.sha256(run.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ObjectStorePaths:
    """The URIs the per-worker loop cannot read or write as local paths, and the settings to reach them.

    `env` holds the driver's object-store settings (dreamcore.storage.environment()): it travels
    pickled with the train function, so workers of a Ray started without them reach the store too.
    """

    run: str | None = None  # the run folder: metrics and model/ are published there
    data: str | None = None  # the mixture's first folder: the loop reads its tokenizer/
    init_from: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cfg: TrainConfig, run: str) -> ObjectStorePaths:
        def uri(path: str | None) -> str | None:
            return path if path and storage.is_uri(path) else None

        return cls(uri(run), uri(cfg.data.mixture[0].path), uri(cfg.init_from), storage.environment())

    def any(self) -> bool:
        return bool(self.run or self.data or self.init_from)


def _loop_on_object_storage(paths: ObjectStorePaths, config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` with its local-path inputs fetched and its outputs published.

    Before: the first folder's tokenizer/ and init_from are downloaded (init_from once per node,
    into the cache), and rank 0 fetches the run's metrics files so a resumed run appends to them.
    After: rank 0 uploads the metrics (also when the loop fails) and model/ to the run folder.
    """
    import ray.train

    os.environ.update(paths.env)
    rank = ray.train.get_context().get_world_rank()
    stage = Path(config["run_dir"])
    train_cfg = copy.deepcopy(config["train"])
    inputs = Path(tempfile.mkdtemp(prefix="dreamcore-inputs-"))
    try:
        if paths.data:
            storage.download_dir(storage.join(paths.data, "tokenizer"), inputs / "tokenizer")
            train_cfg["data"]["mixture"][0]["path"] = str(inputs)  # the loop reads <path>/tokenizer only
        if paths.init_from:
            train_cfg["init_from"] = str(storage.cached_copy(paths.init_from))
        publish = bool(paths.run) and rank == 0
        if publish:
            _fetch_metrics(paths.run, stage, ray.train.get_checkpoint())
        try:
            out = train_loop_per_worker({**config, "train": train_cfg})
        finally:
            if publish:
                _publish_metrics(stage, paths.run)
        if publish:
            storage.upload_dir(stage / "model", storage.join(paths.run, "model"))
            out["export"] = storage.join(paths.run, "model")
            shutil.rmtree(stage, ignore_errors=True)
        return out
    finally:
        shutil.rmtree(inputs, ignore_errors=True)


def _fetch_metrics(run: str, stage: Path, checkpoint: Any = None) -> None:
    """The run's metrics files into the staging folder, for a resumed run to append to.

    Two copies may exist: the bucket's (published when an attempt ended, even by an error) and the
    latest checkpoint's (saved with it). Both are prefixes of one append-only history, so the longer
    one is the newer: after a node died, killing rank 0 before it could publish, only the
    checkpoint's copy has the steps up to that checkpoint."""
    stage.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage / "model", ignore_errors=True)
    for name in METRICS_FILES:
        (stage / name).unlink(missing_ok=True)
        copies = [storage.read_text(storage.join(run, name)) if storage.is_file(storage.join(run, name)) else "",
                  checkpoint_text(checkpoint, name)]
        text = max(copies, key=len)
        if text:
            (stage / name).write_text(text)
    for name in METRICS_DIRS:
        shutil.rmtree(stage / name, ignore_errors=True)
        if storage.list_files(storage.join(run, name)):
            storage.download_dir(storage.join(run, name), stage / name)


def _publish_metrics(stage: Path, run: str) -> None:
    for name in METRICS_FILES:
        if (stage / name).is_file():
            storage.write_text(storage.join(run, name), (stage / name).read_text())
    for name in METRICS_DIRS:
        if (stage / name).is_dir():
            storage.upload_dir(stage / name, storage.join(run, name))
