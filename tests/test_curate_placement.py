"""similarity.placement: curation keeps the dataset's own image placements unless asked to re-assign.

Ray-free: readers -> SimilarityStage -> DocumentStage -> the layout `encode_doc` uses (interleave),
on the real MMC4 documents in ../shared (skipped where absent) and on small hand-made documents.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _curate_helpers import mmc4_doc

from dreamcore.config import ConfigError, load_config
from dreamcore.tokenizer import interleave
from pipelines.curate.config import CurateConfig, FilterConfig, SimilarityConfig
from pipelines.curate.filters import DocumentStage
from pipelines.curate.readers import parse_shard
from pipelines.curate.similarity import SimilarityStage, apply_assignment, apply_given_matches, assign

REAL_SHARD = "data/mmc4/docs_no_face_shard_151_v3.partial.jsonl"


def _real(shared_dir) -> tuple[list[dict], list[dict]]:
    """(raw MMC4 records, curation rows parsed by the reader) of the real shard."""
    path = shared_dir / REAL_SHARD
    if not path.exists():
        pytest.skip(f"{path} is not present")
    data = path.read_bytes()
    raw = [json.loads(line) for line in data.splitlines() if line.strip()]
    return raw, parse_shard(data, str(path))


def _curate(docs: list[dict], placement: str) -> list[dict]:
    """The similarity and documents stages, as the job's similarity UDF runs them."""
    return DocumentStage(FilterConfig())(SimilarityStage(SimilarityConfig(placement=placement))(docs))


def _misplaced(doc: dict, source_index: list[int]) -> list[int]:
    """Kept images that do not sit right after their MMC4 sentence in the document's layout.

    The layout is `interleave` (what tokenize.encode_doc lays out): an image sits right after
    sentence m when the text before it is exactly sentences 0..m (no more, no less).
    """
    kept = [i for i, im in enumerate(doc["images"]) if not im["drop_stage"]]
    parts, problems = interleave(doc["texts"], [doc["images"][i]["matched_text_index"] for i in kept])
    assert not problems
    bad, text_before = [], []
    for part in parts:
        if isinstance(part, str):
            text_before.append(part)
            continue
        image = kept[part]
        m = source_index[image]
        if " ".join(text_before) != " ".join(t for t in doc["texts"][: m + 1] if t):
            bad.append(image)
    return bad


def test_real_mmc4_kept_images_sit_after_the_sentence_mmc4_matched(shared_dir):
    raw, docs = _real(shared_dir)
    docs = _curate(docs, "source")
    n_images = sum(len(r["image_info"]) for r in raw)
    assert n_images == 417 and all(not d["drop_stage"] for d in docs)
    shared_sentence = 0
    for record, doc in zip(raw, docs, strict=True):
        source = [info["matched_text_index"] for info in record["image_info"]]
        low = [info["matched_sim"] < 0.15 for info in record["image_info"]]
        # Kept: every image MMC4 placed with matched_sim >= 0.15 (here: all of them).
        assert [not im["drop_stage"] for im in doc["images"]] == [not x for x in low]
        assert [im["matched_text_index"] for im in doc["images"]] == source
        assert _misplaced(doc, source) == []
        shared_sentence += len(source) != len(set(source))
    assert shared_sentence == 4  # MMC4 puts several images after one sentence; all are kept


def test_real_mmc4_matrix_placement_is_the_old_reassignment(shared_dir):
    """placement=matrix: MMC4's linear assignment over the shipped matrix, as before; it moves
    images away from the sentence MMC4 chose, which is why "source" is the default."""
    raw, docs = _real(shared_dir)
    docs = _curate(docs, "matrix")
    moved = dropped = 0
    for record, doc in zip(raw, docs, strict=True):
        expected = assign(np.asarray(record["similarity_matrix"], dtype=np.float32), 0.15)
        for im, (sentence, score, reason) in zip(doc["images"], expected):
            if reason:
                assert (im["drop_stage"], im["reason"]) == ("similarity", reason)
                dropped += 1
            else:
                assert im["matched_text_index"] == sentence and im["matched_sim"] == pytest.approx(score)
        moved += len(_misplaced(doc, [info["matched_text_index"] for info in record["image_info"]]))
    assert dropped == 10 and moved > 0  # 12 images, 4 sentences: one image per sentence under "matrix"


def _row(images: list[tuple[int, float]], n_sent: int = 3, matrix: list[list[float]] | None = None) -> dict:
    urls = [f"http://x/{i}.jpg" for i in range(len(images))]
    record = mmc4_doc("http://a.com", urls, n_sent=n_sent)
    for info, (idx, sim) in zip(record["image_info"], images):
        info["matched_text_index"], info["matched_sim"] = idx, sim
        if idx is None:
            del info["matched_text_index"]
    record["similarity_matrix"] = matrix
    [row] = parse_shard(json.dumps(record).encode(), "s.jsonl")
    assert not row["drop_stage"], row["error"]
    return row


