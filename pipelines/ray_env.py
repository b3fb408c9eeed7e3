"""Joining or starting Ray for a Ray Data job (curate, generate), with the settings its workers need.

Workers inherit the driver's environment only through `runtime_env`: the variables below keep
img2dataset's update check, tokenizers' fork warning and hub downloads off in every worker.
"""

from __future__ import annotations

import os

WORKER_ENV_VARS = ("NO_ALBUMENTATIONS_UPDATE", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")


def ray_init(address: str | None) -> None:
    """Connect to `address` (None: a local Ray) unless this process already has Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV_VARS if k in os.environ}
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
