"""I-GPT pretraining on Ray Train + DeepSpeed (issue 5).

`train(cfg, data_dir, run_dir)` is the function a Ray job calls; `TrainConfig` / `load_train_config`
hold every setting; the worker loop is in `loop.py`, the Ray Data side in `data.py`, the DeepSpeed
JSON in `deepspeed_config.py`, progress and metrics files in `metrics.py`. The CLI verb is
`pipelines.train.cli` (`dreamcore train`). Ray, torch and DeepSpeed are imported only when a run
starts: the names below load their module on first use, so the config and the CLI stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "pipelines.train.config",
    "load_train_config": "pipelines.train.config",
    "TrainResult": "pipelines.train.job",
    "train": "pipelines.train.job",
}

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