def test_matrix_placement_keeps_the_old_behaviour_on_a_matrix_and_without_one():
    matrix = [[0.1, 0.4, 0.2], [0.3, 0.35, 0.1], [0.05, 0.1, 0.12]]
    row = _row([(0, 0.1), (1, 0.35), (2, 0.12)], matrix=matrix)
    old = copy.deepcopy(row)
    apply_assignment(old, np.asarray(matrix, dtype=np.float32), 0.15)  # the code path before placement
    [new] = SimilarityStage(SimilarityConfig(placement="matrix"))([row])
    assert new == old
    assert [(im["matched_text_index"], im["reason"]) for im in new["images"]] == [
        (1, ""), (0, ""), (2, "low_similarity")]
    # No matrix and no model: the given matches, one image per sentence (the best), as before.
    row = _row([(1, 0.2), (1, 0.5), (0, 0.3)])
    old = copy.deepcopy(row)
    apply_given_matches(old, 0.15)
    [new] = SimilarityStage(SimilarityConfig(placement="matrix"))([row])
    assert new == old and [im["reason"] for im in new["images"]] == ["duplicate_sentence_match", "", ""]


def test_source_placement_keeps_placements_and_names_every_drop():
    row = _row([(1, 0.2), (1, 0.5), (None, 0.3), (7, 0.3), (0, 0.1), (2, float("nan"))],
               matrix=[[0.3, 0.2, 0.1]] * 6)
    [doc] = SimilarityStage(SimilarityConfig())([row])  # default placement: source
    got = [(im["matched_text_index"], im["drop_stage"], im["reason"]) for im in doc["images"]]
    assert got == [(1, "", ""), (1, "", ""), (-1, "similarity", "no_source_placement"),
                   (7, "similarity", "matched_text_index_out_of_range"), (0, "similarity", "low_similarity"),
                   (2, "", "")]  # NaN matched_sim (no score, e.g. OBELICS): no threshold to apply
    assert "placement=matrix" in doc["images"][2]["error"] and "0.100 < 0.15" in doc["images"][4]["error"]


def test_documents_without_a_source_placement_are_dropped_with_reasons_under_source():
    """No matched_text_index at all (absent or null): "source" drops the images (counted as
    no_source_placement), then the documents stage the document; "matrix" places them."""
    row = _row([(None, 0.3), (None, 0.2)], matrix=[[0.3, 0.1, 0.0], [0.1, 0.2, 0.0]])
    again = copy.deepcopy(row)
    [doc] = _curate([row], "source")
    assert [im["reason"] for im in doc["images"]] == ["no_source_placement"] * 2
    assert (doc["drop_stage"], doc["reason"]) == ("documents", "too_few_images")
    [doc] = _curate([again], "matrix")
    assert [(im["matched_text_index"], im["reason"]) for im in doc["images"]] == [(0, ""), (1, "")]
    record = mmc4_doc("http://a.com", ["http://x/0.jpg"])
    record["image_info"][0]["matched_text_index"] = None  # null reads as "no placement", not a bad record
    [row] = parse_shard(json.dumps(record).encode(), "s.jsonl")
    assert row["reason"] == "" and row["images"][0]["matched_text_index"] == -1


def test_obelics_positions_are_kept_under_source(tmp_path):
    table = pa.table({"images": [[None, "http://x/1.jpg", "http://x/2.jpg", None, None]],
                      "texts": [["Intro.", None, None, "About both images.", "More."]],
                      "general_metadata": ["{}"]})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    [row] = parse_shard(buf.getvalue().to_pybytes(), "ob.parquet")
    [doc] = SimilarityStage(SimilarityConfig())([row])
    assert [(im["matched_text_index"], im["reason"]) for im in doc["images"]] == [(0, ""), (0, "")]
    assert all(math.isnan(im["matched_sim"]) for im in doc["images"])
    assert interleave(doc["texts"], [0, 0])[0] == ["Intro.", 0, 1, "About both images. More."]


def test_placement_setting_is_validated_and_recorded_in_the_manifest(tmp_path, monkeypatch):
    assert CurateConfig().similarity.placement == "source"
    cfg = load_config(CurateConfig(), None, ["similarity.placement=clip", "similarity.model=/some/clip"])
    assert cfg.similarity.placement == "clip"
    with pytest.raises(ConfigError, match=r"similarity.placement='nearest' is not valid; choose one of source, "
                                          r"matrix, clip"):
        load_config(CurateConfig(), None, ["similarity.placement=nearest"])
    with pytest.raises(ConfigError, match="placement=clip needs similarity.model"):
        load_config(CurateConfig(), None, ["similarity.placement=clip"])
    with pytest.raises(ConfigError, match="placement=source never uses it"):
        load_config(CurateConfig(), None, ["similarity.model=/some/clip"])
    with pytest.raises(ConfigError, match="set similarity.placement=clip"):
        load_config(CurateConfig(), None, ["similarity.recompute=true"])
    with pytest.raises(ValueError, match="placement=clip needs"):  # a config changed after loading
        SimilarityStage(SimilarityConfig(placement="clip"))
    with pytest.raises(ValueError, match="placement=source never uses it"):  # a model set for nothing
        SimilarityStage(SimilarityConfig(model="/no/such/clip"))

    # The manifest stores the whole CurateConfig (to_dict): similarity.placement is the record.
    # An empty input runs the job's driver path to the manifest without starting Ray.
    from pipelines.curate import manifest as mf
    from pipelines.curate.job import curate

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pipelines.curate.job.ray_init", no_ray)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cfg = CurateConfig()
    cfg.similarity.placement = "matrix"
    curate([str(tmp_path / "empty.jsonl")], tmp_path / "out", cfg)
    assert mf.load(tmp_path / "out")["config"]["similarity"]["placement"] == "matrix"
