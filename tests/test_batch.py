"""decode_batch / to_torch: shapes, dtypes, padding, per-document positions, resize, error messages,
and a run inside Ray Data."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamcore.batch import decode_batch, to_torch
from dreamcore.config import tiny
from dreamcore.schema import SAMPLE_SCHEMA


@pytest.fixture
def cfg():
    c = tiny()
    c.max_seq_len = 24
    c.max_images_per_sample = 3
    return c


def _png(color: tuple[int, int, int], size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _row(sample_id: str, t: int, num_tokens: int, images: list[bytes], slots: list[tuple[int, int]],
         doc_lengths: list[int] | None = None) -> dict:
    doc_lengths = [num_tokens] if doc_lengths is None else doc_lengths  # default: one document
    return {
        "sample_id": sample_id,
        "doc_ids": [f"{sample_id}/{i}" for i in range(len(doc_lengths))],
        "doc_lengths": doc_lengths,
        "input_ids": list(range(1, num_tokens + 1)) + [0] * (t - num_tokens),
        "labels": list(range(1, num_tokens + 1)) + [-100] * (t - num_tokens),
        "num_tokens": num_tokens,
        "images": images,
        "image_slots": [s[0] for s in slots],
        "dream_slots": [s[1] for s in slots],
    }


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_shapes_and_dtypes(cfg):
    res = cfg.image_resolution
    rows = [_row("a", 24, 20, [_png((255, 0, 0), res)], [(10, 3)]), _row("b", 24, 5, [], [])]
    out = decode_batch(_columns(rows), cfg)
    assert set(out) == {"input_ids", "labels", "attention_mask", "position_ids", "images", "image_slots",
                        "dream_slots"}
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert out[key].shape == (2, 24) and out[key].dtype == np.int64
    assert out["images"].shape == (2, 3, res, res, 3) and out["images"].dtype == np.uint8
    for key in ("image_slots", "dream_slots"):
        assert out[key].shape == (2, 3) and out[key].dtype == np.int64


def test_padding_of_images_slots_and_mask(cfg):
    res = cfg.image_resolution
    rows = [_row("a", 24, 20, [_png((255, 0, 0), res), _png((0, 0, 255), res)], [(10, 3), (18, -1)])]
    out = decode_batch(_columns(rows), cfg)
    assert out["attention_mask"][0].tolist() == [1] * 20 + [0] * 4
    assert out["image_slots"][0].tolist() == [10, 18, -1]
    assert out["dream_slots"][0].tolist() == [3, -1, -1]
    assert (out["images"][0, 0] == [255, 0, 0]).all()
    assert (out["images"][0, 1] == [0, 0, 255]).all()
    assert (out["images"][0, 2] == 0).all()  # padding image slot
    assert out["labels"][0, 20:].tolist() == [-100] * 4


def test_positions_restart_at_each_packed_document(cfg):
    rows = [_row("packed", 24, 20, [], [], doc_lengths=[8, 5, 7]), _row("one", 24, 20, [], []),
            _row("full", 24, 24, [], [], doc_lengths=[20, 4])]
    pos = decode_batch(_columns(rows), cfg)["position_ids"]
    # The padding tail continues the last document's count; a one-document row is exactly 0..T-1.
    assert pos[0].tolist() == [*range(8), *range(5), *range(11)]
    assert pos[1].tolist() == list(range(24))
    assert pos[2].tolist() == [*range(20), *range(4)]


def test_rows_without_doc_lengths_or_with_wrong_ones_are_refused(cfg):
    old = _columns([_row("a", 24, 20, [], [])])
    del old["doc_lengths"]  # curated before schema version 2
    with pytest.raises(ValueError, match=r"no doc_lengths column.*re-curate"):
        decode_batch(old, cfg)
    for lengths in ([8, 5], [20, 0], []):
        with pytest.raises(ValueError, match=r"sample bad: doc_lengths .* sum to num_tokens=20"):
            decode_batch(_columns([_row("bad", 24, 20, [], [], doc_lengths=lengths)]), cfg)


def test_resize_when_stored_at_other_resolution(cfg):
    res = cfg.image_resolution
    img = Image.new("RGB", (res * 3, res * 2), (0, 255, 0))
    img.paste((255, 255, 0), (0, 0, res * 3, res))  # top half yellow, bottom half green
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = decode_batch(_columns([_row("a", 24, 20, [buf.getvalue()], [(10, 3)])]), cfg)
    pixels = out["images"][0, 0]
    assert pixels.shape == (res, res, 3)
    assert pixels[0, 0].tolist() == [255, 255, 0] and pixels[-1, -1].tolist() == [0, 255, 0]


def test_grayscale_png_becomes_rgb(cfg):
    res = cfg.image_resolution
    buf = io.BytesIO()
    Image.new("L", (res, res), 128).save(buf, format="PNG")
    out = decode_batch(_columns([_row("a", 24, 20, [buf.getvalue()], [(10, 3)])]), cfg)
    assert out["images"][0, 0, 0, 0].tolist() == [128, 128, 128]


def test_too_many_images_names_the_sample(cfg):
    res = cfg.image_resolution
    rows = [_row("doc-42", 24, 20, [_png((1, 2, 3), res)] * 4, [(1, 2)] * 4)]
    with pytest.raises(ValueError, match=r"sample doc-42: 4 images but a row holds at most 3"):
        decode_batch(_columns(rows), cfg)


def test_bad_image_bytes_name_the_sample_and_image(cfg):
    rows = [_row("doc-7", 24, 20, [b"not a png"], [(10, 3)])]
    with pytest.raises(ValueError, match=r"sample doc-7 image 0: cannot decode"):
        decode_batch(_columns(rows), cfg)


def test_ragged_rows_and_slot_mismatch_are_named(cfg):
    res = cfg.image_resolution
    rows = [_row("ok", 24, 20, [], []), _row("short", 20, 20, [], [])]
    with pytest.raises(ValueError, match="sample short: input_ids has 20 tokens"):
        decode_batch(_columns(rows), cfg)
    rows = [_row("odd", 24, 20, [_png((0, 0, 0), res)], [])]
    with pytest.raises(ValueError, match="sample odd: 1 images but 0 image_slots"):
        decode_batch(_columns(rows), cfg)
    with pytest.raises(ValueError, match=r"columns \['images'"):
        decode_batch({"input_ids": [[1]], "labels": [[1]], "num_tokens": [1], "doc_lengths": [[1]],
                      "image_slots": [[]], "dream_slots": [[]]}, cfg)


def test_numpy_object_columns_like_ray_data(cfg):
    """Ray Data's numpy format hands list columns as object arrays of arrays."""
    res = cfg.image_resolution
    rows = [_row("a", 24, 20, [_png((9, 9, 9), res)], [(10, 3)], doc_lengths=[12, 8])]
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    assert columns["images"].dtype == object
    out = decode_batch(columns, cfg)
    assert out["image_slots"][0].tolist() == [10, -1, -1]
    assert out["images"][0, 0, 0, 0].tolist() == [9, 9, 9]
    assert out["position_ids"][0].tolist() == [*range(12), *range(12)]


