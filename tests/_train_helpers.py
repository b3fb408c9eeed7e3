"""Test fixtures for the training job: a small curated data folder built directly with pyarrow.

It has what `dreamcore curate` writes (SAMPLE_SCHEMA shards, manifest.json, tokenizer/) without
running curation: coloured shapes drawn with PIL, captions naming colour and shape, a BPE trained
on those captions. Tests of the trainer must not depend on the curation job.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dreamcore.config import ModelConfig, load_config, preset, to_dict
from dreamcore.schema import SAMPLE_SCHEMA
from dreamcore.tokenizer import DreamTokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")

# Small enough that a DeepSpeed step takes a fraction of a second on one shared CPU core.
SMALL_MODEL = [
    "max_seq_len=64",
    "llm.hidden_size=64",
    "llm.intermediate_size=128",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.num_kv_heads=2",
    "vision.num_layers=2",
    "vision.hidden_size=32",
    "vision.intermediate_size=64",
    "decoder.block_out_channels=[16,16]",
    "decoder.cross_attention_dim=32",
    "tokenizer.vocab_size=300",
]


def small_model_config() -> ModelConfig:
    return load_config(preset("tiny"), None, SMALL_MODEL)


def shape_png(colour: str, shape: str, size: int) -> bytes:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_data_folder(root: Path, cfg: ModelConfig, num_docs: int = 48, rows_per_shard: int = 16) -> Path:
    """Write `num_docs` one-image documents as SAMPLE_SCHEMA shards + manifest + tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    captions = [f"a {c} {s}." for c, s in pairs] + [f"here is a {c} {s}, drawn on white." for c, s in pairs]
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries, captions * 4)
    tok.save_pretrained(root / "tokenizer")

    rows = []
    for i in range(num_docs):
        colour, shape = pairs[i % len(pairs)]
        parts = [f"here is a {colour} {shape}", 0, "drawn on white."]
        enc = tok.encode_document(parts, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
        (row,) = tok.pack([enc], cfg.max_seq_len, cfg.images_per_sample, doc_ids=[f"doc{i}"], packing=False)
        rows.append(row.to_sample(f"s{i:04d}", [shape_png(colour, shape, cfg.image_resolution)]))
    for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=SAMPLE_SCHEMA)
        pq.write_table(table, root / f"samples-{shard:05d}.parquet")
    manifest = {"schema_version": SAMPLE_SCHEMA.metadata[b"dreamcore.schema_version"].decode(),
                "rows": len(rows), "model": to_dict(cfg)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
