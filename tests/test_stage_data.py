"""Stage data: caption pairs in img2dataset's own output formats (stage I) and LLaVA-style
conversations with a chat template and loss on assistant turns only (stage III / SFT).

The img2dataset shards are written by img2dataset's own writers (ParquetSampleWriter,
WebDatasetSampleWriter) with the metadata columns its downloader adds, so the reader is tested
on the files a user's `img2dataset --output_format parquet|webdataset` run leaves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _curate_helpers import image_bytes

from dreamcore.config import tiny
from dreamcore.tokenizer import IGNORE_INDEX, DreamTokenizer
from pipelines.curate import manifest as mf
from pipelines.curate.config import embedded
from pipelines.curate.job import curate
from pipelines.curate.readers import expand_inputs, parse_shard

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CAPTIONS = ["a red square on a white page", "a blue circle in the middle", "a green triangle at the top"]


def _img2dataset_output(folder: Path, output_format: str) -> Path:
    """One shard as img2dataset writes it: two good samples and one its downloader failed."""
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    folder.mkdir(parents=True, exist_ok=True)
    schema = (pa.schema([("url", pa.string()), ("caption", pa.string())])
              .append(pa.field("key", pa.string())).append(pa.field("status", pa.string()))
              .append(pa.field("error_message", pa.string())).append(pa.field("width", pa.int32()))
              .append(pa.field("height", pa.int32())).append(pa.field("original_width", pa.int32()))
              .append(pa.field("original_height", pa.int32())).append(pa.field("sha256", pa.string())))
    writer_cls = {"parquet": ParquetSampleWriter, "webdataset": WebDatasetSampleWriter}[output_format]
    writer = writer_cls(0, str(folder), True, 5, schema, "jpg")
    for i, caption in enumerate(CAPTIONS):
        ok = i != 2
        meta = {"url": f"http://img.example/{i}.jpg", "caption": caption, "key": f"{i:09d}",
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP Error 404: Not Found", "width": 64 if ok else None,
                "height": 64 if ok else None, "original_width": 64 if ok else None,
                "original_height": 64 if ok else None, "sha256": None}
        writer.write(image_bytes("JPEG", (64, 64), i) if ok else None, meta["key"], caption if ok else None, meta)
    writer.close()
    return folder


@pytest.mark.parametrize("output_format", ["parquet", "webdataset"])
def test_img2dataset_output_reads_as_caption_pairs_with_their_bytes(tmp_path, output_format):
    folder = _img2dataset_output(tmp_path / output_format, output_format)
    shards = expand_inputs([str(folder)])
    # webdataset: the .tar only (its .parquet sidecar holds metadata, no images)
    assert [Path(s).name for s in shards] == (["00000.tar"] if output_format == "webdataset" else ["00000.parquet"])
    rows = parse_shard(Path(shards[0]).read_bytes(), shards[0])
    kept = [r for r in rows if not r["drop_stage"]]
    assert [r["texts"] for r in kept] == [[CAPTIONS[0]], [CAPTIONS[1]]]
    for i, r in enumerate(kept):
        (image,) = r["images"]
        assert image["source"] == "embedded" and image["data"] == image_bytes("JPEG", (64, 64), i)
        assert image["matched_text_index"] == 0 and image["url"] == f"http://img.example/{i}.jpg"
    if output_format == "parquet":  # img2dataset's parquet keeps failed samples; webdataset skips them
        (failed,) = [r for r in rows if r["drop_stage"]]
        assert failed["reason"] == "source_failed" and "404" in failed["error"]
    # The sidecar alone is one clear drop row, not silence.
    if output_format == "webdataset":
        sidecar = folder / "00000.parquet"
        (row,) = parse_shard(sidecar.read_bytes(), str(sidecar))
        assert row["reason"] == "no_image_column" and "--output_format parquet" in row["error"]


def test_a_damaged_webdataset_shard_keeps_what_precedes_the_damage(tmp_path):
    data = (_img2dataset_output(tmp_path, "webdataset") / "00000.tar").read_bytes()
    rows = parse_shard(data[:10240], "x/00000.tar")  # cut inside the second sample
    assert [(r["doc_id"], r["reason"]) for r in rows] == [("00000.tar:000000000", ""),
                                                         ("00000.tar:tail", "truncated_tar")]
    assert [r["reason"] for r in parse_shard(b"not a tar" * 100, "x/g.tar")] == ["unreadable_tar"]


def _llava(folder: Path) -> Path:
    """LLaVA-style instruction data: a JSON array, images relative to the file's folder."""
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / "coco" / f"{i}.png").write_bytes(image_bytes("PNG", (48, 48), 10 + i))
    records = [
        {"id": "q0", "image": "coco/0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is this?"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "And its colour?"},
            {"from": "gpt", "value": "Red."}]},
        {"id": "draw", "image": ["coco/1.png"], "conversations": [  # the assistant draws (DreamLLM)
            {"from": "human", "value": "Draw a blue circle."},
            {"from": "gpt", "value": "Here it is: <image> A blue circle."}]},
        {"id": "missing", "image": "coco/none.png", "conversations": [
            {"from": "human", "value": "<image> Describe it."}, {"from": "gpt", "value": "It is gone."}]},
        {"id": "escape", "image": "../x.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "no"}]},
        {"id": "count", "image": "coco/2.png", "conversations": [
            {"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "no"}]},
    ]
    path = folder / "instruct.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def test_llava_conversations_read_with_roles_and_dataset_images(tmp_path):
    path = _llava(tmp_path)
    rows = parse_shard(path.read_bytes(), str(path))
    q0, draw, missing, escape, count = rows
    assert q0["roles"] == ["user", "user", "assistant", "user", "assistant"]
    assert q0["texts"] == ["", "What shape is this?", "A red square.", "And its colour?", "Red."]
    (img,) = q0["images"]
    assert img["source"] == "dataset" and img["url"] == str(tmp_path / "coco" / "0.png")
    assert img["matched_text_index"] == 0  # right after the (empty) text before the placeholder
    assert draw["roles"][draw["images"][0]["matched_text_index"]] == "assistant"
    assert not missing["drop_stage"]  # the file is looked for by the crawl step (image_not_found)
    assert escape["reason"] == "missing_fields" and "inside it" in escape["error"]
    assert count["reason"] == "missing_fields" and "placeholder" in count["error"]
    text_only = json.dumps({"id": "t", "image": None, "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    (row,) = parse_shard(text_only.encode(), str(tmp_path / "t.jsonl"))
    assert not row["drop_stage"] and row["images"] == [] and row["roles"] == ["user", "assistant"]


def test_conversation_images_stay_in_their_turn_under_every_placement(tmp_path):
    """similarity.placement matrix / clip re-assign web documents' images; a conversation's image
    belongs to the turn that holds it and is never moved (nor dropped for a missing matrix)."""
    from pipelines.curate.config import SimilarityConfig
    from pipelines.curate.similarity import SimilarityStage

    path = _llava(tmp_path)
    draw = parse_shard(path.read_bytes(), str(path))[1]
    before = [im["matched_text_index"] for im in draw["images"]]
    (after,) = SimilarityStage(SimilarityConfig(placement="matrix"))([draw])
    assert [(im["matched_text_index"], im["drop_stage"]) for im in after["images"]] == [(i, "") for i in before]


def test_a_conversation_image_without_its_text_is_dropped_with_a_reason(tok, tmp_path):
    from pipelines.curate.tokenize import encode_doc

    path = _llava(tmp_path)
    q0 = parse_shard(path.read_bytes(), str(path))[0]
    q0["images"][0].update(matched_text_index=99, data=image_bytes("PNG", (16, 16), 1))
    out = encode_doc(tok, q0, tiny())
    assert out["images"][0]["reason"] == "matched_text_index_out_of_range" and out["enc_images"] == []
    assert not out["drop_stage"]  # the text turns still train
    assert [t for t in out["enc_labels"] if t != IGNORE_INDEX] == (
        tok.encode_text("A red square.") + [tok.eos_id] + tok.encode_text("Red.") + [tok.eos_id])


def test_only_sft_checkpoints_get_their_chat_template():
    from pipelines.serve.openai_api import chat_template_of

    assert chat_template_of({"stage": "SFT", "chat_template": "vicuna_v1"}) == "vicuna_v1"
    assert chat_template_of({"stage": "SFT"}) == "vicuna_v1"  # checkpoints from before the field
    assert chat_template_of({"stage": "II", "chat_template": "vicuna_v1"}) is None


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> DreamTokenizer:
    mcfg = tiny()
    return DreamTokenizer.build(mcfg.tokenizer, mcfg.vision.num_tokens, mcfg.dream.num_queries,
                                CAPTIONS + ["USER: ASSISTANT: What shape is this? Red. Draw it."] * 20)


def test_conversation_layout_trains_on_assistant_turns_only(tok):
    turns = [("user", 0), ("user", "What shape is this?"), ("assistant", "A red square."),
             ("user", "Draw it bigger."), ("assistant", "Here:"), ("assistant", 1)]
    enc = tok.encode_conversation(turns)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels) and enc.image_indices == [0, 1]
    # image 0 (the user's) is read only; image 1 (drawn by the assistant) has its dream block first
    assert enc.dream_slots[0] == -1 and enc.image_slots[0] > 0 and enc.dream_slots[1] > 0
    assert labels[enc.dream_slots[1] - 1] == tok.dream_start_id  # drawing is a target
    assert all(label == IGNORE_INDEX for label in labels[enc.image_slots[0] - 1: enc.image_slots[0] + 20])
    targets = [t for t in labels if t != IGNORE_INDEX]
    expected = (tok.encode_text("A red square.") + [tok.eos_id] + tok.encode_text("Here:")
                + [tok.dream_start_id, tok.eos_id])
    assert targets == expected  # assistant text, the EOS closing each of its turns, <dream_start>
    text = " ".join(tok.decode(ids).split())
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert "USER: What shape is this? ASSISTANT: A red square. USER: Draw it bigger. ASSISTANT: Here:" in text
    with pytest.raises(ValueError, match="nothing to train on"):
        tok.encode_conversation([("user", "hello")])
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.encode_conversation([("bot", "hello")])


@pytest.mark.e2e
def test_curate_pairs_and_conversations_into_training_rows(ray_session, tmp_path):
    """One curation job over img2dataset parquet, img2dataset webdataset and LLaVA JSON: pairs
    become creation + comprehension rows (stage I), conversations keep their chat layout; every
    input document and image is accounted for in the manifest."""
    pq_dir = _img2dataset_output(tmp_path / "pairs_pq", "parquet")
    wds_dir = _img2dataset_output(tmp_path / "pairs_wds", "webdataset")
    llava = _llava(tmp_path / "sft")
    cfg = embedded()
    cfg.progress = False
    cfg.tokenize.pair_layout = "pairs"
    cfg.tokenize.packing = "truncate"
    out = tmp_path / "out"
    m = curate([str(pq_dir), str(wds_dir), str(llava)], out, cfg)
    assert mf.check_invariant(m) == []
    rejected = pq.read_table(out / "rejected").to_pylist()
    reasons = sorted((r["doc_id"].split(":")[0], r["reason"]) for r in rejected)
    assert ("00000.parquet", "source_failed") in reasons
    assert ("instruct.json", "image_not_found") in reasons
    samples = pq.read_table(out / "samples").to_pylist()
    tok = DreamTokenizer.from_pretrained(out / "tokenizer")
    pair_rows = [s for s in samples if not s["doc_ids"][0].startswith("instruct.json")]
    assert len(pair_rows) == 2 * 4  # 2 good samples x 2 shards, each a creation and a comprehension row
    sft_rows = [s for s in samples if s["doc_ids"][0].startswith("instruct.json")]
    assert sorted(s["doc_ids"][0] for s in sft_rows) == ["instruct.json:0", "instruct.json:1"]
    expected = {  # the loss sees assistant turns only: their text, <dream_start>, the EOS of each turn
        "instruct.json:0": tok.encode_text("A red square.") + [tok.eos_id] + tok.encode_text("Red.") + [tok.eos_id],
        "instruct.json:1": tok.encode_text("Here it is:") + [tok.dream_start_id] + tok.encode_text("A blue circle.")
        + [tok.eos_id],
    }
    for s in sft_rows:
        assert [t for t in s["labels"] if t != IGNORE_INDEX] == expected[s["doc_ids"][0]]
        assert "USER: What shape is this? ASSISTANT: A red square." in " ".join(tok.decode(s["input_ids"]).split()) \
            or s["doc_ids"][0].endswith(":1")
        assert len(s["images"]) == 1


def test_served_chat_prompt_is_laid_out_as_the_training_conversation():
    """A SFT model served through /v1/chat/completions sees its conversation exactly as it
    was trained on it: the chat route's prompt (openai_api.chat_prompt -> TextEngine.layout) gives
    the training layout's token ids up to the answer the model is to write."""
    from _model_helpers import debug_model, solid_image

    from dreamcore.engine import TextEngine
    from pipelines.serve.openai_api import chat_prompt

    model, tok = debug_model()
    engine = TextEngine(model, tok)
    red, blue = solid_image((220, 30, 30), 32), solid_image((30, 60, 220), 32)
    history = [("system", "Be brief."), ("user", "What shape is this?"), ("user", red),
               ("assistant", "A square."), ("assistant", blue), ("user", "And now?")]
    parts, roles = [p for _, p in history], [r for r, _ in history]
    served = engine.layout(chat_prompt(parts, roles, "vicuna_v1")).ids
    trained = tok.encode_conversation([(r, p if isinstance(p, str) else i) for i, (r, p) in enumerate(history)]
                                      + [("assistant", "It is round.")])
    answer = tok.encode_text("It is round.") + [tok.eos_id]
    assert served == trained.input_ids[: len(trained.input_ids) - len(answer)]
    assert trained.input_ids[len(served):] == answer
    # Without a template (stage I/II models) the parts go in as a document, drawn images marked.
    plain = engine.layout(chat_prompt(parts, roles, None))
    assert plain.ids == tok.encode_prompt(["Be brief.", "What shape is this?", 0, "A square.", 1, "And now?"],
                                                drawn=[1]).input_ids