def test_to_torch_keeps_dtypes(cfg):
    import torch

    res = cfg.image_resolution
    out = to_torch(decode_batch(_columns([_row("a", 24, 20, [_png((1, 2, 3), res)], [(10, 3)])]), cfg))
    assert out["input_ids"].dtype == torch.int64 and out["images"].dtype == torch.uint8
    assert out["position_ids"].dtype == torch.int64
    assert tuple(out["images"].shape) == (1, 3, res, res, 3)
    assert out["input_ids"].device.type == "cpu"


@pytest.mark.e2e
def test_decode_batch_inside_ray_data_map_batches(cfg, tmp_path, ray_session):
    """Tokenizer -> packed rows -> Parquet -> Ray Data map_batches(decode_batch) -> fixed shapes."""
    import ray

    from dreamcore.config import TokenizerConfig
    from dreamcore.tokenizer import DreamTokenizer

    cfg.max_seq_len = 128
    tok = DreamTokenizer.build(TokenizerConfig(vocab_size=300), cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=["a red square and a blue circle"] * 20)
    docs = [tok.encode_document(["a red square", 0]), tok.encode_document(["a blue circle"]),
            tok.encode_document(["two", 0, 1], max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)]
    rows = tok.pack(docs, seq_len=cfg.max_seq_len, max_images=cfg.images_per_sample,
                    doc_ids=["d0", "d1", "d2"], packing=False)  # 3 rows: batches of 2 cross blocks
    res = cfg.image_resolution
    records = [r.to_sample(f"s{i}", [_png((200, 10, 10), res + 4) for _ in r.images]) for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA), tmp_path / "part-0.parquet")

    ds = ray.data.read_parquet(str(tmp_path)).map_batches(
        decode_batch, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=2
    )
    batches = list(ds.iter_batches(batch_size=len(records), batch_format="numpy"))
    got = batches[0]
    assert got["input_ids"].shape == (len(records), cfg.max_seq_len)
    assert got["images"].shape == (len(records), cfg.images_per_sample, res, res, 3)
    assert int(got["attention_mask"].sum()) == sum(r.num_tokens for r in rows)
    assert (got["position_ids"] == np.arange(cfg.max_seq_len)).all()  # one document a row
    expected_slots = sorted(tuple(r.image_slots + [-1] * (cfg.images_per_sample - len(r.image_slots)))
                            for r in rows)
    assert sorted(tuple(s) for s in got["image_slots"].tolist()) == expected_slots
    assert (got["images"][got["image_slots"] >= 0][..., 0] > 150).all()  # red, resized from res + 4


def test_trim_padding_keeps_every_real_token_and_slot():
    from dreamcore.batch import trim_padding

    ids = np.zeros((3, 16), dtype=np.int64)
    mask = np.zeros((3, 16), dtype=np.int64)
    for r, n in enumerate((5, 9, 2)):
        ids[r, :n] = np.arange(1, n + 1)
        mask[r, :n] = 1
    batch = {"input_ids": ids, "labels": ids.copy(), "attention_mask": mask,
             "position_ids": np.broadcast_to(np.arange(16), (3, 16)).copy(), "images": np.zeros((3, 2, 4, 4, 3), np.uint8), "image_slots": np.full((3, 2), -1),
             "dream_slots": np.full((3, 2), -1)}
    out = trim_padding(batch)
    assert out["input_ids"].shape == (3, 9) and out["attention_mask"].sum() == mask.sum()
    assert np.array_equal(out["input_ids"], ids[:, :9]) and out["images"].shape == (3, 2, 4, 4, 3)
    assert out["position_ids"].shape == (3, 9)
