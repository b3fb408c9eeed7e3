"""Training recipes per model preset and stage: the defaults a run starts from before YAML and --set.

`tiny` keeps TrainConfig's own defaults (they are tuned for it; pipelines/recipe.py holds the demo's
full recipe). `dreamllm-7b` takes DreamLLM's published settings per stage, from the authors' code
(github.com/RunpeiDong/DreamLLM at 9dc7677):

- projects/dreamllm/configs/stage1/base.py (alignment): lr 2e-3, cosine, warmup_ratio 3e-3,
  1 epoch, model_max_length 2048; the LLM, CLIP and Stable Diffusion frozen.
- projects/dreamllm/configs/stage2/base.py (I-GPT pretraining): lr 2e-5, cosine, warmup_ratio 3e-3,
  1 epoch; the LLM trains.
- projects/dreamllm/configs/sft/base.py (SFT): lr 4e-5, cosine, warmup_ratio 3e-3; the LLM trains.
- scripts/train/dreamllm/run_*.sh: per_device_train_batch_size 16 on 8 GPUs a node, adamw_torch
  (HF defaults: betas 0.9 / 0.999, eps 1e-8, weight decay 0, max grad norm 1.0), bf16.

The paper (arXiv 2309.11499, appendix C.1, "Training recipes for DreamLLM") gives a batch of 8 per
GPU on 128 GPUs and 3 SFT epochs where the code has 16 per GPU and 1 epoch; the code is used here.
The code runs epochs of its data mixtures; a step count is what this project's runs are made of,
so the steps below are one epoch of the paper's mixtures at a global batch of 1024 (micro-batch 8
x grad_accum x workers: 16 GPUs with grad_accum 8, 128 GPUs with 1):

- stage I: about 30.6M pairs (LLaVA-Pretrain 558K, BLIP-LAION 8M, LAION400M 11M, LAION-COCO 11M)
  -> 30,000 steps;
- stage II: MMC4-Core 2M documents + BLIP-LAION 2M pairs -> 4,000 steps;
- SFT: LLaVA-Instruct 80K + InstructMMC4 20K + Instruct-BLIP-LAION 20K -> 120 steps an epoch.

Warmup is the code's 0.3% of the steps (at least one). Cosine decays to 0 (min_lr_ratio 0), as HF's
schedule does. `dreamllm-debug` runs the 7B recipe's learning rates and schedule at a size a CPU
trains: a few steps, micro-batch 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dreamcore.config import STAGES, ConfigError


@dataclass(frozen=True)
class StageRecipe:
    """The optimizer and length of one stage; `overrides()` is what it sets in a TrainConfig."""

    lr: float
    max_steps: int
    micro_batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.003  # DreamLLM's warmup_ratio
    weight_decay: float = 0.0
    beta2: float = 0.999  # torch AdamW's default, which DreamLLM's adamw_torch uses
    min_lr_ratio: float = 0.0  # HF's cosine schedule decays to 0
    checkpoint_every: int = 500

    def overrides(self, stage: str) -> dict[str, Any]:
        return {
            "model": {"stage": stage},
            "max_steps": self.max_steps,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "optim": {"lr": self.lr, "warmup_steps": max(1, math.ceil(self.warmup_ratio * self.max_steps)),
                      "weight_decay": self.weight_decay, "beta2": self.beta2, "min_lr_ratio": self.min_lr_ratio},
            "checkpoint": {"every_steps": min(self.checkpoint_every, self.max_steps)},
        }


_STAGE_I = StageRecipe(lr=2e-3, max_steps=30_000, checkpoint_every=1000)
_7B = {
    "I": _STAGE_I, "I-creation": _STAGE_I, "I-comprehension": _STAGE_I,
    "II": StageRecipe(lr=2e-5, max_steps=4_000),
    "SFT": StageRecipe(lr=4e-5, max_steps=120, checkpoint_every=40),
}
_DEBUG = {stage: StageRecipe(lr=r.lr, max_steps=8, micro_batch_size=2, checkpoint_every=4)
          for stage, r in _7B.items()}

RECIPES: dict[str, dict[str, StageRecipe]] = {"dreamllm-7b": _7B, "dreamllm-debug": _DEBUG}


def recipe(preset_name: str, stage: str) -> StageRecipe | None:
    """The recipe of a preset's stage; None for presets that keep TrainConfig's defaults (tiny)."""
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    return RECIPES.get(preset_name, {}).get(stage)
