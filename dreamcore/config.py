"""Configuration: dataclasses, presets, and the one override path (YAML file, then `key=value`).

Every component owns a small dataclass; a full model configuration is `ModelConfig`, and the two
presets are plain functions (`tiny()`, `dreamllm_7b()`). Pipelines (curate, train, serve) define
their own dataclasses and load them with the same `load_config`, so the CLI has one rule for every
job: start from defaults or a preset, apply a YAML file, then `--set a.b=value` overrides.
Unknown or mistyped keys are errors that name the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

STAGES = ("I", "I-creation", "I-comprehension", "II", "SFT")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says how to fix it."""


# ----------------------------------------------------------------------------------------------
# Components


@dataclass
class LLMConfig:
    """The language model: a Hugging Face causal LM of the LLaMA family.

    `name_or_path` set: weights are loaded from a local folder or hub id (real runs).
    Unset: a LlamaForCausalLM is built from the fields below with random init (tests, demo).
    """

    name_or_path: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256
    gradient_checkpointing: bool = False
    # transformers attention kernel ("sdpa", "eager", "flex_attention", "flash_attention_2"): packed
    # rows get their per-document mask from position_ids under each; flash varlen skips the T x T mask.
    attn_implementation: str = "sdpa"


@dataclass
class VisionConfig:
    """The comprehension encoder: a CLIP vision transformer (frozen in every stage) + projector.

    DreamLLM uses CLIP ViT-L/14 at 224 px, features of the penultimate layer, CLS dropped:
    (224/14)^2 = 256 tokens of width 1024, projected linearly (with bias) to the LLM width.
    """

    name_or_path: str | None = None
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    select_layer: int = -2  # hidden_states index; -2 = penultimate layer
    drop_cls: bool = True
    # DreamLLM freezes CLIP in every stage. A randomly initialised encoder (tiny preset) has nothing
    # worth freezing, so the tiny preset trains it; any pretrained encoder stays frozen.
    freeze: bool = True

    @property
    def num_tokens(self) -> int:
        """Patch slots per image in the sequence (CLS dropped)."""
        n = (self.image_size // self.patch_size) ** 2
        return n if self.drop_cls else n + 1


@dataclass
class DreamConfig:
    """The learned dream queries whose LLM hidden states condition the diffusion decoder."""

    num_queries: int = 8


@dataclass
class DecoderConfig:
    """The image decoder: a diffusers UNet2DConditionModel, optional VAE, a noise scheduler.

    `name_or_path` set: a Stable Diffusion folder or hub id (subfolders unet/, vae/, scheduler/;
    the text encoder is never loaded). Unset: a UNet built from the fields below; without a VAE it
    works in pixel space at `resolution` (the tiny preset).
    """

    name_or_path: str | None = None
    resolution: int = 16
    use_vae: bool = False
    # A VAE built from config (use_vae, no name_or_path): its widths; n of them downscale 2^(n-1)x
    # (Stable Diffusion's AutoencoderKL: 128, 256, 512, 512 -> 8x). A loaded VAE brings its own.
    vae_block_out_channels: tuple[int, ...] = (16, 16)
    block_out_channels: tuple[int, ...] = (32, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 64  # condition width (SD 2.1: 1024)
    prediction_type: str = "epsilon"  # or "v_prediction" (SD 2.1-base is epsilon)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    # DDIM's eta: 0 = deterministic DDIM (Stable Diffusion's usual sampler), 1 = fresh noise at
    # every step, as DDPM's ancestral sampler. Per-image seeded either way.
    eta: float = 0.0
    # Two extra UNet input planes holding each pixel's (x, y) in [-1, 1] (CoordConv, Liu et al. 2018).
    # Convolutions and attention are translation-equivariant: without them a pixel learns where it
    # is only from the zero padding, and "on the left" was learned last and worst (docs/architecture.md).
    # Built-from-config decoders only: a pretrained UNet keeps its own input channels.
    coord_channels: bool = False
    # diffusers' only_cross_attention: the transformer blocks of the down/up path attend to the
    # condition twice instead of to their own pixels first; self-attention over 256 pixels was a
    # third of the tiny UNet's step (bench/train.py --profile). The mid block keeps self-attention.
    only_cross_attention: bool = False
    condition_drop_prob: float = 0.1  # training: share of conditions replaced by the empty prompt's
    # DreamLLM keeps Stable Diffusion frozen. The tiny preset's pixel-space UNet starts from random
    # init (no pretrained one exists at 16 px), so it trains; a pretrained decoder stays frozen.
    freeze: bool = True


@dataclass
class TokenizerConfig:
    """A Hugging Face tokenizer by path/hub id, or (unset) a byte-level BPE trained on the corpus."""

    name_or_path: str | None = None
    vocab_size: int = 512  # for the trained BPE only


@dataclass
class LossConfig:
    """loss = lm_weight * next-token CE + vm_weight * diffusion MSE (DreamLLM: 1.0 / 10.0)."""

    lm_weight: float = 1.0
    vm_weight: float = 10.0
    # The diffusion loss on at most this many dream images of a micro-batch, drawn uniformly (an
    # unbiased estimate of the mean over all of them); 0 = all. Packed interleaved rows hold up to
    # max_seq_len / image_block_len images each, so without a cap a document-heavy batch runs the
    # UNet several times as often as a pair batch; the LM loss still sees every image.
    vm_max_images: int = 0


@dataclass
class ModelConfig:
    """Everything needed to build (or load) a DreamLLM model and its tokenizer."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stage: str = "II"  # what trains: see dreamcore.model.apply_stage
    max_seq_len: int = 256
    max_images_per_sample: int = 0  # 0 = as many interleaved image blocks as fit in max_seq_len
    chat_template: str = "vicuna_v1"  # how instruction data (conversations) is laid out: dreamcore.chat

    def __post_init__(self) -> None:
        from dreamcore.chat import TEMPLATES

        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r} is not a stage; choose one of {', '.join(STAGES)}")
        if self.chat_template not in TEMPLATES:
            raise ConfigError(f"chat_template={self.chat_template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
        if self.loss.vm_max_images < 0:
            raise ConfigError(f"loss.vm_max_images={self.loss.vm_max_images}; give 0 (every dream image) or a "
                              "positive count")

    @property
    def image_block_len(self) -> int:
        """Tokens one interleaved image costs: dream block + comprehension block."""
        return (self.dream.num_queries + 2) + (self.vision.num_tokens + 2)

    @property
    def images_per_sample(self) -> int:
        """Fixed image capacity of one training row (batches are padded to it)."""
        return self.max_images_per_sample or max(1, self.max_seq_len // self.image_block_len)

    @property
    def image_resolution(self) -> int:
        """Resolution images are stored at in training Parquet (the larger of the two models')."""
        return max(self.vision.image_size, self.decoder.resolution)


# ----------------------------------------------------------------------------------------------
# Presets


def tiny() -> ModelConfig:
    """CPU preset: random init from config, pixel-space decoder; small enough to train on a CPU.

    Nothing here is pretrained, so the vision encoder and the decoder train with the rest.
    """
    cfg = ModelConfig()
    cfg.vision.freeze = False
    cfg.decoder.freeze = False
    # diffusers reads attention_head_dim as a head count: 2 heads of width 16 run faster on CPU than 8 of 4.
    cfg.decoder.attention_head_dim = 2
    # v-prediction: with epsilon + cosine the first sampler steps ignored the prompt (docs/architecture.md).
    cfg.decoder.prediction_type = "v_prediction"
    # Two layers per UNet block: with one, circles and squares were confused (docs/architecture.md).
    cfg.decoder.layers_per_block = 2
    # eta 1 at guidance 2: deterministic DDIM drew uncertain shapes as a blend (docs/architecture.md).
    cfg.decoder.eta = 1.0
    cfg.decoder.guidance_scale = 2.0
    return cfg


def dreamllm_7b() -> ModelConfig:
    """The paper's model: Vicuna-7B v1.1, CLIP ViT-L/14 (224 px, 256 tokens), SD 2.1-base (512 px)."""
    return ModelConfig(
        llm=LLMConfig(
            name_or_path="lmsys/vicuna-7b-v1.1",
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            max_position_embeddings=2048,
            gradient_checkpointing=True,
        ),
        vision=VisionConfig(
            name_or_path="openai/clip-vit-large-patch14",
            image_size=224,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=24,
            num_heads=16,
        ),
        dream=DreamConfig(num_queries=64),
        decoder=DecoderConfig(
            name_or_path="stabilityai/stable-diffusion-2-1-base",
            resolution=512,
            use_vae=True,
            vae_block_out_channels=(128, 256, 512, 512),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=64,
            cross_attention_dim=1024,
            prediction_type="epsilon",
            beta_schedule="scaled_linear",
            num_inference_steps=50,
            guidance_scale=7.5,
        ),
        tokenizer=TokenizerConfig(name_or_path="lmsys/vicuna-7b-v1.1"),
        loss=LossConfig(lm_weight=1.0, vm_weight=10.0),
        stage="II",
        max_seq_len=2048,
    )


def dreamllm_debug() -> ModelConfig:
    """The 7B preset's code path at widths a CPU trains: a LLaMA LLM, a CLIP ViT read at its
    penultimate layer with CLS dropped (patch 14, 16 tokens), 64 dream queries, a latent UNet with
    Stable Diffusion 2.1's block layout conditioned by cross-attention, an 8x AutoencoderKL, SD's
    scaled-linear epsilon schedule; CLIP and the decoder frozen, as pretrained ones are.

    Built from config with random weights, or, as the 7B preset is, loaded by path: set
    llm/vision/decoder/tokenizer `.name_or_path` to save_pretrained folders (a Stable Diffusion
    folder for the decoder). Tests write such folders with each library's own classes.
    """
    return ModelConfig(
        llm=LLMConfig(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_position_embeddings=512, gradient_checkpointing=True),
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=48, intermediate_size=96, num_layers=3,
                            num_heads=2),
        dream=DreamConfig(num_queries=64),
        decoder=DecoderConfig(
            resolution=64,
            use_vae=True,
            vae_block_out_channels=(8, 8, 16, 16),
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            prediction_type="epsilon",
            beta_schedule="scaled_linear",
            num_inference_steps=4,
            guidance_scale=7.5,
        ),
        tokenizer=TokenizerConfig(vocab_size=512),
        loss=LossConfig(lm_weight=1.0, vm_weight=10.0),
        stage="II",
        max_seq_len=512,
    )


PRESETS = {"tiny": tiny, "dreamllm-7b": dreamllm_7b, "dreamllm-debug": dreamllm_debug}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Dict <-> dataclass, YAML, overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/JSON/CLI value to the annotated type, or fail naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a dataclass from a dict; unknown keys raise, naming the key and the valid ones."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!r}; valid keys here: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def merge(cfg: T, data: dict[str, Any], prefix: str = "") -> T:
    """A copy of `cfg` with the (possibly nested, possibly partial) values of `data` applied."""
    hints = _hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(names)}")
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            changes[k] = merge(current, v, where)
        elif isinstance(current, dict) and isinstance(v, dict):  # a mapping field: keys merge, as fields do
            changes[k] = _coerce({**current, **v}, hints[k], where)
        else:
            changes[k] = _coerce(v, hints[k], where)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["llm.num_layers=4", "decoder.use_vae=true"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: --set llm.num_layers=4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    base: T, path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """The one override path: `base` (defaults or a preset) <- YAML file <- `key=value` overrides."""
    cfg = base
    if path is not None:
        cfg = merge(cfg, load_yaml(path))
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, data)
