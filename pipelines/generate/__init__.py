"""Offline batch generation on Ray Data: a JSONL of prompts -> Parquet documents (see job.py)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: `dreamcore generate --help` and the config module must not pay for importing Ray or torch.
    if name in ("generate", "GenerateError"):
        from . import job

        return getattr(job, name)
    raise AttributeError(name)
