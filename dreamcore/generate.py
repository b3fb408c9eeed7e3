"""Interleaved generation, split into a text side and an image side.

- Text side (`TextGenerator`, needs llm + vision + projectors): feeds the prompt (text, and images as
  comprehension blocks), samples tokens with a KV cache (temperature / top-p, one seeded
  torch.Generator) until `<dream_start>`, EOS or a limit. On `<dream_start>` it feeds the dream block
  (`<dream_start>` + Q queries + `<dream_end>`) and returns the dream conditions: the projected
  hidden states at the query positions and the empty prompt's (CFG's unconditional branch).
  `append_image` then feeds the drawn image back as a comprehension block and sampling continues.
- Image side (needs only the decoder): `decode_dreams(decoder, dreams)` -> PIL images, batching
  conditions from different requests into one DDIM run.
- `DreamConditions` holds plain CPU tensors and numbers, so a serving deployment can ship it from
  the LLM replica to the decoder replica (`to_dict` / `from_dict`).
- `generate_document` composes both in one process; `text_to_image` / `caption_image` are the two
  single-modality tasks the quality benchmark scores. A fixed seed gives the same document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from dreamcore.decoder import DiffusionDecoder, to_pil
from dreamcore.model import DreamLLM

PromptPart = str | Image.Image | np.ndarray


@dataclass
class GenerationParams:
    """Limits and sampling settings of one request (None = the decoder config's default)."""

    max_new_tokens: int = 64  # text tokens, over the whole document
    max_images: int = 2
    temperature: float = 0.8  # <= 0: greedy
    top_p: float = 0.95
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.max_images < 0:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens}, max_images={self.max_images}: limits must be >= 0"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class DreamConditions:
    """What the image side needs to draw one image: plain tensors, serialisable."""

    cond: torch.Tensor  # (Q, C) conditional: the LLM's states at the query slots, projected
    uncond: torch.Tensor  # (Q, C) unconditional: the same for the empty prompt
    seed: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cond": self.cond.float().cpu().tolist(), "uncond": self.uncond.float().cpu().tolist(),
                "seed": self.seed, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DreamConditions:
        return cls(torch.tensor(data["cond"]), torch.tensor(data["uncond"]), int(data["seed"]),
                   data.get("num_inference_steps"), data.get("guidance_scale"))


