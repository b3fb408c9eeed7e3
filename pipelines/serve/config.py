"""Serving configuration: one dataclass tree, loaded like every other job's through `load_config`.

The same values reach Ray Serve two ways: `dreamcore serve` turns them into deployment options
(`deployment_options`), and `cluster/serve.yaml` spells them out for `serve run` / `serve deploy` /
KubeRay (a test checks that the two agree). Defaults are sized for one small CPU node (2 CPUs): every
deployment at its max_replicas plus one replacement replica fit its CPU budget, so a replica that
dies is replaced at once rather than after another deployment scales down. The reasons for each
number are in docs/operations.md ("Serving").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamcore.config import ConfigError, load_config, to_dict


@dataclass
class AutoscalingSettings:
    """Ray Serve `autoscaling_config` of one deployment (Serve's own field names)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0


@dataclass
class DeploymentSettings:
    """Replica resources, backpressure and batching of one deployment."""

    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = 8
    max_queued_requests: int = 32  # beyond this Serve answers 503 + Retry-After at once
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # fraction of a GPU per replica (e.g. 0.5 puts two replicas on one GPU)
    # Custom Ray resources per replica, e.g. {"decoder_node": 1}: only nodes started with that
    # resource (`ray start --resources`, a KubeRay group's rayStartParams) take the replicas.
    resources: dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 8  # requests (LLM rows, decoder images) sharing one model step


@dataclass
class LLMSettings(DeploymentSettings):
    """The LLM deployment: its batching is continuous (dreamcore/scheduler.py), with a KV cache bound."""

    # Tokens of KV cache a replica may hold (running rounds at their worst case + parked sessions);
    # a round that does not fit is refused with 503 + Retry-After. 0: 2 x max_batch_size x context.
    max_cache_tokens: int = 0
    session_ttl_s: float = 600.0  # a document's cache is dropped after this long without a round


@dataclass
class LimitsConfig:
    """What one request may ask for; anything beyond gets a 4xx naming the field."""

    max_prompt_chars: int = 8000
    max_input_images: int = 4
    max_image_bytes: int = 4 * 1024 * 1024  # decoded size of one base64 input image
    max_image_pixels: int = 4096 * 4096  # refuses decompression bombs before decoding
    max_new_tokens: int = 512
    max_images: int = 4  # images generated per document
    max_images_per_request: int = 4  # /v1/images `n`
    max_inference_steps: int = 100
    max_guidance_scale: float = 30.0
    # The whole HTTP body, checked before it is read (pipelines/serve/guard.py): room for
    # max_input_images images of max_image_bytes in base64 (4/3 larger) plus the prompt.
    max_body_bytes: int = 24 * 1024 * 1024


@dataclass
class DefaultsConfig:
    """Sampling defaults for fields a request leaves out (None: take the model config's)."""

    max_new_tokens: int = 64
    max_images: int = 2
    temperature: float = 0.8
    top_p: float = 0.95
    num_inference_steps: int | None = None  # None: ModelConfig.decoder.num_inference_steps
    guidance_scale: float | None = None  # None: ModelConfig.decoder.guidance_scale


@dataclass
class AuthConfig:
    """Bearer-key authentication of /v1/*; without a key the server is loopback-only."""

    api_key_file: str | None = None  # a file holding the key (first line)
    api_key_env: str = "DREAMCORE_API_KEY"  # or an environment variable of the ingress replica


def _llm_defaults() -> LLMSettings:
    # Text is cheap per token and batched: one replica carries many concurrent documents.
    return LLMSettings(
        autoscaling=AutoscalingSettings(
            min_replicas=1, max_replicas=2, target_ongoing_requests=8, upscale_delay_s=10,
            downscale_delay_s=120, look_back_period_s=10, metrics_interval_s=2,
        ),
        max_ongoing_requests=16, max_queued_requests=64, num_cpus=0.25, max_batch_size=8,
    )


def _decoder_defaults() -> DeploymentSettings:
    # An image costs num_inference_steps UNet calls: scale out early, on few ongoing requests.
    return DeploymentSettings(
        autoscaling=AutoscalingSettings(
            min_replicas=1, max_replicas=4, target_ongoing_requests=2, upscale_delay_s=5,
            downscale_delay_s=120, look_back_period_s=10, metrics_interval_s=2,
        ),
        max_ongoing_requests=8, max_queued_requests=32, num_cpus=0.25, max_batch_size=8,
    )


def _ingress_defaults() -> DeploymentSettings:
    # The ingress only validates and waits on the other two: many requests per replica.
    return DeploymentSettings(
        autoscaling=AutoscalingSettings(
            min_replicas=1, max_replicas=2, target_ongoing_requests=32, upscale_delay_s=10,
            downscale_delay_s=120, look_back_period_s=10, metrics_interval_s=2,
        ),
        max_ongoing_requests=64, max_queued_requests=128, num_cpus=0.1, max_batch_size=1,
    )


@dataclass
class ServeConfig:
    """Everything `dreamcore serve` needs besides the checkpoint's own config.json."""

    checkpoint: str = ""
    app_name: str = "dreamcore"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # "auto" (cuda when the replica has a GPU), "cpu", "cuda"
    dtype: str = "auto"  # weights: "auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16"
    request_timeout_s: float = 300.0  # end to end, per HTTP request (Serve answers 408 after)
    call_timeout_s: float = 120.0  # one LLM or decoder call from the ingress (504 after)
    retry_after_s: float = 2.0  # Retry-After of 503 answers under overload
    # After a replica failure: how long the ingress waits for a replica to answer a probe before
    # answering 503 at once (requests do not queue for a replica that does not exist yet).
    recovery_probe_s: float = 2.0
    llm: LLMSettings = field(default_factory=_llm_defaults)
    decoder: DeploymentSettings = field(default_factory=_decoder_defaults)
    ingress: DeploymentSettings = field(default_factory=_ingress_defaults)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.llm.max_cache_tokens < 0 or self.llm.session_ttl_s <= 0:
            raise ConfigError(f"llm.max_cache_tokens={self.llm.max_cache_tokens} must be >= 0 (0: automatic) and "
                              f"llm.session_ttl_s={self.llm.session_ttl_s} > 0")
        for name in ("llm", "decoder", "ingress"):
            res = getattr(self, name).resources
            if {"CPU", "GPU"} & set(res) or not all(isinstance(v, (int, float)) and v > 0 for v in res.values()):
                raise ConfigError(f"{name}.resources={res}: custom resources > 0 only (e.g. {{decoder_node: 1}}); "
                                  f"CPUs and GPUs are {name}.num_cpus and {name}.num_gpus")
            a = getattr(self, name).autoscaling
            if not 0 <= a.min_replicas <= a.max_replicas or a.max_replicas < 1:
                raise ConfigError(
                    f"{name}.autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                    f"got min {a.min_replicas}, max {a.max_replicas}"
                )


def load_serve_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **values: Any
) -> ServeConfig:
    """Defaults <- YAML file <- `key=value` overrides <- keyword values (key -> value, None skipped).

    The keywords are applied last by `apply_flags`, as `dreamcore serve`'s named flags are
    (pipelines/serve/cli.py): `load_serve_config(None, [], checkpoint=..., port=8001)`.
    """
    from pipelines.cli_args import apply_flags

    return apply_flags(load_config(ServeConfig(), path, overrides), values)


def deployment_options(name: str, settings: DeploymentSettings, retry_after_s: float) -> dict[str, Any]:
    """The Serve options of one deployment (`Deployment.options(**...)`, same keys as serve.yaml)."""
    a = to_dict(settings.autoscaling)
    opts: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus,
                              **({"resources": dict(settings.resources)} if settings.resources else {})},
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
        # Always an autoscaling_config (min == max pins the size) so `serve status` shows it.
        "autoscaling_config": a,
    }
    return opts
