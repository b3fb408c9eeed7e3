"""The one debug model of the test suite, and real batches for the model-core tests.

`debug_config()` is `config.tiny()` at debug sizes; every test helper builds on it (the serving
checkpoint of _serve_helpers, the training job's model of _train_helpers), and
`debug_overrides()` gives the same model as the `key=value` strings of the jobs' `--set model.*`.

Batches go through the real data path: DreamTokenizer.encode_document -> pack -> SAMPLE_SCHEMA
record with PNG bytes -> batch.decode_batch -> batch.to_torch, so a layout change anywhere shows up.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcore.batch import decode_batch, to_torch
from dreamcore.config import ModelConfig, load_config, tiny
from dreamcore.model import DreamLLM
from dreamcore.tokenizer import DreamTokenizer

# tiny() with a narrower, shallower LLM, CLIP tower and UNet, a short context and a few sampler
# steps: a forward and backward take milliseconds on one CPU thread. What the tests read keeps
# tiny()'s values: 16 patch tokens per image (32 px, patch 8), 8 dream queries, conditions of width
# 64, 16 px images, two CLIP layers (select_layer -2 picks a real layer).
DEBUG_MODEL_OVERRIDES = [
    "max_seq_len=128",
    "llm.hidden_size=64",
    "llm.intermediate_size=128",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.num_kv_heads=2",
    "vision.hidden_size=32",
    "vision.intermediate_size=64",
    "decoder.block_out_channels=[16,16]",
    "decoder.num_inference_steps=4",
    "tokenizer.vocab_size=300",
]


def debug_overrides(**changes: Any) -> list[str]:
    """The debug model, then `changes`, as `key=value` overrides of the tiny preset.

    `changes` are top-level ModelConfig fields; a component's fields go in a dict:
    `debug_overrides(max_seq_len=64, decoder={"use_vae": True})`.
    """
    return [*DEBUG_MODEL_OVERRIDES, *_as_overrides(changes)]


def debug_config(**changes: Any) -> ModelConfig:
    """The debug model's config (see `debug_overrides` for `changes`)."""
    return load_config(tiny(), None, debug_overrides(**changes))


def _as_overrides(changes: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in changes.items():
        if isinstance(value, dict):
            out += _as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML: parse_overrides reads it back
    return out


CORPUS = [
    "a red circle on a white background",
    "the green triangle is small and sits in the corner",
    "two yellow squares next to a blue circle",
    "here is a picture of a purple star",
] * 10

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 210, 30)]


def debug_tokenizer(cfg: ModelConfig) -> DreamTokenizer:
    hf = DreamTokenizer.train(CORPUS, cfg.tokenizer.vocab_size)
    return DreamTokenizer(hf, cfg.vision.num_tokens, cfg.dream.num_queries)


def debug_model(cfg: ModelConfig | None = None, tok: DreamTokenizer | None = None,
                seed: int = 0) -> tuple[DreamLLM, DreamTokenizer]:
    """(DreamLLM, tokenizer) of `cfg` (default: the debug model), random init from `seed`."""
    cfg = cfg or debug_config()
    tok = tok or debug_tokenizer(cfg)
    torch.manual_seed(seed)
    return DreamLLM(cfg, tok), tok


def dreaming_model(dream_bias: float, seed: int = 1) -> tuple[DreamLLM, DreamTokenizer]:
    """The debug model (eval mode) with a bias on <dream_start> in its LM head, so an untrained
    model draws (LLaMA's head has no bias; only generation tests add one)."""
    model, tok = debug_model(seed=seed)
    head = model.llm.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.dream_start_id] = dream_bias
    model.llm.lm_head = biased
    return model.eval(), tok


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
    """Tiny tensors: on a shared 2-core box, intra-op threads spin and cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
