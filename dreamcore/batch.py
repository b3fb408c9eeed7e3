"""Parquet sample rows -> the fixed-shape batch dict `DreamLLM.forward` takes (docs/architecture.md).

`decode_batch` runs inside Ray Data `map_batches` (batch_format="numpy"), so PNG decoding happens
in Data's workers and never stalls the trainer; it works the same on plain Python lists in a loop.
Every row is padded to the same image capacity M = `cfg.images_per_sample` so batches have one shape.

Packed rows: `position_ids` restart at 0 at each document of the row (from the `doc_lengths`
column), and `DreamLLM.forward` hands them to the LLM without a 2D mask, so transformers builds the
block-diagonal causal mask (each document attends only to itself); a one-document row gets plain
0..T-1 and keeps the mask-free causal fast path.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from dreamcore.config import ModelConfig

REQUIRED = ("input_ids", "labels", "num_tokens", "doc_lengths", "images", "image_slots", "dream_slots")


def decode_batch(columns: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Columns of SAMPLE_SCHEMA rows (lists or numpy object arrays) -> fixed-shape numpy arrays.

    input_ids, labels, attention_mask, position_ids: (B, T) int64; images: (B, M, H, W, 3) uint8;
    image_slots, dream_slots: (B, M) int64, -1 where absent. position_ids count 0..len-1 within each
    document of the row; the padding tail continues the last document's count.
    """
    if "doc_lengths" not in columns and "input_ids" in columns:
        raise ValueError(
            "decode_batch: the rows have no doc_lengths column (each packed document's token count, "
            "which per-document attention and positions need); they were curated by an older dreamcore "
            "(sample schema version 1): re-curate them with `dreamcore curate`"
        )
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(
            f"decode_batch: columns {missing} are missing (got {sorted(columns)}); "
            "read the Parquet written with dreamcore.schema.SAMPLE_SCHEMA"
        )
    batch_size = len(columns["input_ids"])
    sample_ids = _sample_ids(columns, batch_size)
    m, res = cfg.images_per_sample, cfg.image_resolution

    input_ids = _stack_tokens(columns["input_ids"], sample_ids, "input_ids")
    labels = _stack_tokens(columns["labels"], sample_ids, "labels")
    if labels.shape != input_ids.shape:
        raise ValueError(f"decode_batch: labels {labels.shape} and input_ids {input_ids.shape} differ in shape")
    seq_len = input_ids.shape[1]
    num_tokens = np.asarray(columns["num_tokens"], dtype=np.int64).reshape(batch_size)
    bad = np.flatnonzero((num_tokens < 0) | (num_tokens > seq_len))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample {sample_ids[i]}: num_tokens={num_tokens[i]} is outside 0..{seq_len}")
    attention_mask = (np.arange(seq_len)[None, :] < num_tokens[:, None]).astype(np.int64)
    position_ids = np.stack([
        _positions(_as_list(columns["doc_lengths"][b]), int(num_tokens[b]), seq_len, sample_ids[b])
        for b in range(batch_size)
    ]) if batch_size else np.zeros((0, seq_len), dtype=np.int64)

    images = np.zeros((batch_size, m, res, res, 3), dtype=np.uint8)
    image_slots = np.full((batch_size, m), -1, dtype=np.int64)
    dream_slots = np.full((batch_size, m), -1, dtype=np.int64)
    for b in range(batch_size):
        row_images = _as_list(columns["images"][b])
        row_islots = _as_list(columns["image_slots"][b])
        row_dslots = _as_list(columns["dream_slots"][b])
        k = len(row_images)
        if not len(row_islots) == len(row_dslots) == k:
            raise ValueError(
                f"sample {sample_ids[b]}: {k} images but {len(row_islots)} image_slots and "
                f"{len(row_dslots)} dream_slots; the row is corrupt (re-run the tokenize stage)"
            )
        if k > m:
            raise ValueError(
                f"sample {sample_ids[b]}: {k} images but a row holds at most {m} "
                f"(ModelConfig.images_per_sample); raise max_images_per_sample or re-curate with the same "
                "model config so packing caps images per row"
            )
        for i, payload in enumerate(row_images):
            images[b, i] = _decode_image(payload, res, f"sample {sample_ids[b]} image {i}")
        image_slots[b, :k] = row_islots
        dream_slots[b, :k] = row_dslots
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "images": images,
        "image_slots": image_slots,
        "dream_slots": dream_slots,
    }


