"""Interleaved generation as loops over the one engine (dreamcore/engine.py).

`Document` is DreamLLM's interleaved loop as a state machine: ask the text side to continue; when
it stops at `<dream_start>`, ask the image side for the image and feed it back as a drawn image;
repeat until EOS or a limit. It holds no model: the served endpoint drives it over Ray Serve
handles (pipelines/serve/deployments.py) and `generate_document` drives it in-process, so the
same prompt and seed give the same document both ways.

`text_to_images` and `caption_images` are the two single-modality tasks the demo scores; they
batch many prompts through the same engine calls that serve /v1/images and /v1/generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dreamcore.engine import (
    DocPart,
    Drawn,
    DreamConditions,
    ImageLike,
    TextEngine,
    TextRequest,
    TextResult,
    decode_dreams,
)
from dreamcore.model import DreamLLM
from dreamcore.tokenizer import SampledText

SEED_STRIDE = 1000


def text_seed(seed: int, round_: int) -> int:
    """The sampling seed of a document's text round (0: the first text, r: after r images)."""
    return seed + SEED_STRIDE * round_


def image_seed(seed: int, k: int) -> int:
    """The noise seed of a document's image k (0-based)."""
    return seed + k


def _raise_errors(results: Sequence[TextResult]) -> None:
    for r in results:
        if r.error is not None:
            raise ValueError(r.error)


@dataclass
class GenerationParams:
    """Limits and sampling settings of one document (None: the decoder config's default)."""

    max_new_tokens: int = 64  # sampled tokens over the whole document
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
class Document:
    """One interleaved generation in progress: what to ask next, and what came back.

    Driver loop (sync or async, in-process or over deployments):
        while not doc.finished:
            doc.add_text(text_side(doc.text_request()))
            if doc.wants_image:
                doc.add_image(image_side(doc.image_request()))
    """

    prompt: Sequence[DocPart]
    params: GenerationParams
    parts: list[DocPart] = field(default_factory=list)  # the prompt, then everything generated
    output: list[str | Any] = field(default_factory=list)  # generated text chunks and images only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    finish_reason: str | None = None  # "eos" | "length" once finished
    _dream: DreamConditions | None = None
    _rounds: int = 0

    def __post_init__(self) -> None:
        self.parts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_image(self) -> bool:
        return self._dream is not None

    def text_request(self) -> TextRequest:
        p = self.params
        return TextRequest(list(self.parts), p.max_new_tokens - self.completion_tokens, p.temperature, p.top_p,
                           seed=text_seed(p.seed, self._rounds), allow_dream=self.images < p.max_images)

    def add_text(self, res: TextResult) -> str | None:
        """Take the text side's answer; returns the new text chunk (None when empty)."""
        if res.error is not None:
            raise ValueError(res.error)
        if self._rounds == 0:
            self.prompt_tokens = res.prompt_tokens
        self._rounds += 1
        self.completion_tokens += res.new_tokens
        if res.text:
            # The next round lays out the ids it sampled, not a re-tokenization of the text.
            self.parts.append(SampledText(res.text, res.token_ids) if res.token_ids else res.text)
            self.output.append(res.text)
        if res.stop == "dream":
            self._dream = DreamConditions(res.cond, res.uncond, image_seed(self.params.seed, self.images),
                                          self.params.num_inference_steps, self.params.guidance_scale)
        else:
            self.finish_reason = res.stop
        return res.text or None

    def image_request(self) -> DreamConditions:
        if self._dream is None:
            raise RuntimeError("no image is due: the last text round did not stop at <dream_start>")
        return self._dream

    def add_image(self, image: ImageLike) -> None:
        """Take the drawn image (any form `engine.as_rgb` reads); it is fed back as a drawn image."""
        self._dream = None
        self.images += 1
        self.parts.append(Drawn(image))
        self.output.append(image)
        if self.completion_tokens >= self.params.max_new_tokens:
            self.finish_reason = "length"


def generate_document(
    model: DreamLLM, tokenizer: Any, prompt_parts: Sequence[DocPart], params: GenerationParams | None = None,
    engine: TextEngine | None = None,
) -> list[str | Image.Image]:
    """The continuation of `prompt_parts` as interleaved text chunks and PIL images."""
    model._require("decoder")
    engine = engine or TextEngine(model, tokenizer)
    doc = Document(prompt_parts, params or GenerationParams())
    while not doc.finished:
        doc.add_text(engine.continue_batch([doc.text_request()])[0])
        if doc.wants_image:
            doc.add_image(decode_dreams(model.decoder, [doc.image_request()])[0])
    return [Image.fromarray(p) if isinstance(p, np.ndarray) else p for p in doc.output]


def dream_requests(captions: Sequence[str], seed: int = 0) -> list[TextRequest]:
    """Text-to-image requests (the caption, then `<dream_start>` forced), as /v1/images makes them."""
    return [TextRequest([c], max_new_tokens=0, temperature=0.0, top_p=1.0, seed=seed + i, force_dream=True)
            for i, c in enumerate(captions)]


def text_to_images(
    model: DreamLLM, tokenizer: Any, captions: Sequence[str], num_inference_steps: int | None = None,
    guidance_scale: float | None = None, seed: int = 0, engine: TextEngine | None = None,
) -> list[Image.Image]:
    """One image per caption (caption i drawn with seed + i), all captions in one engine batch."""
    model._require("decoder")
    engine = engine or TextEngine(model, tokenizer)
    results = engine.continue_batch(dream_requests(captions, seed))
    _raise_errors(results)
    dreams = [DreamConditions(r.cond, r.uncond, seed + i, num_inference_steps, guidance_scale)
              for i, r in enumerate(results)]
    return [Image.fromarray(a) for a in decode_dreams(model.decoder, dreams)]


def caption_images(
    model: DreamLLM, tokenizer: Any, images: Sequence[ImageLike], max_new_tokens: int = 32,
    temperature: float = 0.0, seed: int = 0, engine: TextEngine | None = None,
) -> list[str]:
    """Text after each image's comprehension block (greedy by default; no image is drawn)."""
    engine = engine or TextEngine(model, tokenizer)
    requests = [TextRequest([im], max_new_tokens, temperature, 1.0, seed=seed + i, allow_dream=False)
                for i, im in enumerate(images)]
    results = engine.continue_batch(requests)
    _raise_errors(results)
    return [r.text for r in results]