@dataclass
class TextSegment:
    """Text generated since the last image; `dream` is set when it ended at `<dream_start>`."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    dream: DreamConditions | None = None
    finished: bool = False
    stop_reason: str = ""  # "dream", "eos", "max_new_tokens", "max_seq_len"


class TextGenerator:
    """The text side of one request; keeps the context ids and the LLM's KV cache."""

    def __init__(
        self,
        model: DreamLLM,
        tokenizer: Any,
        prompt_parts: Sequence[PromptPart],
        params: GenerationParams | None = None,
        force_dream: bool = False,
    ) -> None:
        model._require("llm", "vision_proj", "dream_queries", "cond_proj")
        self.model, self.tok = model, tokenizer
        self.params = params or GenerationParams()
        self.device = model.dream_queries.device
        self.generator = torch.Generator().manual_seed(self.params.seed)
        self.limit = model.cfg.max_seq_len
        self.cache = _new_cache(model.llm.config)
        self.context_ids: list[int] = []  # every id fed so far (slots as <im_patch>)
        self.new_tokens = 0
        self.images_drawn = 0
        self.awaiting_image = False
        self.finished = False
        self._force_dream = force_dream
        self._uncond: torch.Tensor | None = None
        self._banned = [i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.im_start_id,
                                    tokenizer.im_patch_id, tokenizer.im_end_id, tokenizer.dream_end_id)
                        if i is not None]
        self._feed_prompt(prompt_parts)

    # ------------------------------------------------------------------------------------------
    # Feeding the LLM

    @torch.inference_mode()
    def _feed(self, embeds: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Append (L, D) embeddings to the cache; returns the (L, D) last hidden states."""
        out = self.model.hidden_states(embeds.unsqueeze(0).to(self.model.embed_dtype), None,
                                       cache=self.cache)
        self.context_ids.extend(ids)
        h = out.last_hidden_state[0]
        self._next_logits = self.model.llm.get_output_embeddings()(h[-1:])[0].float()  # (V,)
        return h

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.device))

    @torch.inference_mode()
    def _feed_prompt(self, parts: Sequence[PromptPart]) -> None:
        if isinstance(parts, str):
            parts = [parts]
        images = [p for p in parts if not isinstance(p, str)]
        index = iter(range(len(images)))
        enc = self.tok.encode_prompt([p if isinstance(p, str) else next(index) for p in parts])
        if len(enc.input_ids) >= self.limit:
            raise ValueError(
                f"the prompt takes {len(enc.input_ids)} tokens but the model's max_seq_len is {self.limit}; "
                "shorten the prompt or pass fewer images"
            )
        embeds = self._embed_ids(enc.input_ids)  # (L, D)
        if images:
            feats = self.model.encode_images(_as_uint8(images).to(self.device))  # (K, N, D)
            n = feats.shape[1]
            for k, slot in enumerate(enc.image_slots):
                embeds[slot:slot + n] = feats[k].to(embeds.dtype)
        self._feed(embeds, list(enc.input_ids))

    # ------------------------------------------------------------------------------------------
    # Sampling

    def _room_for_image(self) -> bool:
        return len(self.context_ids) + self.tok.dream_block_len + self.tok.image_block_len < self.limit

    def _sample(self) -> int:
        logits = self._next_logits.clone()
        logits[self._banned] = float("-inf")
        if self.images_drawn >= self.params.max_images or not self._room_for_image():
            logits[self.tok.dream_start_id] = float("-inf")
        if self.params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.params.temperature, dim=-1).cpu()
        if self.params.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.params.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def generate_text(self, on_token: Callable[[int], None] | None = None) -> TextSegment:
        """Sample until `<dream_start>` (returns the dream conditions), EOS or a limit."""
        if self.awaiting_image:
            raise RuntimeError("the last segment ended in a dream: call append_image(image) before continuing")
        if self.finished:
            return TextSegment("", finished=True, stop_reason="finished")
        ids: list[int] = []
        while True:
            if self._force_dream:
                self._force_dream = False
                token = self.tok.dream_start_id
            elif self.new_tokens >= self.params.max_new_tokens:
                return self._end(ids, "max_new_tokens")
            elif len(self.context_ids) >= self.limit:
                return self._end(ids, "max_seq_len")
            else:
                token = self._sample()
            if token == self.tok.dream_start_id:
                return TextSegment(self.tok.decode(ids), ids, dream=self._dream(), stop_reason="dream")
            if token == self.tok.eos_id:
                self.context_ids.append(token)
                return self._end(ids, "eos")
            ids.append(token)
            self.new_tokens += 1
            if on_token is not None:
                on_token(token)
            self._feed(self._embed_ids([token]), [token])

    def _end(self, ids: list[int], reason: str) -> TextSegment:
        self.finished = True
        return TextSegment(self.tok.decode(ids), ids, finished=True, stop_reason=reason)

    @torch.inference_mode()
    def _dream(self) -> DreamConditions:
        """Feed `<dream_start>` + queries + `<dream_end>`; project the states at the query slots."""
        m, q = self.model, self.model.num_queries
        ids = [self.tok.dream_start_id, *[self.tok.im_patch_id] * q, self.tok.dream_end_id]
        embeds = self._embed_ids(ids)
        embeds[1:1 + q] = m.dream_queries.to(embeds.dtype)
        h = self._feed(embeds, ids)  # (Q+2, D)
        cond = m.cond_proj(h[1:1 + q].to(m.cond_proj.weight.dtype))  # (Q, C)
        if self._uncond is None:
            self._uncond = m.empty_prompt_conditions()
        seed = self.params.seed + 1 + self.images_drawn  # one seed per image of the document
        self.images_drawn += 1
        self.awaiting_image = True
        return DreamConditions(cond.float().cpu(), self._uncond.float().cpu(), seed,
                               self.params.num_inference_steps, self.params.guidance_scale)

    @torch.inference_mode()
    def append_image(self, image: Image.Image | np.ndarray | torch.Tensor) -> None:
        """Feed a drawn image back as `<im_start>` + patch features + `<im_end>` (DreamLLM's loop)."""
        feats = self.model.encode_images(_as_uint8([image]).to(self.device))[0]  # (N, D)
        n = feats.shape[0]
        ids = [self.tok.im_start_id, *[self.tok.im_patch_id] * n, self.tok.im_end_id]
        embeds = self._embed_ids(ids)
        embeds[1:1 + n] = feats.to(embeds.dtype)
        self._feed(embeds, ids)
        self.awaiting_image = False


# ----------------------------------------------------------------------------------------------
# Image side


@torch.inference_mode()
def decode_dreams(decoder: DiffusionDecoder, dreams: Sequence[DreamConditions]) -> list[Image.Image]:
    """Draw one image per DreamConditions; requests with equal sampler settings share a DDIM batch."""
    device = next(decoder.unet.parameters()).device
    out: list[Image.Image | None] = [None] * len(dreams)
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, d in enumerate(dreams):
        groups.setdefault((d.num_inference_steps, d.guidance_scale), []).append(i)
    for (steps, scale), idx in groups.items():
        cond = torch.stack([dreams[i].cond for i in idx]).to(device)  # (K, Q, C)
        uncond = torch.stack([dreams[i].uncond for i in idx]).to(device)
        images = decoder.sample(cond, uncond, steps, scale, seed=[dreams[i].seed for i in idx])
        for i, img in zip(idx, to_pil(images)):
            out[i] = img
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Both sides in one process


def generate_document(
    model: DreamLLM, tokenizer: Any, prompt_parts: Sequence[PromptPart], params: GenerationParams | None = None
) -> list[str | Image.Image]:
    """The continuation of `prompt_parts` as interleaved text chunks and images."""
    model._require("decoder")
    gen = TextGenerator(model, tokenizer, prompt_parts, params)
    parts: list[str | Image.Image] = []
    while not gen.finished:
        seg = gen.generate_text()
        if seg.text:
            parts.append(seg.text)
        if seg.dream is not None:
            image = decode_dreams(model.decoder, [seg.dream])[0]
            parts.append(image)
            gen.append_image(image)
    return parts


def text_to_images(
    model: DreamLLM,
    tokenizer: Any,
    captions: Sequence[str],
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> list[Image.Image]:
    """One image per caption: caption, then `<dream_start>` forced; decoded as one batch."""
    model._require("decoder")
    dreams = []
    for i, caption in enumerate(captions):
        params = GenerationParams(max_new_tokens=0, max_images=1, seed=seed + i,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        dreams.append(TextGenerator(model, tokenizer, [caption], params, force_dream=True).generate_text().dream)
    return decode_dreams(model.decoder, dreams)


def text_to_image(model: DreamLLM, tokenizer: Any, caption: str, **kwargs: Any) -> Image.Image:
    return text_to_images(model, tokenizer, [caption], **kwargs)[0]


def caption_image(
    model: DreamLLM,
    tokenizer: Any,
    image: Image.Image | np.ndarray,
    prompt: str = "",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Text after the image's comprehension block (greedy by default); no image is drawn."""
    params = GenerationParams(max_new_tokens=max_new_tokens, max_images=0, temperature=temperature, seed=seed)
    parts: list[PromptPart] = [image] + ([prompt] if prompt else [])
    return TextGenerator(model, tokenizer, parts, params).generate_text().text


def _new_cache(config: Any) -> DynamicCache:
    try:
        return DynamicCache(config=config)  # transformers >= 4.56 sizes layers from the config
    except TypeError:
        return DynamicCache()


def _as_uint8(images: Sequence[Image.Image | np.ndarray | torch.Tensor]) -> torch.Tensor:
    """PIL / HxWx3 uint8 arrays -> (K, H, W, 3) uint8; sizes may differ (each is resized alike)."""
    arrays = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            a = np.asarray(img.convert("RGB"))
        elif isinstance(img, torch.Tensor):
            a = img.detach().cpu().numpy()
        else:
            a = np.asarray(img)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"image {i}: expected RGB uint8 (H, W, 3), got {a.dtype} {a.shape}")
        arrays.append(a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # stack needs one size: bring all to the largest
        size = max(max(s[0], s[1]) for s in shapes)
        arrays = [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in arrays]
    return torch.from_numpy(np.stack(arrays))