def to_torch(batch: dict[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """The same dict as torch tensors on `device` (dtypes kept: int64 ids, uint8 images)."""
    import torch

    return {k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def _positions(doc_lengths: list[Any], num_tokens: int, seq_len: int, sample_id: str) -> np.ndarray:
    """(T,) int64: 0..len-1 for each document in turn, the padding tail continuing the last one."""
    lengths = np.asarray(doc_lengths, dtype=np.int64).reshape(-1)
    if (lengths < 1).any() or int(lengths.sum()) != num_tokens:
        raise ValueError(
            f"sample {sample_id}: doc_lengths {lengths.tolist()} must be >= 1 each and sum to "
            f"num_tokens={num_tokens}; the row is corrupt (re-run the tokenize stage)"
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else np.zeros(1, np.int64)
    lengths = lengths.copy() if lengths.size else np.zeros(1, np.int64)
    lengths[-1] += seq_len - num_tokens  # the padding tail belongs to the last document
    return np.arange(seq_len, dtype=np.int64) - np.repeat(starts, lengths)


def _sample_ids(columns: dict[str, Any], batch_size: int) -> list[str]:
    """Names for error messages: the sample_id column when present, else the row number."""
    if "sample_id" in columns:
        return [str(s) for s in columns["sample_id"]]
    return [f"#{i} (no sample_id column)" for i in range(batch_size)]


def _as_list(value: Any) -> list[Any]:
    """A list cell as a list: Ray Data hands numpy arrays (object arrays for binary lists)."""
    if value is None:
        return []
    return list(value)


def _stack_tokens(rows: Sequence[Any], sample_ids: list[str], name: str) -> np.ndarray:
    """Rows of one fixed length -> (B, T) int64; a ragged row is named, not broadcast."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
    if not arrays:
        return np.zeros((0, 0), dtype=np.int64)
    seq_len = arrays[0].shape[0]
    for sid, a in zip(sample_ids, arrays):
        if a.shape[0] != seq_len:
            raise ValueError(
                f"sample {sid}: {name} has {a.shape[0]} tokens but the batch's first row has {seq_len}; "
                "rows must be padded to one length (re-run the tokenize stage with one max_seq_len)"
            )
    return np.stack(arrays)


def _decode_image(payload: Any, res: int, where: str) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> (res, res, 3) uint8; resized if stored at another size."""
    try:
        with Image.open(io.BytesIO(bytes(payload))) as img:
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises several types for bad bytes; one message for all of them
        raise ValueError(f"{where}: cannot decode image bytes ({e.__class__.__name__}: {e})") from None
    if rgb.size != (res, res):
        # Stored at another resolution (e.g. curated for another config): match the model's.
        rgb = rgb.resize((res, res), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def trim_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut the token columns to the longest row of this batch.

    Rows are stored at the fixed `max_seq_len`; short rows (pairs, unpacked documents) are mostly
    padding at the end. Attention is causal and padding comes last, so dropping the all-padding
    tail changes no loss, only the cost. Slots always lie before a row's `num_tokens`.
    """
    longest = int(batch["attention_mask"].sum(1).max()) if len(batch["attention_mask"]) else 0
    longest = max(longest, 1)
    tokens = ("input_ids", "labels", "attention_mask", "position_ids")
    return {k: (v[:, :longest] if k in tokens else v) for k, v in batch.items()}
