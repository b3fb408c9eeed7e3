"""Ray Serve application of dreamcore: LLMServer, ImageDecoder and a FastAPI Ingress.

`build_app` is the typed app builder named in cluster/serve.yaml; `start_local` / `shutdown` start
and stop it on a local Ray (dreamcore serve, the demo, tests).
"""

from pipelines.serve.app import ServeArgs, build_app, shutdown, start_local
from pipelines.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeArgs", "ServeConfig", "build_app", "load_serve_config", "shutdown", "start_local"]
