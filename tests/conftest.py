"""Shared fixtures: one local Ray per test session, and the path to ../shared data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on for local ray.init()
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve kills an HTTP proxy whose readiness check takes over 5 s three times in a row; a cold proxy
# (imports) on 2 busy, slow cores can take longer, and serve.start() then fails. Give it 30 s.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip cleanly on a user's clone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session (starting one costs ~4 s, shutting down ~1 s)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        yield ray
        return
    tmp = tmp_path_factory.mktemp("ray")
    ray.init(
        address="local",  # never join another Ray on the machine (e.g. one /tmp/ray/ray_current_cluster names)
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=True,
        _temp_dir=str(tmp) if len(str(tmp)) < 60 else None,
        runtime_env={"env_vars": {k: os.environ[k] for k in (
            "RAY_AUTH_MODE", "NO_ALBUMENTATIONS_UPDATE", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM",
            "HF_HUB_OFFLINE", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")}},
    )
    yield ray
    serve.shutdown()  # a no-op when no module started Serve
    ray.shutdown()
