"""Ray Serve application of dreamcore: LLMServer, ImageDecoder and a FastAPI Ingress.

`build_app` is the typed app builder named in cluster/serve.yaml; `start_local` / `shutdown` start
and stop it on a local Ray (`dreamcore serve`, the demo, tests). The CLI verb is `pipelines.serve.cli`
(`dreamcore serve`). The names below load their module on first use, so the config and the CLI do
not import Ray Serve.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeArgs": "pipelines.serve.app",
    "build_app": "pipelines.serve.app",
    "shutdown": "pipelines.serve.app",
    "start_local": "pipelines.serve.app",
    "ServeConfig": "pipelines.serve.config",
    "load_serve_config": "pipelines.serve.config",
}

__all__ = ["ServeArgs", "ServeConfig", "build_app", "load_serve_config", "shutdown", "start_local"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
