"""DreamLLM: one causal LM that reads and writes interleaved image-text documents.

Design choices (DreamLLM, Dong et al., ICLR 2024; docs/architecture.md):
- LLM: a Hugging Face causal LM of the LLaMA family (random init from `LLMConfig`, or loaded from
  `name_or_path` by dreamcore.pretrained), embeddings sized to the tokenizer's vocabulary.
- Comprehension: CLIP vision tower -> hidden_states[select_layer], CLS dropped -> `vision_proj`
  (Linear with bias) written into the `<im_patch>` slots of the comprehension block.
- Creation: Q learned `dream_queries` written into the query slots of the dream block; the LLM's last
  hidden states there -> `cond_proj` (Linear, no bias) -> the UNet's encoder_hidden_states.
- Slots are located by the batch's slot maps, never by token id; the ids only serve to check that
  the maps and the sequence agree (a mismatch fails loudly with the counts).
- Classifier-free guidance and condition drop use the same LLM + queries run on the empty prompt.
- loss = lm_weight * CE + vm_weight * diffusion MSE. A batch without dream blocks gets an explicit
  zero vm_loss that still touches the creation parameters, so DDP/DeepSpeed see a gradient for every
  trainable parameter without a dummy forward.
- What trains is set by `apply_stage` (stage + the freeze flags of the vision encoder and decoder).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from dreamcore.config import STAGES, ConfigError, LLMConfig, ModelConfig, VisionConfig
from dreamcore.decoder import DiffusionDecoder
from dreamcore.pretrained import load_components

COMPONENTS = ("llm", "vision", "projectors", "decoder")
# Parameter groups by component (`DreamLLM.named_groups`): logs, and per-group learning rates.
PARAM_GROUPS = ("llm", "vision", "vision_proj", "cond_proj", "decoder", "dream_queries")
IGNORE_INDEX = -100
# CLIP's preprocessing constants (openai/clip-vit-*), applied in-model so batches stay uint8.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PlaceholderMismatchError(ValueError):
    """The slot maps of a batch do not agree with the `<im_patch>` tokens of its sequences."""


# ----------------------------------------------------------------------------------------------
# Components from config (random init); weights by path: dreamcore.pretrained


def llm_from_config(cfg: LLMConfig, tokenizer: Any) -> LlamaForCausalLM:
    if cfg.num_heads < 1 or cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"llm.hidden_size={cfg.hidden_size} must be a multiple of llm.num_heads={cfg.num_heads}")
    conf = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        tie_word_embeddings=False,
    )
    conf._attn_implementation = cfg.attn_implementation
    # from_config, not the constructor: under ZeRO-3 (a live HfDeepSpeedConfig, see the trainer)
    # transformers builds the parameters straight into partitions (deepspeed.zero.Init).
    return AutoModelForCausalLM.from_config(conf)


def vision_from_config(cfg: VisionConfig) -> CLIPVisionModel:
    conf = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    return AutoModel.from_config(conf)  # a CLIPVisionModel; from_config as for the LLM


class DreamLLM(nn.Module):
    """LLM + CLIP tower + projectors + dream queries + diffusion decoder.

    `components` picks the parts to build (a text server skips "decoder", an image server keeps
    only "decoder"); `modules` hands in already built ones ({"llm", "vision", "decoder"}: used by
    checkpoint loading). Parts not handed in are loaded from their `name_or_path` when it is set
    (dreamcore.pretrained, in `load_dtype`), else built from config.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: Any,
        components: Sequence[str] = COMPONENTS,
        modules: dict[str, nn.Module] | None = None,
        load_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown component {unknown[0]!r}; choose from {', '.join(COMPONENTS)}")
        self.cfg = cfg
        self.components = tuple(components)
        # ZeRO-3 gathers a module's parameters with collectives when the module runs, so every rank
        # must run the same modules in the same order each step, whatever its batch holds. The
        # trainer sets this under ZeRO-3: a part the batch does not need (no image to read, no image
        # to draw, no condition dropped) then runs on a stand-in and adds an exact zero.
        self.same_modules_on_every_rank = False
        self.special = _special_ids(tokenizer)
        modules = dict(modules or {})
        modules.update(load_components(cfg, [c for c in components if c not in modules], load_dtype))

        self.llm: PreTrainedModel | None = None
        self.vision: CLIPVisionModel | None = None
        self.decoder: DiffusionDecoder | None = None
        if "llm" in components:
            self.llm = modules["llm"] if "llm" in modules else llm_from_config(cfg.llm, tokenizer)
            _fit_vocab(self.llm, tokenizer)
            if cfg.llm.gradient_checkpointing:
                self.llm.gradient_checkpointing_enable()
        if "vision" in components:
            self.vision = modules["vision"] if "vision" in modules else vision_from_config(cfg.vision)
            _check_vision(self.vision, cfg.vision)
        if "decoder" in components:
            self.decoder = (modules["decoder"] if "decoder" in modules
                            else DiffusionDecoder.from_config(cfg.decoder))

        # Projectors: sizes derived from the modules when present, else from config.
        d_llm = self.llm.config.hidden_size if self.llm is not None else cfg.llm.hidden_size
        d_vis = self.vision.config.hidden_size if self.vision is not None else cfg.vision.hidden_size
        d_cond = (self.decoder.unet.config.cross_attention_dim if self.decoder is not None
                  else cfg.decoder.cross_attention_dim)
        self.vision_proj: nn.Linear | None = None
        self.dream_queries: nn.Parameter | None = None
        self.cond_proj: nn.Linear | None = None
        if "projectors" in components:
            self.vision_proj = nn.Linear(d_vis, d_llm, bias=True)
            self.dream_queries = nn.Parameter(torch.randn(cfg.dream.num_queries, d_llm) * 0.02)  # (Q, D)
            self.cond_proj = nn.Linear(d_llm, d_cond, bias=False)
        self.num_queries = cfg.dream.num_queries
        self.num_patches = cfg.vision.num_tokens
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        apply_stage(self, cfg.stage)

    # ------------------------------------------------------------------------------------------
    # Pieces shared by training and generation

    def _require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise RuntimeError(
                f"this DreamLLM was built without {', '.join(missing)} (components={self.components}); "
                "load the checkpoint with those components"
            )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, 3, S, S) CLIP-normalised at vision.image_size."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        size = self.vision.config.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.clip_mean) / self.clip_std
        return x.to(self.vision.dtype)

    def decoder_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, 3, R, R) in [-1, 1] at decoder.resolution."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        r = self.decoder.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0, 1) * 2 - 1

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, N, D) projected patch features for the comprehension slots."""
        self._require("vision", "vision_proj")
        out = self.vision(pixel_values=self.clip_pixels(images), output_hidden_states=True)
        feats = out.hidden_states[self.cfg.vision.select_layer]  # (K, 1+P, Dv)
        if self.cfg.vision.drop_cls:
            feats = feats[:, 1:]
        return self.vision_proj(feats.to(self.vision_proj.weight.dtype))  # (K, N, D)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      **kwargs: Any) -> Any:
        """The LLM body (no LM head) -> outputs with `.last_hidden_state`.

        `cache=` is a transformers Cache updated in place (KV cache for generation); transformers
        renamed the argument from `past_key_values` to `cache` in 5.x, both are handled here.
        """
        body = self.llm.get_decoder()
        cache = kwargs.pop("cache", None)
        if cache is not None:
            kwargs["cache" if _takes_cache_kwarg(body) else "past_key_values"] = cache
            kwargs["use_cache"] = True
        return body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def empty_prompt_conditions(self) -> torch.Tensor:
        """(Q, C) dream condition of the empty prompt: CFG's unconditional branch, condition drop."""
        self._require("llm", "dream_queries", "cond_proj")
        s = self.special
        ids = [s["bos_id"], s["dream_start_id"]] if s["bos_id"] is not None else [s["dream_start_id"]]
        ids_t = torch.tensor([ids], device=self.dream_queries.device)
        embeds = torch.cat([self.embed_tokens(ids_t)[0], self.dream_queries.to(self.embed_dtype)])  # (L+Q, D)
        h = self.hidden_states(embeds.unsqueeze(0), None).last_hidden_state[0, len(ids):]  # (Q, D)
        return self.cond_proj(h.to(self.cond_proj.weight.dtype))

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------------------------------
    # Training forward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch (docs/architecture.md "Batch") -> {"loss", "lm_loss", "vm_loss"}."""
        self._require("llm", "vision", "vision_proj", "dream_queries", "cond_proj", "decoder")
        input_ids, labels = batch["input_ids"], batch["labels"]
        images, image_slots, dream_slots = batch["images"], batch["image_slots"], batch["dream_slots"]
        position_ids = batch.get("position_ids")
        if position_ids is None or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"batch['position_ids'] is {'missing' if position_ids is None else tuple(position_ids.shape)}; "
                f"it must be (B, T) = {tuple(input_ids.shape)} like input_ids, restarting at 0 at each packed "
                "document: build batches with dreamcore.batch.decode_batch"
            )
        B, T = input_ids.shape
        self._check_slots(input_ids, images, image_slots, dream_slots)

        # 1. Token embeddings, then the slot contents written over the <im_patch> placeholders.
        embeds = self.embed_tokens(input_ids)  # (B, T, D)
        D = embeds.shape[-1]
        flat = embeds.reshape(B * T, D)
        ib, im = (image_slots >= 0).nonzero(as_tuple=True)  # comprehension blocks
        stand_in = 0.0  # exact zeros from parts this batch does not use (see same_modules_on_every_rank)
        if ib.numel():
            feats = self.encode_images(images[ib, im])  # (K, N, D)
            pos = _slot_positions(ib, image_slots[ib, im], self.num_patches, T)  # (K*N,)
            flat = flat.index_copy(0, pos, feats.reshape(-1, D).to(flat.dtype))
        elif self.same_modules_on_every_rank:
            stand_in = self.encode_images(images.new_zeros((1, *images.shape[2:]))).sum().float() * 0.0
        db, dm = (dream_slots >= 0).nonzero(as_tuple=True)  # dream blocks
        qpos = _slot_positions(db, dream_slots[db, dm], self.num_queries, T)
        if db.numel():
            queries = self.dream_queries.to(flat.dtype).repeat(db.numel(), 1)  # (K*Q, D)
            flat = flat.index_copy(0, qpos, queries)
        embeds = flat.view(B, T, D)

        # 2. The LLM; its last hidden states feed both the LM head and the dream conditions.
        # Per-document attention in packed rows: with positions restarting at each document and no 2D
        # mask, transformers builds the block-diagonal causal mask itself (masking_utils
        # find_packed_sequence_indices; sdpa, eager, flex and flash varlen alike). Rows of one document
        # count 0..T-1, so no mask is built and sdpa keeps its is_causal fast path. Padding is last and
        # attention causal, so no real token sees padding: the batch's attention_mask is not needed.
        # use_cache=False is required: config.use_cache (True) would give the body a DynamicCache, and
        # with a cache transformers skips the packed-sequence detection (plain causal mask over the row).
        h = self.hidden_states(embeds, None, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, D)
        logits = self.llm.get_output_embeddings()(h[:, :-1])  # (B, T-1, V)
        targets = labels[:, 1:]
        n_targets = (targets != IGNORE_INDEX).sum()
        if n_targets > 0:
            lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                      ignore_index=IGNORE_INDEX)
        else:
            lm_loss = logits.sum() * 0.0
        if not ib.numel():  # no comprehension block: keep the vision side in the graph, at zero
            lm_loss = lm_loss + (stand_in if self.same_modules_on_every_rank else _zero_touch(self._vision_params()))

        # 3. Dream conditions -> diffusion loss on the images that have a dream block.
        if db.numel():
            cap = self.cfg.loss.vm_max_images
            if self.training and 0 < cap < db.numel():  # a uniform subset of the dream images
                keep = torch.randperm(db.numel(), device=db.device)[:cap].sort().values
                db, dm = db[keep], dm[keep]
                qpos = qpos.view(-1, self.num_queries)[keep].reshape(-1)
            cond = self.cond_proj(h.reshape(B * T, D)[qpos].view(-1, self.num_queries, D))  # (K, Q, C)
            cond = self._drop_conditions(cond)
            vm_loss = self.decoder.loss(self.decoder_pixels(images[db, dm]), cond)
        elif self.same_modules_on_every_rank:  # the creation path on a stand-in, at zero
            # Its noise and timesteps come from a forked RNG: the run's random streams stay as
            # they would be without the stand-in.
            with torch.random.fork_rng(devices=[images.device.index or 0] if images.is_cuda else []):
                cond = self.cond_proj(h.reshape(B * T, D)[:1].expand(self.num_queries, D).unsqueeze(0))
                cond = self._drop_conditions(cond)
                stand_in_pixels = self.decoder_pixels(images.new_zeros((1, *images.shape[2:])))
                vm_loss = self.decoder.loss(stand_in_pixels, cond) * 0.0
        else:
            vm_loss = _zero_touch(self._creation_params()).float()
        loss = self.cfg.loss.lm_weight * lm_loss + self.cfg.loss.vm_weight * vm_loss
        return {"loss": loss, "lm_loss": lm_loss.detach(), "vm_loss": vm_loss.detach()}

    def _drop_conditions(self, cond: torch.Tensor) -> torch.Tensor:
        """Training-time condition drop: each condition is replaced by the empty prompt's with p."""
        p = self.cfg.decoder.condition_drop_prob
        if not self.training or p <= 0:
            return cond
        drop = torch.rand(cond.shape[0], device=cond.device) < p
        if not drop.any() and not self.same_modules_on_every_rank:
            return cond
        return torch.where(drop.view(-1, 1, 1), self.empty_prompt_conditions().to(cond.dtype), cond)

    def _creation_params(self) -> list[nn.Parameter]:
        params = [self.dream_queries, *self.cond_proj.parameters(), *self.decoder.parameters()]
        return [p for p in params if p.requires_grad]

    def _vision_params(self) -> list[nn.Parameter]:
        return [p for p in [*self.vision_proj.parameters(), *self.vision.parameters()] if p.requires_grad]

    def _check_slots(self, input_ids: torch.Tensor, images: torch.Tensor, image_slots: torch.Tensor,
                     dream_slots: torch.Tensor) -> None:
        """Fail loudly, with the counts, when slot maps, images and placeholders disagree."""
        B, T = input_ids.shape
        if images.dim() != 5 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise PlaceholderMismatchError(
                f"batch['images'] must be uint8 (B, M, H, W, 3); got {images.dtype} {tuple(images.shape)}"
            )
        if image_slots.shape != dream_slots.shape or image_slots.shape != images.shape[:2] or images.shape[0] != B:
            raise PlaceholderMismatchError(
                f"batch shapes disagree: input_ids {tuple(input_ids.shape)}, images {tuple(images.shape[:2])} "
                f"(B, M), image_slots {tuple(image_slots.shape)}, dream_slots {tuple(dream_slots.shape)}; "
                "all must share B, and images/slot maps must share M"
            )
        n_img = (image_slots >= 0).sum(1)
        n_dream = (dream_slots >= 0).sum(1)
        expected = n_img * self.num_patches + n_dream * self.num_queries  # (B,)
        found = (input_ids == self.special["im_patch_id"]).sum(1)
        ends = torch.cat([
            (image_slots + self.num_patches)[image_slots >= 0], (dream_slots + self.num_queries)[dream_slots >= 0]
        ])
        bad = (expected != found).nonzero(as_tuple=True)[0]
        if bad.numel() or (ends.numel() and int(ends.max()) > T):
            b = int(bad[0]) if bad.numel() else int(((image_slots + self.num_patches > T)
                                                     | (dream_slots + self.num_queries > T)).any(1).nonzero()[0])
            raise PlaceholderMismatchError(
                f"sample {b}: input_ids hold {int(found[b])} <im_patch> placeholders (length {T}) but the slot "
                f"maps describe {int(n_img[b])} comprehension blocks x {self.num_patches} + {int(n_dream[b])} "
                f"dream blocks x {self.num_queries} = {int(expected[b])}; image_slots={image_slots[b].tolist()} "
                f"dream_slots={dream_slots[b].tolist()}. Re-tokenize with a tokenizer whose num_image_tokens/"
                "num_dream_queries match vision.num_tokens/dream.num_queries"
            )
        # Every placeholder must sit inside a block the maps name (catches shifted slot maps).
        mask = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        for slots, n in ((image_slots, self.num_patches), (dream_slots, self.num_queries)):
            b_idx, m_idx = (slots >= 0).nonzero(as_tuple=True)
            if b_idx.numel():
                mask.view(-1)[_slot_positions(b_idx, slots[b_idx, m_idx], n, T)] = True
        stray = (input_ids == self.special["im_patch_id"]) & ~mask
        if stray.any():
            b = int(stray.any(1).nonzero()[0])
            raise PlaceholderMismatchError(
                f"sample {b}: {int(stray[b].sum())} <im_patch> placeholders lie outside the blocks named by "
                f"image_slots={image_slots[b].tolist()} dream_slots={dream_slots[b].tolist()}; the slot maps do "
                "not point at the first slot of each block"
            )

    # ------------------------------------------------------------------------------------------
    # Introspection

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """{component: {"total": n, "trainable": n}} for logs and the run manifest."""
        out: dict[str, dict[str, int]] = {}
        for name, params in self.named_groups().items():
            out[name] = {"total": sum(p.numel() for p in params),
                         "trainable": sum(p.numel() for p in params if p.requires_grad)}
        out["all"] = {k: sum(v[k] for v in out.values()) for k in ("total", "trainable")}
        return out

    def named_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        for name in PARAM_GROUPS[:-1]:
            module = getattr(self, name)
            if module is not None:
                groups[name] = list(module.parameters())
        if self.dream_queries is not None:
            groups["dream_queries"] = [self.dream_queries]
        return groups


