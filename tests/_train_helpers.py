"""Test fixtures for the training job: a small curated data folder built directly with pyarrow.

It has what `dreamcore curate` writes (SAMPLE_SCHEMA shards, manifest.json, tokenizer/) without
running curation: coloured shapes drawn with PIL, captions naming colour and shape, a BPE trained
on those captions. Tests of the trainer must not depend on the curation job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from _model_helpers import debug_config, debug_overrides

from dreamcore.config import ModelConfig, to_dict
from dreamcore.schema import SAMPLE_SCHEMA
from dreamcore.synthetic import render_png
from dreamcore.tokenizer import DreamTokenizer

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

# The debug model with 64-token rows (a one-image document fits): a DeepSpeed step stays a fraction
# of a second on one shared CPU core.
TRAIN_MODEL = {"max_seq_len": 64}
TRAIN_MODEL_OVERRIDES = debug_overrides(**TRAIN_MODEL)  # the job's `--set model.*` form


def small_model_config() -> ModelConfig:
    return debug_config(**TRAIN_MODEL)


def shape_png(colour: str, shape: str, size: int) -> bytes:
    """The synthetic world's own rendering (dreamcore.synthetic), centred and large."""
    return render_png(f"{colour}-{shape}-large-center-v0", size)


def make_data_folder(root: Path, cfg: ModelConfig, num_docs: int = 48, rows_per_shard: int = 16,
                     extra_tokenizer_texts: tuple[str, ...] = (), prefix: str = "") -> Path:
    """Write `num_docs` one-image documents as SAMPLE_SCHEMA shards + manifest + tokenizer.

    The tokenizer is a BPE trained on the captions (the same one in every folder, as curation with
    one tokenizer gives), plus `extra_tokenizer_texts` (a different one: a mixture must refuse it).
    `prefix` goes before sample and document ids, so folders of a mixture can be told apart.
    """
    root.mkdir(parents=True, exist_ok=True)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    captions = [f"a {c} {s}." for c, s in pairs] + [f"here is a {c} {s}, drawn on white." for c, s in pairs]
    texts = captions * 4 + list(extra_tokenizer_texts)
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries, texts)
    tok.save_pretrained(root / "tokenizer")

    rows = []
    for i in range(num_docs):
        colour, shape = pairs[i % len(pairs)]
        parts = [f"here is a {colour} {shape}", 0, "drawn on white."]
        enc = tok.encode_document(parts, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
        (row,) = tok.pack([enc], cfg.max_seq_len, cfg.images_per_sample, doc_ids=[f"{prefix}doc{i}"],
                          packing=False)
        rows.append(row.to_sample(f"{prefix}s{i:04d}", [shape_png(colour, shape, cfg.image_resolution)]))
    for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=SAMPLE_SCHEMA)
        pq.write_table(table, root / f"samples-{shard:05d}.parquet")
    manifest = {"schema_version": SAMPLE_SCHEMA.metadata[b"dreamcore.schema_version"].decode(),
                "rows": len(rows), "model": to_dict(cfg)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
