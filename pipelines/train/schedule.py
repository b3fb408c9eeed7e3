"""The learning-rate schedule, one implementation for the training job and bench/quality.py.

Linear warmup (step 0 trains at lr / warmup_steps), then cosine decay to `min_lr_ratio * lr` at
`max_steps`; each optimizer group (one per lr-multiplied component, see loop.optimizer_groups)
multiplies that by its component's multiplier, which may ramp: `optim.lr_mult_ramps.<name> =
[to, start, end]` holds `lr_mults.<name>` until `start * max_steps`, then moves linearly to `to`
at `end * max_steps` and keeps it. Why a ramp: in the tiny preset the dream conditions only learn
where an image goes while the LLM trains slowly (a quarter of the lr); once they have, the text
side learns faster at a higher rate (docs/architecture.md, "What makes the tiny preset learn").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipelines.train.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The schedule's factor of the base lr at `step` (0-based optimizer steps)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_mult(name: str, step: int, optim: OptimConfig, max_steps: int) -> float:
    """Component `name`'s multiplier at `step` (1 for components without one)."""
    mult = optim.lr_mults.get(name, 1.0)
    ramp = optim.lr_mult_ramps.get(name)
    if not ramp:
        return mult
    to, start, end = ramp
    a, b = start * max_steps, end * max_steps
    frac = min(1.0, max(0.0, (step - a) / max(1e-9, b - a)))
    return mult + frac * (to - mult)


def group_lr(group: dict[str, Any], step: int, optim: OptimConfig, max_steps: int) -> float:
    """The lr of one optimizer group (from loop.optimizer_groups: it carries its component `name`)."""
    return optim.lr * lr_factor(step, optim, max_steps) * lr_mult(group["name"], step, optim, max_steps)


def lr_lambdas(groups: list[dict[str, Any]], optim: OptimConfig, max_steps: int) -> list[Callable[[int], float]]:
    """torch LambdaLR's per-group factors of each group's initial lr (`optim.lr * lr_mults[name]`)."""
    def one(group: dict[str, Any]) -> Callable[[int], float]:
        initial = optim.lr * optim.lr_mults.get(group["name"], 1.0)
        return lambda step: group_lr(group, step, optim, max_steps) / initial

    return [one(g) for g in groups]
