"""The DeepSpeed JSON, generated from TrainConfig (never hand-edited; written to the run folder).

CPU (DS_ACCELERATOR=cpu) needs fp32 and `torch_adam` (DeepSpeed's fused/CPU Adam are JIT-compiled
extensions that the CPU accelerator cannot build); GPU runs take bf16, which DeepSpeed applies to
the whole module while keeping fp32 master weights for the trainable parameters only.
"""

from __future__ import annotations

from typing import Any

from pipelines.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `world_size` data-parallel ranks."""
    o = cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch_size(world_size),
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW: works on every accelerator; no JIT-built extension needed.
                "torch_adam": True,
            },
        },
        # No "scheduler": the job passes its own (pipelines/train/schedule.py, per-group ramps),
        # so the schedule is the one bench/quality.py trains with.
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},  # fp16 needs loss scaling and fails on CPU; bf16 does not
    }
    if cfg.deepspeed.zero_stage >= 1 and cfg.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.gpu}
    if cfg.deepspeed.zero_stage == 3:
        # Gather the full weights on export (save_pretrained) instead of per-rank shards only.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds
