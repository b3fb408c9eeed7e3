"""The one generation engine: batched, stateless text continuation and the image side.

Every generated token in dreamcore comes from `TextEngine.continue_batch` and every generated image
from `decode_dreams`: the served endpoint (pipelines/serve wraps both in Ray Serve deployments), the
in-process loops of dreamcore/generate.py and the demo's held-out scoring all call them, so the
figures the demo reports measure the path users call.

Text side (needs llm + vision + projectors). `continue_batch(requests)` continues B documents at
once. Each request carries the document so far (text, given images, images the model drew); it is
laid out as in training (`DreamTokenizer.encode_prompt`: a drawn image keeps its dream block before
its comprehension block), the B sequences are left-padded into one batch and prefilled, and tokens
are sampled with a KV cache until every row stopped at `<dream_start>`, EOS or a limit. Rows that
stopped at `<dream_start>` get their dream conditions from one more batched forward (prefix +
`<dream_start>` + Q dream queries -> last hidden states -> `cond_proj`). Nothing is kept between
calls, so any replica can continue any document. A request that cannot run (a prompt longer than
the context) gets a result with `error` set; its batch-mates run as if it were not there.

Image side (needs only the decoder). `decode_dreams(decoder, dreams)` draws one image per
`DreamConditions`; dreams with equal sampler settings share one DDIM batch, and each image's noise
comes from its own seed, so an image does not depend on the batch it was drawn in.

The continuous-batching scheduler of the LLM replica (dreamcore/scheduler.py) drives the same
pieces one decode step at a time (`layout` / `embed_layout`, `new_row`, `advance`, `dream_tail`,
`conditions`, `result`), so a document gets the same tokens and conditions either way.

Rules that exist once, here:
- sampling: temperature (below 1e-5 greedy) and top-p, one seeded CPU generator per request;
- never sampled: pad, BOS and the block/slot tokens (`<im_start> <im_patch> <im_end> <dream_end>`);
- room for an image: `<dream_start>` may be sampled only while the request allows another image
  and the dream and comprehension blocks still fit in the context with a token to spare;
- `max_new_tokens` counts sampled tokens, the stop token included;
- images are brought to the vision encoder's resolution by `as_rgb` (PIL bicubic) whatever form
  they come in (file bytes, PIL, uint8 array).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamcore.chat import EndOfTurn
from dreamcore.decoder import DiffusionDecoder
from dreamcore.model import DreamLLM
from dreamcore.tokenizer import SampledText

ImageLike = bytes | Image.Image | np.ndarray


@dataclass
class Drawn:
    """An image the model generated earlier in the document (laid out with its dream block)."""

    image: ImageLike


DocPart = str | ImageLike | Drawn | EndOfTurn


# Temperatures below this sample greedily: dividing logits by less overflows float64 softmax for
# some rows (NaN probabilities), and the limit of sampling as the temperature falls is the argmax.
GREEDY_BELOW = 1e-5


@dataclass
class TextRequest:
    """Continue one document. `parts`: text, given images, and `Drawn` images, in order."""

    parts: list[DocPart]
    max_new_tokens: int
    temperature: float = 0.8  # below GREEDY_BELOW: greedy
    top_p: float = 0.95
    seed: int = 0
    allow_dream: bool = True  # False once the document's image budget is spent
    force_dream: bool = False  # text-to-image: `<dream_start>` right after the prompt, no sampling


@dataclass
class DreamConditions:
    """What the image side needs to draw one image: plain arrays, picklable across replicas."""

    cond: np.ndarray  # (Q, C) float32: the LLM's states at the query slots, projected
    uncond: np.ndarray | None  # (Q, C) the empty prompt's (classifier-free guidance); None: no CFG
    seed: int
    num_inference_steps: int | None = None  # None: the decoder config's
    guidance_scale: float | None = None


@dataclass
class TextResult:
    text: str
    stop: str  # "dream" | "eos" | "length" | "error"
    prompt_tokens: int
    new_tokens: int  # sampled tokens, the stop token included
    token_ids: list[int] = field(default_factory=list)  # sampled text tokens (no stop token)
    cond: np.ndarray | None = None  # (Q, C) when stop == "dream"
    uncond: np.ndarray | None = None  # (Q, C)
    error: str | None = None  # why this request could not run (its batch-mates are unaffected)
    too_long: bool = False  # the error is the context length (serving answers 413; other errors 422)
    retry_after_s: float | None = None  # set: refused for capacity, not for its input (serving answers 503)


class PromptTooLongError(ValueError):
    """The prompt (with its image blocks) leaves no room to continue in the model's context."""


def as_rgb(image: ImageLike, size: int) -> np.ndarray:
    """Image file bytes / PIL / (H, W, 3) uint8 -> (size, size, 3) uint8 (PIL bicubic when resized)."""
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as im:
            pil = im.convert("RGB")
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {a.dtype} {a.shape}")
        if a.shape[:2] == (size, size):
            return a
        pil = Image.fromarray(a)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


@dataclass
class Layout:
    """A document laid out as in training, before embedding: token ids, slot starts, its images."""

    ids: list[int]
    dream_slots: list[int]  # first query slot of each dream block (-1: a given image, no dream block)
    image_slots: list[int]  # first patch slot of each comprehension block, parallel to `images`
    images: list[np.ndarray]  # (S, S, 3) uint8 at the vision encoder's resolution

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Row:
    """One request being decoded: its sampling state and what it has produced so far.

    `continue_batch` and the continuous-batching scheduler (dreamcore/scheduler.py) both hold
    their requests as Rows, so one sampler and one stop rule (`TextEngine.advance`) serve both.
    """

    req: TextRequest
    prompt_len: int  # tokens of the laid-out document (images included)
    budget: int  # tokens this row may sample
    generator: torch.Generator
    embeds: torch.Tensor | None = None  # (L, D) the whole prompt, for continue_batch's prefill
    new_ids: list[int] = field(default_factory=list)
    stop: str | None = None


