"""Checkpoints as folders of the ecosystem's own formats: `save_pretrained` / `from_pretrained`.

A dreamcore checkpoint folder (format_version 2):
    config.json            {"format_version", "components", "model": ModelConfig as a dict}
    llm/                   transformers: LlamaForCausalLM.save_pretrained, with the tokenizer's files
                           (AutoModelForCausalLM / AutoTokenizer / an LLM server load it as it is)
    vision/                transformers: CLIPVisionModel.save_pretrained
    unet/ vae/ scheduler/  diffusers: UNet2DConditionModel, AutoencoderKL (when the decoder has one),
                           the DDPM noise schedule (DDPMScheduler; DDIM samples from the same betas)
    projectors.safetensors dreamcore's own pieces: vision_proj.*, dream_queries, cond_proj.*
    tokenizer/             DreamTokenizer.save_pretrained (the HF files plus the slot counts)

Each part loads with its own library's class, so a checkpoint never needs the weights it was first
built from (`llm.name_or_path` etc. may name hub ids that are not reachable here). Each component
loads on its own, so the text server skips the decoder and the image server keeps only the decoder.
Folders of format_version 1 (one safetensors file per component, architectures in config.json)
are still read.

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

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
PROJECTORS_FILE = "projectors.safetensors"
# The folders of each component in format 2 (the VAE only when the decoder has one).
FOLDERS = {"llm": ("llm",), "vision": ("vision",), "decoder": ("unet", "scheduler")}


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or not a dreamcore checkpoint; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Save


def save_pretrained(model: DreamLLM, tokenizer: DreamTokenizer, directory: str | Path) -> Path:
    """Write config.json, each component in its library's format, the projectors and tokenizer/."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _quiet_progress()
    if model.llm is not None:
        model.llm.save_pretrained(directory / "llm")
        tokenizer.hf.save_pretrained(str(directory / "llm"))  # AutoTokenizer.from_pretrained(llm/)
    if model.vision is not None:
        model.vision.save_pretrained(directory / "vision")
    if model.vision_proj is not None:
        state = {f"vision_proj.{k}": v for k, v in model.vision_proj.state_dict().items()}
        state.update({f"cond_proj.{k}": v for k, v in model.cond_proj.state_dict().items()})
        state["dream_queries"] = model.dream_queries.data
        _save(state, directory / PROJECTORS_FILE)
    if model.decoder is not None:
        dec = model.decoder
        dec.unet.save_pretrained(directory / "unet")
        if dec.vae is not None:
            dec.vae.save_pretrained(directory / "vae")
        dec.train_scheduler.save_pretrained(directory / "scheduler")
    meta = {"format_version": FORMAT_VERSION, "components": list(model.components), "model": to_dict(model.cfg)}
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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format_version {version!r}; this dreamcore reads {', '.join(map(str, READABLE_VERSIONS))}. "
            "Is it a dreamcore checkpoint folder? Re-save it with dreamcore.checkpoint.save_pretrained"
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
    version = meta["format_version"]
    if version == 1:
        files = {c: directory / f"{c}.safetensors" for c in components}
        missing = [p.name for p in files.values() if not p.is_file()]
    else:
        needed = [f for c in components for f in FOLDERS.get(c, ())]
        missing = [f"{f}/" for f in needed if not (directory / f / CONFIG_FILE).is_file()
                   and not (directory / f / "scheduler_config.json").is_file()]
        if "projectors" in components and not (directory / PROJECTORS_FILE).is_file():
            missing.append(PROJECTORS_FILE)
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
    if version == 1:
        with _skip_random_init():  # every weight is overwritten below; a 7B random init costs minutes
            model = _build_skeleton(cfg, tokenizer, meta["architectures"], components)
        for name in components:
            _load_into(model, name, files[name])
    else:
        model = DreamLLM(cfg, tokenizer, components=components, modules=_load_folders(directory, cfg, components))
        if "projectors" in components:
            _load_into(model, "projectors", directory / PROJECTORS_FILE)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def _load_folders(directory: Path, cfg: ModelConfig, components: tuple[str, ...]) -> dict[str, nn.Module]:
    """The components of a format-2 folder, each loaded by its own library's class."""
    modules: dict[str, nn.Module] = {}
    try:
        _quiet_progress()
        if "llm" in components:
            modules["llm"] = _strict(AutoModelForCausalLM, directory / "llm",
                                     attn_implementation=cfg.llm.attn_implementation)
        if "vision" in components:
            modules["vision"] = _strict(CLIPVisionModel, directory / "vision")
        if "decoder" in components:
            unet = _strict(UNet2DConditionModel, directory / "unet")
            vae = _strict(AutoencoderKL, directory / "vae") if (directory / "vae").is_dir() else None
            scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
            modules["decoder"] = DiffusionDecoder(cfg.decoder, unet, vae, scheduler)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: a component folder does not load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]}); re-save the checkpoint") from None
    return modules


def _quiet_progress() -> None:
    """No per-file progress bars from transformers/diffusers: a server loads a checkpoint per replica
    and a training job exports one per stage; the bars only fill their logs."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def _strict(cls: Any, folder: Path, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained(folder)`, refusing weights that do not fit its config.json (the libraries
    only warn, and fill what is missing with random values)."""
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    bad = {k: list(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{folder}: weights do not fit its {CONFIG_FILE} ({bad}); the folder belongs to "
                              "another model or was edited")
    return model


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
