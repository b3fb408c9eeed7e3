"""The model work behind the two model deployments, batched across concurrent requests.

TextEngine (LLMServer): continues B documents at once. Each call lays the document so far out
as DreamLLM does in training (text; a given image -> comprehension block; a generated image ->
dream block + comprehension block), left-pads the B sequences into one batch, prefills it, and
samples token by token with a shared KV cache until every row has stopped at `<dream_start>`,
EOS or its budget. Rows that stopped at `<dream_start>` then get their dream conditions in one
more batched forward (prefix + `<dream_start>` + Q dream queries -> last hidden states ->
`cond_proj`). Calls are stateless: the document travels with the request, so any replica can
continue any document.

ImageEngine (ImageDecoder): groups concurrent images by (steps, guidance scale) and runs one
`DiffusionDecoder.sample` per group, each image seeded on its own (same seed, same image, whatever
batch it lands in).

Plain Python + torch (no Ray): benchmarks call these directly as the in-process baseline.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.serve.api import RequestError

LLM_COMPONENTS = ("llm", "vision", "projectors")
DECODER_COMPONENTS = ("decoder",)


# ----------------------------------------------------------------------------------------------
# Messages between the ingress and the model deployments (pickled by Ray)


@dataclass
class TextStep:
    """Continue one document. parts: ("text", str) | ("image", file bytes) | ("generated", PNG)."""

    parts: list[tuple[str, str | bytes]]
    max_new_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    allow_dream: bool = True  # False once the request's image budget is spent
    force_dream: bool = False  # text-to-image: no sampling, <dream_start> right after the prompt


@dataclass
class TextResult:
    text: str
    stop: str  # "dream" | "eos" | "length"
    prompt_tokens: int
    new_tokens: int
    cond: np.ndarray | None = None  # (Q, C) float32 when stop == "dream"
    uncond: np.ndarray | None = None  # (Q, C) the empty prompt's, for classifier-free guidance


@dataclass
class DecodeItem:
    cond: np.ndarray  # (Q, C)
    uncond: np.ndarray | None
    num_inference_steps: int
    guidance_scale: float
    seed: int


@dataclass
class DecodedImage:
    png: bytes
    width: int
    height: int
    seed: int


# ----------------------------------------------------------------------------------------------
# Loading


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this replica sees no GPU; give it num_gpus > 0 or use device=auto")
    return torch.device(device)


def load_model(checkpoint: str, components: tuple[str, ...], device: torch.device) -> tuple[Any, Any]:
    """(DreamLLM with only `components`, DreamTokenizer) from a save_pretrained folder, in eval mode."""
    from dreamcore.checkpoint import from_pretrained

    loaded = from_pretrained(checkpoint, components=components)
    model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    model.to(device).eval()
    return model, tokenizer


def model_card(checkpoint: str) -> dict[str, Any]:
    """Id and config of a checkpoint (read from its config.json; no weights)."""
    path = Path(checkpoint)
    cfg = json.loads((path / "config.json").read_text())
    model_cfg = cfg.get("model", cfg)
    dec = model_cfg.get("decoder", {})
    return {
        "id": path.name,
        "config": model_cfg,
        "num_inference_steps": int(dec.get("num_inference_steps", 20)),
        "guidance_scale": float(dec.get("guidance_scale", 3.0)),
    }


def _rgb(data: bytes, size: int) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8 (the vision encoder's resolution)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Text side


@dataclass
class _Row:
    """One document in a batch: its embeddings, and what it has produced so far."""

    step: TextStep
    embeds: torch.Tensor  # (L, D) prompt embeddings, slots filled
    budget: int
    generator: torch.Generator
    new_ids: list[int] = field(default_factory=list)
    stop: str | None = None


class TextEngine:
    """DreamLLM without its decoder: batched continuation and dream conditions."""

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.card = model_card(checkpoint)
        self.model, self.tok = load_model(checkpoint, LLM_COMPONENTS, self.device)
        self.cfg = self.model.cfg
        self.max_len = min(self.cfg.max_seq_len, self.model.llm.config.max_position_embeddings)
        self.image_cost = self.tok.dream_block_len + self.tok.image_block_len
        with torch.no_grad():
            # The empty prompt's condition is the same for every request: compute it once.
            self.uncond = self.model.empty_prompt_conditions().float().cpu().numpy()  # (Q, C)

    def info(self) -> dict[str, Any]:
        return {**self.card, "device": str(self.device), "max_len": self.max_len}

    # -- layout ----------------------------------------------------------------------------------

    def _embed(self, parts: list[tuple[str, str | bytes]]) -> torch.Tensor:
        """Document parts -> (L, D) embeddings with query and patch slots filled.

        The layout is the tokenizer's (`encode_prompt`): a generated image keeps its dream block
        before its comprehension block, as in training; a given image has only the latter.
        """
        t = self.tok
        prompt: list[str | int] = []
        drawn: list[int] = []
        images: list[np.ndarray] = []
        for kind, value in parts:
            if kind == "text":
                prompt.append(value)
                continue
            if kind == "generated":
                drawn.append(len(images))
            prompt.append(len(images))
            images.append(_rgb(value, self.cfg.vision.image_size))
        enc = t.encode_prompt(prompt, drawn=drawn)
        ids = enc.input_ids
        query_at = [s for s in enc.dream_slots if s >= 0]
        patch_at = enc.image_slots
        ids_t = torch.tensor(ids, device=self.device)
        embeds = self.model.embed_tokens(ids_t)  # (L, D)
        for start in query_at:
            embeds[start:start + t.num_dream_queries] = self.model.dream_queries.to(embeds.dtype)
        if images:
            feats = self.model.encode_images(torch.from_numpy(np.stack(images)).to(self.device))  # (K, N, D)
            for start, f in zip(patch_at, feats):
                embeds[start:start + t.num_image_tokens] = f.to(embeds.dtype)
        return embeds

    def _forward(self, seqs: list[torch.Tensor], past: Any = None, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Left-padded batched forward of (L_i, D) sequences -> (last hidden (B, L, D), cache, mask, pos)."""
        if past is None:
            L = max(s.shape[0] for s in seqs)
            D = seqs[0].shape[1]
            x = torch.zeros(len(seqs), L, D, dtype=seqs[0].dtype, device=self.device)
            mask = torch.zeros(len(seqs), L, dtype=torch.long, device=self.device)
            for i, s in enumerate(seqs):
                x[i, L - s.shape[0]:] = s
                mask[i, L - s.shape[0]:] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens start at 0
        else:
            x = torch.stack(seqs)  # (B, 1, D)
        # transformers 5 names the KV cache `cache` (argument and output field).
        out = self.model.hidden_states(x, mask, position_ids=positions, cache=past, use_cache=True)
        return out.last_hidden_state, out.cache, mask, positions

    # -- sampling --------------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        """One token from (V,) logits with the row's temperature / top_p / generator."""
        if row.step.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / row.step.temperature, dim=-1).cpu()
        if row.step.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < row.step.top_p  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    @torch.no_grad()
    def continue_batch(self, steps: list[TextStep]) -> list[TextResult]:
        """Continue every document of the batch; see the module docstring."""
        t = self.tok
        # 1. Lay out and embed each document; refuse prompts the context cannot hold.
        rows: list[_Row] = []
        for s in steps:
            embeds = self._embed(s.parts)
            room = self.max_len - embeds.shape[0]
            if room < (self.tok.dream_block_len if s.force_dream else 1):
                raise RequestError("input", f"is {embeds.shape[0]} tokens with its images; this model takes at "
                                   f"most {self.max_len} (shorten the prompt or send fewer images)", 413)
            rows.append(_Row(s, embeds, min(s.max_new_tokens, room),
                             torch.Generator().manual_seed(int(s.seed))))
        prompt_lens = [r.embeds.shape[0] for r in rows]
        for r in rows:
            if r.step.force_dream:
                r.stop = "dream"
            elif r.budget <= 0:
                r.stop = "length"

        # 2. Prefill all rows at once, then one token per step for the rows still running.
        live = [r for r in rows if r.stop is None]
        if live:
            self._decode_tokens(live)

        # 3. Dream conditions for the rows that stopped at <dream_start>, in one batched forward.
        dreamers = [r for r in rows if r.stop == "dream"]
        conds = self._conditions(dreamers) if dreamers else []
        cond_of = {id(r): c for r, c in zip(dreamers, conds)}
        out = []
        for r, n in zip(rows, prompt_lens):
            text_ids = [i for i in r.new_ids if i not in (t.eos_id, t.dream_start_id)]
            c = cond_of.get(id(r))
            out.append(TextResult(text=t.decode(text_ids), stop=r.stop or "length", prompt_tokens=n,
                                  new_tokens=len(r.new_ids), cond=c,
                                  uncond=self.uncond if c is not None else None))
        return out

    def _decode_tokens(self, rows: list[_Row]) -> None:
        t = self.tok
        lm_head = self.model.llm.get_output_embeddings()
        h, past, mask, pos = self._forward([r.embeds for r in rows])
        last = h[:, -1]  # (B, D)
        while True:
            logits = lm_head(last)  # (B, V)
            next_ids = []
            for i, r in enumerate(rows):
                if r.stop is not None:
                    next_ids.append(t.pad_id)
                    continue
                lg = logits[i].clone()
                if not r.step.allow_dream or r.budget - len(r.new_ids) < 1 + self.image_cost:
                    lg[t.dream_start_id] = float("-inf")  # no image budget, or no room for its blocks
                for banned in (t.im_start_id, t.im_end_id, t.dream_end_id, t.im_patch_id, t.pad_id):
                    lg[banned] = float("-inf")  # block and slot tokens are the model's, never sampled
                tok = self._sample(lg, r)
                r.new_ids.append(tok)
                if tok == t.dream_start_id:
                    r.stop = "dream"
                elif tok == t.eos_id:
                    r.stop = "eos"
                elif len(r.new_ids) >= r.budget:
                    r.stop = "length"
                next_ids.append(tok)
            if all(r.stop is not None for r in rows):
                return
            ids = torch.tensor(next_ids, device=self.device).view(-1, 1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            pos = pos[:, -1:] + 1
            h, past, _, _ = self._forward(list(self.model.embed_tokens(ids)), past, mask, pos)
            last = h[:, -1]

    def _conditions(self, rows: list[_Row]) -> list[np.ndarray]:
        """(Q, C) condition per row: prefix + new tokens (ending in <dream_start>) + dream queries."""
        t = self.tok
        seqs = []
        for r in rows:
            ids = [i for i in r.new_ids if i != t.dream_start_id]
            tail = torch.tensor([*ids, t.dream_start_id], device=self.device)
            queries = self.model.dream_queries.to(r.embeds.dtype)
            seqs.append(torch.cat([r.embeds, self.model.embed_tokens(tail), queries]))
        h, _, _, _ = self._forward(seqs)
        q = t.num_dream_queries
        cond = self.model.cond_proj(h[:, -q:].to(self.model.cond_proj.weight.dtype))  # (B, Q, C)
        return list(cond.float().cpu().numpy())


# ----------------------------------------------------------------------------------------------
# Image side


class ImageEngine:
    """The diffusion decoder alone: batched conditions -> PNG."""

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.card = model_card(checkpoint)
        model, _ = load_model(checkpoint, DECODER_COMPONENTS, self.device)
        self.decoder = model.decoder

    def info(self) -> dict[str, Any]:
        return {**self.card, "device": str(self.device), "resolution": self.decoder.resolution}

    @torch.no_grad()
    def decode_batch(self, items: list[DecodeItem]) -> list[DecodedImage]:
        """One sample() per (steps, guidance) group; results in the order of `items`."""
        from dreamcore.decoder import to_pil

        out: list[DecodedImage | None] = [None] * len(items)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it.num_inference_steps, float(it.guidance_scale)), []).append(i)
        for (steps, scale), idx in groups.items():
            cond = torch.from_numpy(np.stack([items[i].cond for i in idx])).to(self.device)  # (K, Q, C)
            uncond = None
            if scale != 1.0:
                if any(items[i].uncond is None for i in idx):
                    raise RequestError("guidance_scale", "needs the unconditional condition; use 1.0 without it")
                uncond = torch.from_numpy(np.stack([items[i].uncond for i in idx])).to(self.device)
            images = self.decoder.sample(cond, uncond, num_inference_steps=steps, guidance_scale=scale,
                                         seed=[items[i].seed for i in idx])
            for i, im in zip(idx, to_pil(images)):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                out[i] = DecodedImage(png=buf.getvalue(), width=im.width, height=im.height, seed=items[i].seed)
        return out  # type: ignore[return-value]
