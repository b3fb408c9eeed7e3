"""Tiny models and real batches for the model-core tests (model, decoder, generate, checkpoint).

Batches go through the real data path: DreamTokenizer.encode_document -> pack -> SAMPLE_SCHEMA
record with PNG bytes -> batch.decode_batch -> batch.to_torch, so a layout change anywhere shows up.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcore.batch import decode_batch, to_torch
from dreamcore.config import ModelConfig, tiny
from dreamcore.model import DreamLLM
from dreamcore.tokenizer import DreamTokenizer

CORPUS = [
    "a red circle on a white background",
    "the green triangle is small and sits in the corner",
    "two yellow squares next to a blue circle",
    "here is a picture of a purple star",
] * 10

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 210, 30)]


def tiny_cfg(**decoder_changes) -> ModelConfig:
    cfg = tiny()
    if decoder_changes:
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **decoder_changes))
    return cfg


def tiny_tokenizer(cfg: ModelConfig) -> DreamTokenizer:
    hf = DreamTokenizer.train(CORPUS, cfg.tokenizer.vocab_size)
    return DreamTokenizer(hf, cfg.vision.num_tokens, cfg.dream.num_queries)


def tiny_model(cfg: ModelConfig | None = None, tok: DreamTokenizer | None = None, seed: int = 0):
    cfg = cfg or tiny_cfg()
    tok = tok or tiny_tokenizer(cfg)
    torch.manual_seed(seed)
    return DreamLLM(cfg, tok), tok


def solid_image(colour: tuple[int, int, int], size: int) -> Image.Image:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:] = 245
    q = size // 4
    arr[q:size - q, q:size - q] = colour
    return Image.fromarray(arr)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_batch(cfg: ModelConfig, tok: DreamTokenizer, docs: Sequence[Sequence[str | int]]) -> dict[str, torch.Tensor]:
    """One row per document (no packing); image i of a document is a solid-colour square."""
    res = cfg.image_resolution
    encoded = [tok.encode_document(list(d), max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
               for d in docs]
    rows = tok.pack(encoded, cfg.max_seq_len, cfg.images_per_sample, packing=False)
    records = []
    for r, row in enumerate(rows):
        payloads = [png(solid_image(COLOURS[(r + img) % len(COLOURS)], res)) for _, img in row.images]
        records.append(row.to_sample(f"s{r}", payloads))
    columns = {k: [rec[k] for rec in records] for k in records[0]}
    return to_torch(decode_batch(columns, cfg))


INTERLEAVED = [
    ["a red circle", 0, "the green triangle is small", 1, "two yellow squares"],
    ["here is a picture", 0, "of a purple star"],
]
TEXT_ONLY = [["a red circle on a white background"], ["two yellow squares next to a blue circle"]]


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny tensors: on a shared 2-core box, intra-op threads spin and cost 10x more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
