"""Pretrained components by path: every transformers / diffusers `from_pretrained` call of dreamcore.

`<component>.name_or_path` names a local folder (save_pretrained output) or a hub id; with
HF_HUB_OFFLINE=1 only local folders and hub ids already in the cache load. The LLM and the CLIP
vision tower are plain transformers folders; the decoder is a Stable Diffusion folder or hub id whose
`unet/`, `vae/` (when decoder.use_vae) and `scheduler/` subfolders are read (its text encoder never
is). `load_components(cfg)` is what DreamLLM calls when a model is first built; dreamcore's own
checkpoint folders are read by dreamcore.checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, PreTrainedModel

from dreamcore.config import ConfigError, DecoderConfig, ModelConfig
from dreamcore.decoder import DiffusionDecoder

LOADABLE = ("llm", "vision", "decoder")


def load_components(cfg: ModelConfig, components: Sequence[str] = LOADABLE,
                    dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """The listed components that have a `name_or_path`, loaded from it in `dtype`.

    Components without a path are left out (DreamLLM builds those from config). Every load goes
    through the meta device (no random init first) and lands in `dtype` directly, so a bf16 run
    never holds an fp32 copy of a pretrained part; the checkpoint's own dtype (Vicuna's config says
    float16) is never taken silently. Under ZeRO-3 (a live transformers HfDeepSpeedConfig, see
    pipelines/train/loop.py) transformers loads the LLM straight into partitions (zero.Init).
    """
    out: dict[str, nn.Module] = {}
    if "llm" in components and cfg.llm.name_or_path:
        out["llm"] = load_llm(cfg.llm.name_or_path, cfg.llm.attn_implementation, dtype)
    if "vision" in components and cfg.vision.name_or_path:
        out["vision"] = load_vision(cfg.vision.name_or_path, dtype)
    if "decoder" in components and cfg.decoder.name_or_path:
        out["decoder"] = load_decoder(cfg.decoder, dtype=dtype)
    return out


def load_llm(name_or_path: str, attn_implementation: str = "sdpa",
             dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM (the LLaMA family) from a transformers folder or hub id."""
    return _hf_load("llm", name_or_path, AutoModelForCausalLM, attn_implementation=attn_implementation, dtype=dtype)


def load_vision(name_or_path: str, dtype: torch.dtype = torch.float32) -> CLIPVisionModel:
    """A CLIP vision tower from a transformers folder or hub id (a full CLIP folder works too)."""
    return _hf_load("vision", name_or_path, CLIPVisionModel, dtype=dtype)


def load_decoder(cfg: DecoderConfig, name_or_path: str | None = None,
                 dtype: torch.dtype = torch.float32) -> DiffusionDecoder:
    """A Stable Diffusion folder or hub id: `unet/`, `vae/` (when cfg.use_vae), `scheduler/`."""
    path = name_or_path or cfg.name_or_path
    if not path:
        raise ConfigError("decoder.name_or_path is unset; set it to a Stable Diffusion folder or hub id")
    low_mem = {"torch_dtype": dtype, "low_cpu_mem_usage": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **low_mem)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **low_mem) if cfg.use_vae else None
        sched = DDPMScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load the decoder from decoder.name_or_path={path!r} ({_first_line(e)}). It must be a Stable "
            "Diffusion folder or hub id with unet/, scheduler/ (and vae/ when decoder.use_vae=true); "
            "with HF_HUB_OFFLINE=1 only local folders and cached hub ids work"
        ) from None
    if unet.config.cross_attention_dim != cfg.cross_attention_dim:
        raise ConfigError(
            f"decoder.cross_attention_dim={cfg.cross_attention_dim} but the UNet in {path} expects "
            f"{unet.config.cross_attention_dim}; set decoder.cross_attention_dim={unet.config.cross_attention_dim}"
        )
    # Sampling settings from the pipeline's scheduler folder win over the generic defaults; a scheduler
    # config without prediction_type (older diffusers wrote none) takes the configured one.
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    sched.setdefault("prediction_type", cfg.prediction_type)
    return DiffusionDecoder(cfg, unet, vae, sched)


def _hf_load(component: str, path: str, cls: Any, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load {component}.name_or_path={path!r}: {_first_line(e)}. Use a local folder holding "
            "config.json and weights (save_pretrained output) or a hub id already in the local cache "
            f"(HF_HUB_OFFLINE=1 forbids downloads); unset {component}.name_or_path to build it from config"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
