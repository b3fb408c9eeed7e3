"""dreamcore's own checkpoints as plain files: `save_pretrained` / `from_pretrained` of a folder.

A dreamcore checkpoint folder:
    config.json            {"format_version", "model": ModelConfig as a dict,
                            "architectures": the HF/diffusers configs of llm, vision, unet, vae, scheduler}
    llm.safetensors        LlamaForCausalLM state dict
    vision.safetensors     CLIPVisionModel state dict
    projectors.safetensors vision_proj.*, dream_queries, cond_proj.*
    decoder.safetensors    unet.*, vae.* (the VAE only when one is used)
    tokenizer/             DreamTokenizer.save_pretrained

The architecture configs make a checkpoint self-contained: loading it never needs the original
weights (`llm.name_or_path` etc. may name hub ids that are not reachable). Each component loads on
its own, so the text server skips the decoder and the image server keeps only the decoder.

Pretrained components named by `name_or_path` (a first build from hub weights) are loaded by
dreamcore.pretrained, not here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from dreamcore.config import ModelConfig, model_config_from_dict, to_dict
from dreamcore.decoder import DiffusionDecoder
from dreamcore.model import COMPONENTS, DreamLLM
from dreamcore.tokenizer import DreamTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or not a dreamcore checkpoint; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Save


def save_pretrained(model: DreamLLM, tokenizer: DreamTokenizer, directory: str | Path) -> Path:
    """Write config.json, one safetensors file per component present, and tokenizer/."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch: dict[str, Any] = {}
    if model.llm is not None:
        arch["llm"] = model.llm.config.to_dict()
        _save(model.llm.state_dict(), directory / "llm.safetensors")
    if model.vision is not None:
        arch["vision"] = model.vision.config.to_dict()
        _save(model.vision.state_dict(), directory / "vision.safetensors")
    if model.vision_proj is not None:
        state = {f"vision_proj.{k}": v for k, v in model.vision_proj.state_dict().items()}
        state.update({f"cond_proj.{k}": v for k, v in model.cond_proj.state_dict().items()})
        state["dream_queries"] = model.dream_queries.data
        _save(state, directory / "projectors.safetensors")
    if model.decoder is not None:
        dec = model.decoder
        arch["unet"] = dict(dec.unet.config)
        arch["vae"] = dict(dec.vae.config) if dec.vae is not None else None
        arch["scheduler"] = dict(dec.train_scheduler.config)
        _save(dec.state_dict(), directory / "decoder.safetensors")
    meta = {"format_version": FORMAT_VERSION, "components": list(model.components),
            "model": to_dict(model.cfg), "architectures": arch}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    return directory


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage: give every tensor its own contiguous copy.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


# ----------------------------------------------------------------------------------------------
# Load


def read_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the whole config.json) of a checkpoint folder."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}: not a dreamcore checkpoint (write one with save_pretrained)"
        )
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r}, this dreamcore reads {FORMAT_VERSION}; re-save the checkpoint"
        )
    return model_config_from_dict(meta["model"]), meta


def from_pretrained(
    directory: str | Path,
    components: Sequence[str] = COMPONENTS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[DreamLLM, DreamTokenizer]:
    """Load (model, tokenizer) from a checkpoint folder; only the listed components are built."""
    directory = Path(directory)
    cfg, meta = read_config(directory)
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; choose from {', '.join(COMPONENTS)}")
    files = {c: directory / f"{c}.safetensors" for c in components}
    missing = [p.name for p in files.values() if not p.is_file()]
    if not (directory / TOKENIZER_DIR).is_dir():
        missing.append(f"{TOKENIZER_DIR}/")
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: missing {', '.join(missing)} (asked for components "
            f"{', '.join(components)}). Load fewer components or re-save the checkpoint"
        )
    tokenizer = DreamTokenizer.from_pretrained(
        directory / TOKENIZER_DIR, cfg.vision.num_tokens, cfg.dream.num_queries
    )
    arch = meta["architectures"]
    with _skip_random_init():  # every weight is overwritten below; a 7B random init costs minutes
        model = _build_skeleton(cfg, tokenizer, arch, components)
    for name in components:
        _load_into(model, name, files[name])
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def _build_skeleton(
    cfg: ModelConfig, tokenizer: DreamTokenizer, arch: dict[str, Any], components: tuple[str, ...]
) -> DreamLLM:
    """The modules of a checkpoint, built from its saved architecture configs (weights not loaded)."""
    modules: dict[str, nn.Module] = {}
    if "llm" in components:
        llm_conf = AutoConfig.for_model(arch["llm"]["model_type"], **_without(arch["llm"], "model_type"))
        modules["llm"] = AutoModelForCausalLM.from_config(llm_conf, attn_implementation=cfg.llm.attn_implementation)
    if "vision" in components:
        modules["vision"] = CLIPVisionModel(CLIPVisionConfig(**_without(arch["vision"], "model_type")))
    if "decoder" in components:
        unet = UNet2DConditionModel.from_config(arch["unet"])
        vae = AutoencoderKL.from_config(arch["vae"]) if arch["vae"] is not None else None
        modules["decoder"] = DiffusionDecoder(cfg.decoder, unet, vae, arch["scheduler"])
    return DreamLLM(cfg, tokenizer, components=components, modules=modules)


def _skip_random_init() -> Any:
    """transformers' context that turns torch.nn.init (and HF init_weights) into no-ops."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _load_into(model: DreamLLM, name: str, path: Path) -> None:
    state = load_file(str(path))
    if name == "projectors":
        target: nn.Module = _Projectors(model)
    else:
        target = getattr(model, name)
    result = target.load_state_dict(state, strict=False)
    # Non-persistent buffers are not saved; anything else missing or extra is a real mismatch.
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the {name} built from config.json (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); the file belongs to "
            "another model or was edited"
        )


class _Projectors(nn.Module):
    """A view that gives the three small projector pieces one state dict."""

    def __init__(self, model: DreamLLM) -> None:
        super().__init__()
        self.vision_proj = model.vision_proj
        self.cond_proj = model.cond_proj
        self.dream_queries = model.dream_queries


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}
