"""TrainConfig: every setting of the pretraining job, as dataclasses loaded through `load_config`.

One rule for all of it: defaults (with the model preset) <- YAML file <- `--set key=value`. The
DeepSpeed JSON is generated from these fields (`pipelines.train.deepspeed_config`), never edited by
hand, so a run's `train_config.yaml` in the run folder is the whole truth about how it trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dreamcore.config import STAGES, ConfigError, ModelConfig, load_config, preset


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr` at `max_steps`."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1


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
class DataSettings:
    """How Ray Data feeds the workers; the order is a pure function of (seed, epoch) for resume."""

    shuffle_seed: int = 0
    # Rows in each worker's local shuffle buffer (reseeded every epoch); 0 = file order. Well above
    # micro_batch_size, or every epoch replays nearly the same batches (docs/architecture.md).
    shuffle_buffer: int = 1024
    prefetch_batches: int = 2
    decode_batch_rows: int = 32  # rows per Ray Data map_batches call that decodes PNGs
    # Keep the DECODED dataset in Ray's object store across epochs when it is at most this many MiB
    # (estimated from the shards' row count and one decoded sample); 0 = always stream. Streaming
    # re-reads and re-decodes every epoch, and each restart costs seconds (docs/architecture.md).
    cache_max_mib: int = 1024


@dataclass
class ScalingSettings:
    """Ray Train workers: one per GPU on a cluster; fractional CPUs on a small CPU box.

    On 2 CPUs, two workers at 1 CPU each starve Ray Data and the run hangs, hence 0.5 by default.
    `workers=0` runs the loop in the driver process (Ray Train local mode; no restarts, no resume).
    """

    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 2  # worker failures Ray Train recovers from (from the last checkpoint)
    torch_threads: int = 0  # >0: torch intra-op threads per worker; 0 = what Ray gives (OMP_NUM_THREADS)


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
            (self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
            (self.scaling.workers >= 0, "scaling.workers must be >= 0"),
            (self.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker must be > 0"),
            (self.scaling.torch_threads >= 0, "scaling.torch_threads must be >= 0"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
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

    @property
    def precision(self) -> str:
        """The precision this run uses: bf16 on GPU, fp32 on CPU, unless set explicitly."""
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.gpu else "fp32"
        return self.deepspeed.precision

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * max(1, world_size)


def load_train_config(
    preset_name: str = "tiny",
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
) -> TrainConfig:
    """Preset model + defaults <- YAML <- `key=value` overrides <- the keyword values; validated.

    The keywords are the Python spelling of `dreamcore train`'s named flags (pipelines/train/cli.py),
    applied last by the same `apply_flags`; None (and gpu=False) leaves a key as it is.
    """
    from pipelines.cli_args import apply_flags

    cfg = load_config(TrainConfig(model=preset(preset_name)), path, overrides)
    values = {"model.stage": stage, "scaling.workers": workers, "scaling.gpu": True if gpu else None}
    return apply_flags(cfg, values).validate()
