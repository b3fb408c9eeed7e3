"""TrainConfig: every setting of the pretraining job, as dataclasses loaded through `load_config`.

One rule for all of it: defaults (with the model preset) <- YAML file <- `--set key=value`. The
DeepSpeed JSON is generated from these fields (`pipelines.train.deepspeed_config`), never edited by
hand, so a run's `train_config.yaml` in the run folder is the whole truth about how it trained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dreamcore.config import STAGES, ConfigError, ModelConfig, load_config, merge, preset


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr` at `max_steps`
    (pipelines/train/schedule.py), per component multipliers on top."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    # Learning-rate multipliers per component (dreamcore.model.PARAM_GROUPS: llm, vision,
    # vision_proj, cond_proj, decoder, dream_queries); unnamed ones train at lr. The schedule
    # scales every group alike. e.g. `--set optim.lr_mults.llm=0.25`.
    lr_mults: dict[str, float] = field(default_factory=dict)
    # A multiplier that moves during the run: [to, start, end] holds lr_mults[name] until
    # start x max_steps, then goes linearly to `to` at end x max_steps (fractions in [0, 1]).
    # e.g. `--set 'optim.lr_mult_ramps.llm=[0.75, 0.33, 0.67]'`.
    lr_mult_ramps: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class DeepSpeedSettings:
    """The DeepSpeed engine: ZeRO stage and precision (the JSON is derived from these)."""

    zero_stage: int = 2  # 0..3; DreamLLM's FSDP SHARD_GRAD_OP corresponds to ZeRO-2
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU memory
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look the GPU up (see metrics.py)


@dataclass
class CheckpointSettings:
    """Ray Train checkpoints (DeepSpeed's per-rank files inside): every N steps, keep the last K."""

    every_steps: int = 100
    keep: int = 2


@dataclass
class MixtureEntry:
    """One curated data folder of the training mixture and its share of the rows."""

    path: str = ""
    weight: float = 1.0  # relative; the weights of a mixture are normalised to sum to 1
    name: str = ""  # in metrics (rows_<name>) and checkpoints; "" = the folder's name


@dataclass
class DataSettings:
    """How Ray Data feeds the workers; the order is a pure function of (seed, epoch) for resume."""

    # The curated folders to train on and their shares of the rows (DreamLLM stage II: MMC4
    # documents 0.6 + caption pairs 0.4). Empty: the one folder given to train(cfg, data_dir, ...).
    # Every micro-batch holds each folder's share of its rows (pipelines/train/data.py: mix_counts).
    mixture: list[MixtureEntry] = field(default_factory=list)
    shuffle_seed: int = 0
    # Rows in each worker's local shuffle buffer (reseeded every epoch); 0 = file order. Well above
    # micro_batch_size, or every epoch replays nearly the same batches (docs/architecture.md).
    shuffle_buffer: int = 1024
    prefetch_batches: int = 2
    decode_batch_rows: int = 32  # rows per Ray Data map_batches call that decodes PNGs
    # Keep the DECODED dataset in Ray's object store across epochs when it is at most this many MiB
    # (estimated from the shards' row count and one decoded sample); 0 = always stream. Streaming
    # re-reads and re-decodes every epoch, and each restart costs seconds (docs/architecture.md).
    # A mixture shares this budget: its folders are cached smallest first while they fit (the small
    # ones restart their epochs most often).
    cache_max_mib: int = 1024

    def weights(self) -> list[float]:
        """The mixture's weights, normalised to sum to 1."""
        total = sum(e.weight for e in self.mixture)
        return [e.weight / total for e in self.mixture]

    def names(self) -> list[str]:
        """One distinct name per mixture entry: its `name`, else its folder's name (+ _<index> if taken)."""
        taken = {e.name for e in self.mixture if e.name}
        names: list[str] = []
        for i, e in enumerate(self.mixture):
            name = e.name
            if not name:
                name = _safe_name(e.path).strip("_") or f"d{i}"
                while name in taken:
                    name = f"{name}_{i}"
                taken.add(name)
            names.append(name)
        return names


@dataclass
class ScalingSettings:
    """Ray Train workers: one per GPU on a cluster; fractional CPUs on a small CPU box.

    On 2 CPUs, two workers at 1 CPU each starve Ray Data and the run hangs, hence 0.5 by default.
    `workers=0` runs the loop in the driver process (Ray Train local mode; no restarts, no resume).
    """

    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 0.5
    # Further Ray resources each worker needs, e.g. {"trainer": 1}: a custom resource that only the
    # nodes meant for training advertise (`ray start --resources`), so workers land there and not
    # on the head or the data nodes.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 2  # worker failures Ray Train recovers from (from the last checkpoint)
    torch_threads: int = 0  # >0: torch intra-op threads per worker; 0 = what Ray gives (OMP_NUM_THREADS)


@dataclass
class ValidationSettings:
    """A held-out split and its loss during training.

    The last `rows` rows of the first data folder (in file order) are held out of training; every
    `every_steps` steps, and at the last step, every rank computes the loss on them in eval mode
    with the same noise and timesteps each time (the training random streams are put back after),
    so values at different steps compare. It is logged as val_loss / val_lm_loss / val_vm_loss.
    """

    every_steps: int = 0  # 0 = no validation
    rows: int = 64


@dataclass
class DebugSettings:
    """Fault injection for tests and drills."""

    fail_at_step: int = 0  # >0: rank 0 raises once after this step (a marker file makes it once)


@dataclass
class TrainConfig:
    """The pretraining job. `model` must describe the same layout the data was tokenized for."""

    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    micro_batch_size: int = 8  # rows per worker per forward
    grad_accum: int = 1
    max_steps: int = 200  # optimizer steps
    max_minutes: float = 0.0  # >0: stop (checkpoint + export) after this much training time
    log_every: int = 10
    seed: int = 0
    init_from: str | None = None  # exported model folder of the previous stage (save_pretrained)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    data: DataSettings = field(default_factory=DataSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)

    def validate(self) -> TrainConfig:
        """Cross-field checks that a dataclass type cannot express; returns self."""
        checks = [
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (0 <= self.deepspeed.zero_stage <= 3, "deepspeed.zero_stage must be 0, 1, 2 or 3"),
            (self.deepspeed.precision in ("auto", "bf16", "fp32"),
             "deepspeed.precision must be auto, bf16 or fp32"),
            (self.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1"),
            (self.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0 (0 = file order)"),
            (self.data.cache_max_mib >= 0, "data.cache_max_mib must be >= 0 (0 = always stream)"),
            *self._mixture_checks(),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
            (self.validation.every_steps >= 0, "validation.every_steps must be >= 0 (0 = no validation)"),
            (self.validation.rows >= 1, "validation.rows must be >= 1"),
            (self.scaling.workers >= 0, "scaling.workers must be >= 0"),
            (self.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker must be > 0"),
            (not {"CPU", "GPU"} & set(self.scaling.resources_per_worker)
             and all(isinstance(v, (int, float)) and v > 0 for v in self.scaling.resources_per_worker.values()),
             "scaling.resources_per_worker takes custom resources > 0 (e.g. {trainer: 1}); CPUs and GPUs "
             "are scaling.cpus_per_worker and scaling.gpu"),
            (self.scaling.torch_threads >= 0, "scaling.torch_threads must be >= 0"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
            *self._lr_mult_checks(),
            (self.model.stage in STAGES, f"model.stage must be one of {', '.join(STAGES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train config: {message}")
        if self.deepspeed.precision == "bf16" and not self.scaling.gpu:
            raise ConfigError(
                "train config: deepspeed.precision=bf16 needs GPUs (--gpu); CPU training runs in fp32"
            )
        return self

    def _lr_mult_checks(self) -> list[tuple[bool, str]]:
        from dreamcore.model import PARAM_GROUPS

        checks = []
        for name, mult in self.optim.lr_mults.items():
            checks.append((name in PARAM_GROUPS, f"optim.lr_mults.{name}: unknown component; use one of "
                                                 f"{', '.join(PARAM_GROUPS)}"))
            ok = isinstance(mult, (int, float)) and not isinstance(mult, bool) and math.isfinite(mult) and mult > 0
            checks.append((ok, f"optim.lr_mults.{name}={mult!r} must be a number > 0"))
        for name, ramp in self.optim.lr_mult_ramps.items():
            checks.append((name in PARAM_GROUPS, f"optim.lr_mult_ramps.{name}: unknown component; use one of "
                                                 f"{', '.join(PARAM_GROUPS)}"))
            ok = (isinstance(ramp, (list, tuple)) and len(ramp) == 3
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in ramp)
                  and ramp[0] > 0 and 0 <= ramp[1] < ramp[2] <= 1)
            checks.append((ok, f"optim.lr_mult_ramps.{name}={ramp!r} must be [to > 0, start, end] with "
                               "0 <= start < end <= 1 (fractions of max_steps)"))
        return checks

    def _mixture_checks(self) -> list[tuple[bool, str]]:
        checks = []
        for i, e in enumerate(self.data.mixture):
            checks += [
                (bool(e.path), f"data.mixture[{i}].path is empty; give a curated data folder"),
                (math.isfinite(e.weight) and e.weight > 0,
                 f"data.mixture[{i}].weight={e.weight} ({e.path}): weights must be > 0"),
                (not e.name or _safe_name(e.name) == e.name,
                 f"data.mixture[{i}].name={e.name!r}: use letters, digits, '-' and '_' only"),
            ]
        explicit = [e.name for e in self.data.mixture if e.name]
        dupes = sorted({n for n in explicit if explicit.count(n) > 1})
        checks.append((not dupes, f"data.mixture names {dupes} are used twice; give each entry its own name"))
        return checks

    @property
    def precision(self) -> str:
        """The precision this run uses: bf16 on GPU, fp32 on CPU, unless set explicitly."""
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.gpu else "fp32"
        return self.deepspeed.precision

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * max(1, world_size)


def _safe_name(text: str) -> str:
    """A metrics-friendly name: the last path part, other characters than [A-Za-z0-9_-] as '_'."""
    last = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_-]", "_", last)


def parse_data_arg(text: str) -> dict[str, str | float]:
    """One `--data` value, `PATH` or `PATH@WEIGHT`, as a data.mixture entry.

    `@` (not `=` or `:`) keeps s3:// URIs and Windows drives whole; a PATH that itself holds an `@`
    counts as a weight only when what follows the last `@` is a number.
    """
    path, sep, weight = text.rpartition("@")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": text, "weight": 1.0}


def mixture_from_data_args(data: list[str] | None) -> list[dict[str, str | float]] | None:
    """The data.mixture of repeated `--data PATH[@WEIGHT]` values (None: not given)."""
    return [parse_data_arg(d) for d in data] if data else None


def load_train_config(
    preset_name: str = "tiny",
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    data: list[str] | None = None,
) -> TrainConfig:
    """Preset model + defaults <- YAML <- `key=value` overrides <- the keyword values; validated.

    The keywords are the Python spelling of `dreamcore train`'s named flags (pipelines/train/cli.py),
    applied last by the same `apply_flags`; None (and gpu=False) leaves a key as it is. `data` is
    `--data` (repeatable): `["PATH@0.6", "PATH2@0.4"]` replaces data.mixture.
    """
    from pipelines.cli_args import apply_flags

    values = {"model.stage": stage, "scaling.workers": workers, "scaling.gpu": True if gpu else None,
              "data.mixture": mixture_from_data_args(data)}
    return with_recipe(preset_name, lambda base: apply_flags(load_config(base, path, overrides), values)).validate()


def stage_base(preset_name: str, stage: str | None = None) -> TrainConfig:
    """The preset's model with its stage's recipe (pipelines/train/recipes.py) applied: the defaults
    that YAML, --set and flags then override. Presets without recipes (tiny) keep TrainConfig's."""
    from pipelines.train.recipes import recipe

    cfg = TrainConfig(model=preset(preset_name))
    stage = stage or cfg.model.stage
    found = recipe(preset_name, stage)
    return merge(cfg, found.overrides(stage)) if found else merge(cfg, {"model": {"stage": stage}})


def with_recipe(preset_name: str, build: Callable[[TrainConfig], TrainConfig]) -> TrainConfig:
    """`build(base)` applies the user's settings (YAML, --set, flags) to a base config. It runs
    twice: once on the bare preset to learn the stage the user asked for, then on that stage's
    recipe, so a user's setting always wins over the recipe and the recipe follows `--stage`."""
    stage = build(TrainConfig(model=preset(preset_name))).model.stage
    return build(stage_base(preset_name, stage))
