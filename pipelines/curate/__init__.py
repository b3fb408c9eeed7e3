"""Curation on Ray Data: raw interleaved documents -> training Parquet (see job.py)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: `dreamcore curate --help` and the config module must not pay for importing Ray.
    if name == "curate":
        from .job import curate

        return curate
    raise AttributeError(name)