# ----------------------------------------------------------------------------------------------
# What trains


def apply_stage(model: DreamLLM, stage: str) -> DreamLLM:
    """Set requires_grad for a training stage (DreamLLM section 3; see config.STAGES).

    - "I": both of stage I's parts in one run (LLM frozen): creation and comprehension pairs.
    - "I-creation": dream queries + condition projector (LLM frozen).
    - "I-comprehension": vision projector (LLM frozen).
    - "II", "SFT": LLM, both projectors, dream queries.
    The CLIP tower trains only when vision.freeze is False, the UNet only when decoder.freeze is
    False (the tiny preset: nothing in it is pretrained) and only in stages that use it; the VAE
    never trains. CLIP layers after `select_layer` (and its post-layernorm) never receive a gradient,
    so they stay frozen too: DDP/DeepSpeed would otherwise wait for their gradients.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    cfg = model.cfg
    creation = stage in ("I", "I-creation", "II", "SFT")
    comprehension = stage in ("I", "I-comprehension", "II", "SFT")
    model.requires_grad_(False)
    if model.llm is not None:
        model.llm.requires_grad_(stage in ("II", "SFT"))
    if model.vision_proj is not None:
        model.vision_proj.requires_grad_(comprehension)
        model.dream_queries.requires_grad_(creation)
        model.cond_proj.requires_grad_(creation)
    if model.vision is not None and comprehension and not cfg.vision.freeze:
        for p in _vision_used_params(model.vision, cfg.vision.select_layer):
            p.requires_grad_(True)
    if model.decoder is not None and creation and not cfg.decoder.freeze:
        model.decoder.unet.requires_grad_(True)
    model.stage = stage
    return model


def _vision_used_params(vision: CLIPVisionModel, select_layer: int) -> Iterable[nn.Parameter]:
    """Parameters on the path to hidden_states[select_layer]: embeddings, pre-LN, the first layers."""
    vm = getattr(vision, "vision_model", vision)  # transformers 5 flattened CLIPVisionModel
    n_layers = len(vm.encoder.layers)
    used = select_layer % (n_layers + 1)  # hidden_states[i] = output after i layers
    yield from vm.embeddings.parameters()
    yield from vm.pre_layrnorm.parameters()
    for layer in vm.encoder.layers[:used]:
        yield from layer.parameters()


# ----------------------------------------------------------------------------------------------
# Helpers


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    names = ("pad_id", "bos_id", "eos_id", "im_start_id", "im_patch_id", "im_end_id",
             "dream_start_id", "dream_end_id")
    missing = [n for n in names if not hasattr(tokenizer, n)]
    if missing:
        raise TypeError(f"tokenizer lacks {', '.join(missing)}; pass a dreamcore.tokenizer.DreamTokenizer")
    return {n: getattr(tokenizer, n) for n in names}


def _fit_vocab(llm: PreTrainedModel, tokenizer: Any) -> None:
    """Resize embeddings to the tokenizer (it adds DreamLLM's special tokens to the base vocab)."""
    weight = llm.get_input_embeddings().weight
    if getattr(weight, "ds_shape", weight.shape)[0] != tokenizer.vocab_size:  # ds_shape: a ZeRO-3 partition
        llm.resize_token_embeddings(tokenizer.vocab_size)


def _check_vision(vision: CLIPVisionModel, cfg: VisionConfig) -> None:
    c = vision.config
    n = (c.image_size // c.patch_size) ** 2 + (0 if cfg.drop_cls else 1)
    if n != cfg.num_tokens:
        raise ConfigError(
            f"the vision encoder makes {n} tokens per image ({c.image_size}px / patch {c.patch_size}) but "
            f"vision.image_size={cfg.image_size}, vision.patch_size={cfg.patch_size} give {cfg.num_tokens}; "
            f"set vision.image_size={c.image_size} vision.patch_size={c.patch_size} (the tokenizer's slot "
            "count follows the config)"
        )


def _takes_cache_kwarg(module: nn.Module) -> bool:
    return "cache" in inspect.signature(module.forward).parameters


def _slot_positions(b: torch.Tensor, start: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """Flat (b*T + start + j) positions of n consecutive slots per block -> (K*n,)."""
    offs = torch.arange(n, device=start.device)
    return ((b * T + start).unsqueeze(1) + offs).reshape(-1)


def _zero_touch(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """An exact zero that depends on `params` (every one gets a zero gradient)."""
    if not params:
        return torch.zeros(())
    return sum(p.sum() for p in params) * 0.0
