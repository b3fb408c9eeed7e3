"""The Serve application: a typed builder for `serve run` / `serve deploy` / RayService, and local start.

`build_app(ServeArgs)` is the import path in cluster/serve.yaml
(`pipelines.serve:build_app`); Serve converts the YAML `args` into `ServeArgs` (pydantic), so a
misspelled argument fails at deploy time. `start_local` / `shutdown` are what `dreamcore serve`
and the demo use: Serve on the Ray this process finds or starts, the app, and a URL once healthy.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from dreamcore import storage
from dreamcore.config import ConfigError, load_config, merge, to_dict
from pipelines.serve.config import ServeConfig, deployment_options, load_serve_config
from pipelines.serve.deployments import ImageDecoder, Ingress, LLMServer
from pipelines.serve.guard import is_loopback

log = logging.getLogger("dreamcore.serve")


class ServeArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="folder written by dreamcore.checkpoint.save_pretrained")
    config: str | None = Field(None, description="a ServeConfig YAML file (see cluster/serve.yaml)")
    set: list[str] = Field(default_factory=list, description="key=value overrides of the ServeConfig")
    values: dict[str, Any] = Field(default_factory=dict, description="ServeConfig values inline (nested)")


def check_checkpoint(path: str) -> str:
    """An absolute checkpoint folder that holds config.json, or an object-store URI of one
    (s3://bucket/run/model); else a ConfigError saying what is wrong.

    A URI is checked here (reachable, config.json present) but not downloaded: each replica
    downloads it once per node into that node's cache (dreamcore.storage.local_path), so replicas
    on any node of a cluster load a local copy without a shared disk.
    """
    if not path:
        raise ConfigError("no checkpoint given; pass --checkpoint DIR (a folder written by save_pretrained)")
    if storage.is_uri(path):
        storage.check_access(path, "checkpoint")
        if not storage.is_file(storage.join(path, "config.json")):
            raise ConfigError(f"checkpoint {path} has no config.json; pass the model/ folder a training run "
                              "exported (e.g. s3://bucket/runs/NAME/model)")
        return storage.resolve(path)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"checkpoint {path} is not a folder; pass the folder save_pretrained wrote")
    if not (p / "config.json").is_file():
        raise ConfigError(f"checkpoint {path} has no config.json; is it a dreamcore checkpoint folder?")
    return str(p.resolve())


def serve_config(args: ServeArgs) -> ServeConfig:
    cfg = load_serve_config(args.config, args.set)
    if args.values:
        cfg = merge(cfg, args.values)
    if args.checkpoint:
        cfg = merge(cfg, {"checkpoint": args.checkpoint})
    return cfg


def app_from_config(cfg: ServeConfig) -> Application:
    """The bound application graph: Ingress(LLMServer, ImageDecoder) with options from `cfg`."""
    ckpt = check_checkpoint(cfg.checkpoint)
    cfg = merge(cfg, {"checkpoint": ckpt})
    r = cfg.retry_after_s
    llm = LLMServer.options(**deployment_options("LLMServer", cfg.llm, r)).bind(
        ckpt, cfg.device, cfg.llm.max_batch_size, cfg.llm.max_cache_tokens, cfg.llm.session_ttl_s, r, cfg.dtype)
    decoder = ImageDecoder.options(**deployment_options("ImageDecoder", cfg.decoder, r)).bind(
        ckpt, cfg.device, cfg.decoder.max_batch_size,
        max(cfg.decoder.max_ongoing_requests, cfg.decoder.max_batch_size), r, cfg.dtype)
    return Ingress.options(**deployment_options("Ingress", cfg.ingress, r)).bind(llm, decoder, to_dict(cfg))


def build_app(args: ServeArgs | dict[str, Any]) -> Application:
    """Typed Serve app builder (import path `pipelines.serve:build_app`).

    Serve validates `args` against the annotation only when it can resolve it; with postponed
    annotations it hands over the raw dict from the config file, so validate here either way.
    """
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    return app_from_config(serve_config(args))


# ----------------------------------------------------------------------------------------------
# Local start (dreamcore serve, the demo, tests, benchmarks)


def _has_key(cfg: ServeConfig) -> bool:
    import os

    return bool(cfg.auth.api_key_file) or bool(os.environ.get(cfg.auth.api_key_env))


def start_local(
    checkpoint: str | None = None,
    host: str | None = None,
    port: int | None = None,
    config: ServeConfig | str | None = None,
    overrides: list[str] | None = None,
    timeout_s: float = 300.0,
) -> str:
    """Start Serve on the Ray this process finds (or a new local one), deploy, wait until healthy.

    Returns the base URL. Without an API key configured the HTTP proxy binds to 127.0.0.1 only,
    whatever `host` says, and logs that it did.
    """
    import ray

    if isinstance(config, ServeConfig):
        cfg = load_config(config, None, overrides)
    else:
        cfg = load_serve_config(config, overrides)
    values = {k: v for k, v in {"checkpoint": checkpoint, "host": host, "port": port}.items() if v is not None}
    cfg = merge(cfg, values) if values else cfg
    if not _has_key(cfg) and not is_loopback(cfg.host):
        log.warning("no API key configured (auth.api_key_file or $%s): binding to 127.0.0.1, not %s",
                    cfg.auth.api_key_env, cfg.host)
        cfg = merge(cfg, {"host": "127.0.0.1"})
    elif not _has_key(cfg):
        log.warning("no API key configured: the endpoint is unauthenticated and bound to %s only", cfg.host)
    application = app_from_config(cfg)  # checks the checkpoint before Ray starts
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port,
                              "request_timeout_s": cfg.request_timeout_s})
    serve.run(application, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host_for_url = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host_for_url}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    _wait_healthy(url, timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    last: Exception | None = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet: connection refused, 404/503 while deploying
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s} s (last error: {last})")


def shutdown() -> None:
    """Stop Serve (the applications and the HTTP proxy); Ray itself keeps running."""
    serve.shutdown()


def deployment_status(app_name: str = "dreamcore") -> dict[str, dict[str, Any]]:
    """Per deployment: its autoscaling_config as Serve holds it, status, and RUNNING replica actors.

    The same source as `serve.status()` (the controller's instance details), plus the deployment
    config, which `serve.status()` leaves out.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    app = details.applications[app_name]
    out = {}
    for name, dep in app.deployments.items():
        running = [r.actor_name for r in dep.replicas if str(r.state.value) == "RUNNING"]
        auto = dep.deployment_config.autoscaling_config
        out[name] = {
            "status": str(dep.status.value),
            "autoscaling_config": auto.model_dump() if hasattr(auto, "model_dump") else dict(auto or {}),
            "running_replicas": running,
            "target_num_replicas": dep.target_num_replicas,
        }
    return out