class TextEngine:
    """DreamLLM's text side: batched continuation and dream conditions (see the module docstring)."""

    def __init__(self, model: DreamLLM, tokenizer: Any) -> None:
        model._require("llm", "vision", "vision_proj", "dream_queries", "cond_proj")
        self.model, self.tok = model, tokenizer
        self.device = model.dream_queries.device
        self.max_len = min(model.cfg.max_seq_len, model.llm.config.max_position_embeddings)
        self.image_cost = tokenizer.dream_block_len + tokenizer.image_block_len
        t = tokenizer
        # EOS stays sampleable even where a base tokenizer reuses it as BOS or pad.
        self.banned = [i for i in (t.pad_id, t.bos_id, t.im_start_id, t.im_patch_id, t.im_end_id, t.dream_end_id)
                       if i is not None and i != t.eos_id]
        with torch.inference_mode():
            # The empty prompt's condition is the same for every request: compute it once.
            self.uncond = model.empty_prompt_conditions().float().cpu().numpy()  # (Q, C)

    # -- layout ----------------------------------------------------------------------------------

    def layout(self, parts: Sequence[DocPart]) -> Layout:
        """Document parts -> token ids and slot positions (`encode_prompt`), images read by `as_rgb`."""
        size = self.model.cfg.vision.image_size
        prompt: list[str | int] = []
        drawn: list[int] = []
        images: list[np.ndarray] = []
        for part in parts:
            if isinstance(part, str):
                prompt.append(part)
                continue
            if isinstance(part, EndOfTurn):  # a chat template's end of an assistant turn
                prompt.append(SampledText("", [self.tok.eos_id]))
                continue
            if isinstance(part, Drawn):
                drawn.append(len(images))
                part = part.image
            prompt.append(len(images))
            images.append(as_rgb(part, size))
        enc = self.tok.encode_prompt(prompt, drawn=drawn)
        return Layout(enc.input_ids, enc.dream_slots, enc.image_slots, images)

    def embed_layout(self, lay: Layout, start: int = 0) -> torch.Tensor:
        """(L - start, D) embeddings of positions start.. of `lay`, query and patch slots filled.

        `start` > 0 embeds only what a KV cache of the first `start` positions lacks: the vision
        encoder runs only on images whose comprehension block reaches past `start`.
        """
        t = self.tok
        embeds = self.model.embed_tokens(torch.tensor(lay.ids[start:], device=self.device))  # (L - start, D)
        queries = self.model.dream_queries.to(embeds.dtype)  # (Q, D)
        for slot in (s for s in lay.dream_slots if s >= 0):
            _fill(embeds, start, slot, queries)
        todo = [(slot, im) for slot, im in zip(lay.image_slots, lay.images) if slot + t.num_image_tokens > start]
        if todo:
            pixels = torch.from_numpy(np.stack([im for _, im in todo])).to(self.device)
            feats = self.model.encode_images(pixels)  # (K, N, D)
            for (slot, _), f in zip(todo, feats):
                _fill(embeds, start, slot, f.to(embeds.dtype))
        return embeds

    def embed(self, parts: Sequence[DocPart]) -> torch.Tensor:
        """Document parts -> (L, D) embeddings with query and patch slots filled."""
        return self.embed_layout(self.layout(parts))

    def dream_tail(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids) + Q, D): the embeddings of `ids` (ending in <dream_start>), then the dream queries."""
        tail = self.model.embed_tokens(torch.tensor(list(ids), device=self.device))
        return torch.cat([tail, self.model.dream_queries.to(tail.dtype)])

    def conditions(self, h: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) last hidden states at the query slots -> (B, Q, C) dream conditions."""
        proj = self.model.cond_proj
        return proj(h.to(proj.weight.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden states -> (B, V) next-token logits."""
        return self.model.llm.get_output_embeddings()(h)

    def _forward(self, seqs: list[torch.Tensor], past: Any = None, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Left-padded batched forward of (L_i, D) sequences -> (hidden (B, L, D), cache, mask, positions)."""
        if past is None:
            L, D = max(s.shape[0] for s in seqs), seqs[0].shape[1]
            x = torch.zeros(len(seqs), L, D, dtype=seqs[0].dtype, device=self.device)
            mask = torch.zeros(len(seqs), L, dtype=torch.long, device=self.device)
            for i, s in enumerate(seqs):
                x[i, L - s.shape[0]:] = s
                mask[i, L - s.shape[0]:] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens start at 0
        else:
            x = torch.stack(seqs)  # (B, 1, D)
        out = self.model.hidden_states(x, mask, position_ids=positions, cache=past, use_cache=True)
        return out.last_hidden_state, out.cache, mask, positions  # transformers 5: `cache`

    # -- sampling --------------------------------------------------------------------------------

    def _room_for_image(self, row: Row) -> bool:
        used = row.prompt_len + len(row.new_ids)
        return used + self.image_cost < self.max_len

    def _sample(self, logits: torch.Tensor, row: Row) -> int:
        """One token from (V,) logits under the row's rules (bans, image room, temperature, top-p)."""
        lg = logits.float().clone()
        lg[self.banned] = float("-inf")
        if not row.req.allow_dream or not self._room_for_image(row):
            lg[self.tok.dream_start_id] = float("-inf")
        if row.req.temperature < GREEDY_BELOW:
            return int(lg.argmax())
        probs = torch.softmax(lg.double() / row.req.temperature, dim=-1).cpu()
        if not torch.isfinite(probs).all():  # a temperature so small it overflows: the limit is greedy
            return int(lg.argmax())
        if row.req.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < row.req.top_p  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def advance(self, row: Row, logits: torch.Tensor) -> int:
        """Sample the row's next token from its (V,) logits and apply the stop rule; returns the token."""
        t = self.tok
        tok = self._sample(logits, row)
        row.new_ids.append(tok)
        if tok == t.dream_start_id:
            row.stop = "dream"
        elif tok == t.eos_id:
            row.stop = "eos"
        elif len(row.new_ids) >= row.budget:
            row.stop = "length"
        return tok

    def new_row(self, req: TextRequest, prompt_len: int) -> Row:
        """A request's decoding state for a laid-out prompt of `prompt_len` tokens (or PromptTooLongError)."""
        room = self.max_len - prompt_len
        if room < (self.tok.dream_block_len if req.force_dream else 1):
            raise PromptTooLongError(
                f"the prompt is {prompt_len} tokens with its images; this model takes at most "
                f"{self.max_len} (shorten the prompt or send fewer images)")
        row = Row(req, prompt_len, min(req.max_new_tokens, room), torch.Generator().manual_seed(int(req.seed)))
        if req.force_dream:
            row.new_ids, row.stop = [self.tok.dream_start_id], "dream"
        elif row.budget <= 0:
            row.stop = "length"
        return row

    def result(self, row: Row, cond: np.ndarray | None) -> TextResult:
        """The finished row as a TextResult (`cond`: its (Q, C) dream condition when it stopped at one)."""
        text_ids = [x for x in row.new_ids if x not in (self.tok.eos_id, self.tok.dream_start_id)]
        return TextResult(self.tok.decode(text_ids), row.stop or "length", row.prompt_len, len(row.new_ids),
                          text_ids, cond, self.uncond if cond is not None else None)

    @staticmethod
    def failed(e: Exception) -> TextResult:
        """The result of a request that could not run: a message for the caller, no internals."""
        message = "an image is not a decodable image file (send PNG or JPEG)" if isinstance(e, OSError) else str(e)
        return TextResult("", "error", 0, 0, error=message, too_long=isinstance(e, PromptTooLongError))

    @torch.inference_mode()
    def continue_batch(self, requests: Sequence[TextRequest]) -> list[TextResult]:
        """Continue every document of the batch; results in the order of `requests`."""
        # 1. Lay out and embed each document; a prompt the context cannot hold fails alone.
        rows: list[Row | None] = []
        errors: dict[int, Exception] = {}
        for i, req in enumerate(requests):
            try:
                rows.append(self._row(req))
            except (ValueError, OSError) as e:  # too long, undecodable image bytes, unencodable text
                rows.append(None)
                errors[i] = e
        live = [r for r in rows if r is not None and r.stop is None]

        # 2. Prefill the running rows at once, then one token per step until all have stopped.
        if live:
            self._decode_tokens(live)

        # 3. Dream conditions for the rows that stopped at <dream_start>, in one batched forward.
        dreamers = [r for r in rows if r is not None and r.stop == "dream"]
        cond_of = dict(zip(map(id, dreamers), self._conditions(dreamers))) if dreamers else {}
        return [self.failed(errors[i]) if r is None else self.result(r, cond_of.get(id(r)))
                for i, r in enumerate(rows)]

    def _row(self, req: TextRequest) -> Row:
        embeds = self.embed(req.parts)
        row = self.new_row(req, embeds.shape[0])
        row.embeds = embeds
        return row

    def _decode_tokens(self, rows: list[Row]) -> None:
        t = self.tok
        h, past, mask, pos = self._forward([r.embeds for r in rows])
        while True:
            logits = self.logits(h[:, -1])  # (B, V)
            next_ids = [t.pad_id if r.stop is not None else self.advance(r, logits[i]) for i, r in enumerate(rows)]
            if all(r.stop is not None for r in rows):
                return
            ids = torch.tensor(next_ids, device=self.device).view(-1, 1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            pos = pos[:, -1:] + 1
            h, past, _, _ = self._forward(list(self.model.embed_tokens(ids)), past, mask, pos)

    def _conditions(self, rows: list[Row]) -> list[np.ndarray]:
        """(Q, C) condition per row: prefix + sampled tokens (ending in <dream_start>) + dream queries."""
        seqs = [torch.cat([r.embeds, self.dream_tail(r.new_ids)]) for r in rows]  # new_ids ends with <dream_start>
        h, _, _, _ = self._forward(seqs)
        cond = self.conditions(h[:, -self.tok.num_dream_queries:])  # (B, Q, C)
        return list(cond.float().cpu().numpy())


def _fill(embeds: torch.Tensor, start: int, slot: int, values: torch.Tensor) -> None:
    """Write the (n, D) block at positions slot..slot+n into `embeds`, which begins at position `start`."""
    lo, hi = max(slot, start), slot + values.shape[0]
    if hi > lo:
        embeds[lo - start:hi - start] = values[lo - slot:]


# ----------------------------------------------------------------------------------------------
# Image side


@torch.inference_mode()
@torch.no_grad()
def decode_dreams(decoder: DiffusionDecoder, dreams: Sequence[DreamConditions]) -> list[np.ndarray]:
    """One (R, R, 3) uint8 image per DreamConditions, in order, all sharing each UNet call.

    Each image draws its noise from its own seed and keeps its own step count and guidance
    (`DiffusionDecoder.start` / `step`); the serving replica runs the same trajectories with images
    joining at every step (dreamcore/denoiser.py).
    """
    device = next(decoder.unet.parameters()).device
    runs = [decoder.start(torch.from_numpy(np.asarray(d.cond)).to(device),
                          None if d.uncond is None else torch.from_numpy(np.asarray(d.uncond)).to(device),
                          d.num_inference_steps, d.guidance_scale, torch.Generator().manual_seed(int(d.seed)))
            for d in dreams]
    while not all(r.done for r in runs):
        decoder.step(runs)
    return [np.ascontiguousarray(a) for a in decoder.pixels_uint8(runs)] if runs else []
