"""Fast unit tests of the curation pieces (no Ray): readers, crawl guards, filters, similarity,
manifest arithmetic, config."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _curate_helpers import CaseServer, bomb_png, image_bytes, mmc4_doc, write_jsonl

from dreamcore.config import ConfigError, load_config
from dreamcore.schema import SAMPLE_SCHEMA
from dreamcore.tokenizer import interleave
from pipelines.curate import manifest as mf
from pipelines.curate.config import CrawlConfig, CurateConfig, FilterConfig, embedded
from pipelines.curate.crawl import Crawler, Refused, check_address, robots_opt_out, sniff, truncated
from pipelines.curate.filters import DedupRules, DocumentStage, FilterStage, OptOutRule, TextQualityRule
from pipelines.curate.readers import InputError, expand_inputs, parse_shard, rows_to_table
from pipelines.curate.similarity import apply_given_matches, assign

# ---------------------------------------------------------------------------------------------- readers


def test_jsonl_bad_lines_are_dropped_with_reasons_and_the_rest_kept(tmp_path):
    good = mmc4_doc("http://a.com/1", ["http://x/1.jpg", "http://x/2.jpg"])
    data = "\n".join([json.dumps(good), "{broken", json.dumps({"url": "u"}), "",
                      json.dumps({**good, "image_info": [{"matched_text_index": 0}]})]).encode()
    rows = parse_shard(data, "s3://bucket/shard-1.jsonl")
    assert [r["reason"] for r in rows] == ["", "malformed_json", "missing_fields", "missing_fields"]
    assert rows[0]["doc_id"] == "shard-1.jsonl:1" and len(rows[0]["images"]) == 2
    assert "raw_url" in rows[3]["error"]
    rows_to_table(rows)  # the rows fit the schema


def test_gzip_and_truncated_gzip_keep_complete_lines():
    rng = np.random.default_rng(0)
    docs = [mmc4_doc(f"http://a.com/{i}", [f"http://x/{i}.jpg"]) for i in range(20)]
    for d in docs:  # incompressible text, so a cut stream still holds whole lines
        d["text_list"].append(rng.bytes(300).hex())
    raw = ("\n".join(json.dumps(d) for d in docs) + "\n").encode()
    gz = gzip.compress(raw)
    assert len(parse_shard(gz, "a.jsonl.gz")) == 20
    rows = parse_shard(gz[: len(gz) * 2 // 3], "a.jsonl.gz")
    assert rows[-1]["reason"] == "truncated_gzip"
    assert 0 < len(rows) - 1 < 20 and all(r["reason"] == "" for r in rows[:-1])


def test_similarity_matrix_shape_is_checked():
    doc = mmc4_doc("http://a.com", ["http://x/1.jpg"], n_sent=3)
    doc["similarity_matrix"] = [[0.1, 0.2]]  # 1 image x 2 sentences, but 3 sentences
    [row] = parse_shard(json.dumps(doc).encode(), "a.jsonl")
    assert row["reason"] == "missing_fields" and "similarity_matrix" in row["error"]


def test_obelics_parquet_keeps_the_order_of_images_and_texts(tmp_path):
    table = pa.table({
        "images": [[None, "http://x/1.jpg", None, "http://x/2.jpg"], [None]],
        "texts": [["Intro.", None, "About image one.", None], ["only"]],
        "general_metadata": [json.dumps({"url": "http://doc/1"}), "{}"],
    })
    bad = pa.table({"images": [[None, None]], "texts": [["a"]], "general_metadata": ["{}"]})
    buf = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables([table, bad.cast(table.schema)]), buf)
    rows = parse_shard(buf.getvalue().to_pybytes(), "ob.parquet")
    assert rows[0]["url"] == "http://doc/1"
    assert [im["matched_text_index"] for im in rows[0]["images"]] == [0, 1]
    # the layout (interleave: an image right after its matched text) is OBELICS's own order
    assert interleave(rows[0]["texts"], [0, 1])[0] == ["Intro.", 0, "About image one.", 1]
    lead = pa.table({"images": [["http://x/0.jpg", None]], "texts": [[None, "Caption after."]],
                     "general_metadata": ["{}"]})
    buf = pa.BufferOutputStream()
    pq.write_table(lead, buf)
    [row] = parse_shard(buf.getvalue().to_pybytes(), "lead.parquet")
    assert interleave(row["texts"], [im["matched_text_index"] for im in row["images"]])[0] == [0, "Caption after."]
    assert rows[2]["reason"] == "missing_fields" and "aligned" in rows[2]["error"]


def test_expand_inputs_accepts_files_folders_globs_and_names_bad_ones(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.jsonl", "b.jsonl.gz", "c.txt"):
        (tmp_path / "d" / name).write_text("")
    assert [p.rsplit("/", 1)[1] for p in expand_inputs([str(tmp_path / "d")])] == ["a.jsonl", "b.jsonl.gz"]
    assert len(expand_inputs([str(tmp_path / "d" / "*.jsonl")])) == 1
    assert expand_inputs([f"file://{tmp_path}/d/a.jsonl"]) == [f"file://{tmp_path}/d/a.jsonl"]
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(InputError, match="accepted suffixes"):
        expand_inputs([str(tmp_path / "d" / "c.txt")])


# ---------------------------------------------------------------------------------------------- crawl


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "224.0.0.1"])
def test_ssrf_guard_refuses_non_public_addresses(host):
    with pytest.raises(Refused) as e:
        check_address(host, 80, allow_private=False)
    assert e.value.reason == "ssrf_refused"


def test_link_local_stays_refused_even_when_private_networks_are_allowed():
    assert check_address("127.0.0.1", 80, allow_private=True) == "127.0.0.1"
    with pytest.raises(Refused, match="link-local"):
        check_address("169.254.169.254", 80, allow_private=True)


def test_robots_header_directives():
    d = ["noai", "noimageai", "noindex", "noimageindex"]
    assert robots_opt_out(["noai"], d, None) == "noai"
    assert robots_opt_out(["otherbot: noai", "nofollow"], d, None) is None
    assert robots_opt_out(["mytoken: noimageai"], d, "mytoken") == "noimageai"
    assert robots_opt_out(["all"], d, None) is None


def test_sniff_and_truncation():
    jpg, png = image_bytes("JPEG"), image_bytes("PNG")
    assert sniff(jpg) == "jpeg" and sniff(png) == "png" and sniff(image_bytes("WEBP")) == "webp"
    assert sniff(b"<html>") is None
    assert not truncated("jpeg", jpg) and truncated("jpeg", jpg[: len(jpg) // 2])
    assert not truncated("png", png) and truncated("png", png[:-20])


def test_crawler_outcomes_against_a_loopback_server():
    images = {"a.png": image_bytes("PNG", (60, 30), 1)}
    cfg = CrawlConfig(allow_private_networks=True, timeout_s=0.5, retries=1, backoff_s=0.01,
                      image_size=16, max_pixels=10_000_000)
    with CaseServer(images, slow_s=2.0) as srv:
        doc = {"drop_stage": "", "images": [
            {"url": f"{srv.base}/{p}", "drop_stage": "", "reason": "", "error": ""}
            for p in ("img/a.png", "redirect-ok", "flaky", "404", "slow", "to-private", "bomb", "text",
                      "noai", "truncated")
        ] + [{"url": "file:///etc/passwd", "drop_stage": "", "reason": "", "error": ""}]}
        Crawler(cfg, 16).crawl_docs([doc])
        assert srv.hits["/flaky"] == 2  # 500, then retried to 200
    got = [im["reason"] for im in doc["images"]]
    assert got == ["", "", "", "http_404", "timeout", "ssrf_refused", "too_many_pixels", "not_an_image",
                   "robots_opt_out", "truncated_image", "bad_scheme"]
    ok = doc["images"][0]
    assert (ok["orig_width"], ok["orig_height"], ok["width"], ok["height"]) == (60, 30, 16, 16)
    assert ok["data"][:4] == b"\x89PNG" and len(ok["sha256"]) == 64 and ok["phash"]


def test_pixel_cap_refuses_before_decode():
    from pipelines.curate.crawl import ImageProcessor

    with pytest.raises(Refused) as e:
        ImageProcessor(CrawlConfig(max_pixels=1_000_000), 16)(bomb_png(2000, 2000))
    assert e.value.reason == "too_many_pixels"


# ---------------------------------------------------------------------------------------------- filters


def _doc(texts, images):
    return {"doc_id": "d", "url": "http://site.org/page", "texts": texts, "drop_stage": "", "reason": "",
            "error": "", "images": [{"url": u, "drop_stage": "", "reason": "", "error": "", "orig_width": w,
                                     "orig_height": h} for u, w, h in images]}


def test_filter_stage_image_size_aspect_and_optout():
    cfg = FilterConfig(min_words=3, optout_domains=["blocked.com"])
    doc = _doc(["one two three four"], [("http://ok.com/a", 200, 200), ("http://ok.com/b", 100, 200),
                                         ("http://ok.com/c", 600, 200), ("http://cdn.blocked.com/d", 300, 300)])
    FilterStage(cfg)([doc])
    assert [im["reason"] for im in doc["images"]] == ["", "image_too_small", "aspect_ratio", "optout_domain"]
    assert "100x200" in doc["images"][1]["error"]


def test_text_quality_rules():
    rule = TextQualityRule(min_words=3, max_repetition_ratio=0.3, max_special_char_ratio=0.3)
    assert rule.check_document({"texts": ["", "  "]}) == "empty_text"
    assert rule.check_document({"texts": ["hi"]}).startswith("too_few_words")
    assert rule.check_document({"texts": ["same words here"] * 4}).startswith("repetition")
    assert rule.check_document({"texts": ["$$$ ### @@@ %%% ^^^ a b c"]}).startswith("special_characters")
    assert rule.check_document({"texts": ["A fine sentence.", "Another one here."]}) is None


def test_dropped_document_takes_its_images_along():
    doc = _doc(["x y z"], [("http://a/1", 200, 200), ("http://a/2", 200, 200)])
    doc["images"][1].update(drop_stage="crawl", reason="http_404")
    DocumentStage(FilterConfig(min_images=2))([doc])
    assert doc["reason"] == "too_few_images"
    assert [(im["drop_stage"], im["reason"]) for im in doc["images"]] == [
        ("documents", "document_dropped"), ("crawl", "http_404")]


def test_dedup_exact_near_and_repeated():
    h1, h2 = "ffff0000ffff0000", "ffff0000ffff0001"  # 1 bit apart
    records = [("a", 0, "s1", h1), ("b", 0, "s1", h1), ("b", 1, "s2", h2), ("c", 0, "s3", "0f0f0f0f0f0f0f0f")]
    plan = DedupRules(exact=True, near_distance=4, max_documents=0).plan(records)
    assert plan[("b", 0)][0] == "duplicate_image" and plan[("b", 1)][0] == "near_duplicate_image"
    assert ("a", 0) not in plan and ("c", 0) not in plan
    rep = DedupRules(exact=False, near_distance=-1, max_documents=1).plan(records)
    assert {k for k, v in rep.items() if v[0] == "repeated_image"} == {("a", 0), ("b", 0)}
    seen = DedupRules(near_distance=-1, max_documents=0).plan([("z", 0, "old", "")], seen_sha={"old"})
    assert seen[("z", 0)][0] == "duplicate_image"


def test_optout_file(tmp_path):
    f = tmp_path / "optout.txt"
    f.write_text("# comment\nexample.org\n")
    rule = OptOutRule.from_config(FilterConfig(optout_file=str(f)))
    assert rule.matches("https://img.example.org/x.jpg") == "example.org" and not rule.matches("http://a.com")


# ---------------------------------------------------------------------------------------------- similarity


def test_mmc4_assignment_one_image_per_sentence_and_threshold():
    sim = np.array([[0.30, 0.20, 0.0], [0.29, 0.10, 0.0], [0.12, 0.05, 0.10], [0.3, 0.3, 0.3]])
    got = assign(sim[:3], 0.15)
    assert [g[0] for g in got[:2]] == [0, 1] or [g[0] for g in got[:2]] == [1, 0]
    assert got[2][2] == "low_similarity"
    assert [g[2] for g in assign(sim, 0.0)].count("no_free_sentence") == 1  # 4 images, 3 sentences


def test_given_matches_repeated_index_keeps_the_best():
    doc = {"texts": ["a", "b"], "images": [
        {"matched_text_index": 0, "matched_sim": 0.2, "drop_stage": "", "reason": "", "error": ""},
        {"matched_text_index": 0, "matched_sim": 0.4, "drop_stage": "", "reason": "", "error": ""},
        {"matched_text_index": 7, "matched_sim": 0.4, "drop_stage": "", "reason": "", "error": ""},
        {"matched_text_index": 1, "matched_sim": 0.1, "drop_stage": "", "reason": "", "error": ""}]}
    apply_given_matches(doc, 0.15)
    assert [im["reason"] for im in doc["images"]] == [
        "duplicate_sentence_match", "", "matched_text_index_out_of_range", "low_similarity"]


# ---------------------------------------------------------------------------------------------- manifest, config


def test_stage_counts_hold_the_invariant_and_report_missing_output():
    docs = [("", ""), ("read", "malformed_json"), ("documents", "too_few_images"), ("", "")]
    images = [("", ""), ("crawl", "http_404"), ("crawl", "http_404"), ("documents", "document_dropped")]
    stages = mf.stage_counts(docs, images, written=(2, 0))
    m = {"stages": stages}
    assert mf.check_invariant(m) == []
    assert stages["crawl"]["dropped"]["images"] == {"http_404": 2}
    assert stages["read"]["in"]["documents"] == 4 and stages["documents"]["out"]["documents"] == 2
    assert stages["write"]["dropped"]["images"] == {"missing_from_output": 1}
    merged = mf.merge_stages(stages, stages)
    assert merged["crawl"]["dropped"]["images"] == {"http_404": 4} and mf.check_invariant({"stages": merged}) == []


def test_config_overrides_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("crawl:\n  timeout_s: 3\nfilter:\n  min_image_size: 64\n")
    cfg = load_config(CurateConfig(), y, ["similarity.style=core", "model_overrides.max_seq_len=512"])
    assert cfg.crawl.timeout_s == 3.0 and cfg.filter.min_image_size == 64
    assert cfg.similarity.effective_threshold() == 0.25 and cfg.model_config().max_seq_len == 512
    with pytest.raises(ConfigError, match="crawl.timeoutt"):
        load_config(CurateConfig(), None, ["crawl.timeoutt=3"])
    with pytest.raises(ConfigError, match="resize_mode"):
        load_config(CurateConfig(), None, ["crawl.resize_mode=squash"])
    assert embedded().crawl.allow_private_networks and not CurateConfig().crawl.allow_private_networks


def test_write_jsonl_helper_roundtrip(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [mmc4_doc("u", ["http://x/1"])], ["{bad"])
    assert [r["reason"] for r in parse_shard(p.read_bytes(), str(p))] == ["", "malformed_json"]


# ---------------------------------------------------------------------------------------------- tokenize


def test_encode_and_pack_drop_what_does_not_fit_with_reasons(tmp_path):
    from pipelines.curate.readers import empty_image
    from pipelines.curate.tokenize import encode_doc, pack_docs, tokenizer_for, train_tokenizer

    cfg = CurateConfig(model_overrides={"max_seq_len": 96})  # room for 2 image blocks of 28 tokens
    mcfg = cfg.model_config()
    train_tokenizer(["a red circle and a blue square"] * 20, mcfg, str(tmp_path / "tok"))
    tok = tokenizer_for(str(tmp_path / "tok"), mcfg)

    def doc(doc_id, n_images, texts):
        images = [dict(empty_image(f"http://x/{i}", i % len(texts)), data=image_bytes("PNG", (32, 32), i))
                  for i in range(n_images)]
        return {"doc_id": doc_id, "texts": texts, "drop_stage": "", "reason": "", "error": "",
                "images": images}

    many = encode_doc(tok, doc("many", 4, ["one", "two", "three", "four"]), mcfg)
    assert [im["reason"] for im in many["images"]].count("truncated") >= 2
    assert len(many["enc_input_ids"]) <= 96 and len(many["enc_images"]) == len(many["enc_image_slots"])
    empty = encode_doc(tok, doc("empty", 0, [""]), mcfg)
    assert empty["reason"] == "empty_document"
    small = encode_doc(tok, doc("small", 1, ["a red circle"]), mcfg)
    samples = pack_docs(tok, [many, empty, small], mcfg, packing=True)
    assert sorted(d for s in samples for d in s["doc_ids"]) == ["many", "small"]
    for s in samples:
        assert len(s["input_ids"]) == 96 and len(s["images"]) == len(s["image_slots"])
        for png, slot in zip(s["images"], s["image_slots"]):
            assert png[:4] == b"\x89PNG" and s["input_ids"][slot] == tok.im_patch_id
    pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA)  # the rows fit the published schema


def test_pair_layout_turns_one_image_documents_into_creation_and_comprehension_rows(tmp_path):
    """DreamLLM's pair data: a one-image document -> (sentence, dream block) and (image, sentence)."""
    from pipelines.curate.readers import empty_image
    from pipelines.curate.tokenize import encode_doc, pack_docs, tokenizer_for, train_tokenizer

    cfg = CurateConfig()
    mcfg = cfg.model_config()
    train_tokenizer(["a red circle and a blue square"] * 20, mcfg, str(tmp_path / "tok"))
    tok = tokenizer_for(str(tmp_path / "tok"), mcfg)

    def doc(doc_id, n_images, texts):
        images = [dict(empty_image(f"http://x/{i}", 0), data=image_bytes("PNG", (32, 32), i))
                  for i in range(n_images)]
        return {"doc_id": doc_id, "texts": texts, "drop_stage": "", "reason": "", "error": "",
                "images": images}

    pair = encode_doc(tok, doc("pair", 1, ["a red circle", "filler"]), mcfg)
    multi = encode_doc(tok, doc("multi", 2, ["a blue square", "more"]), mcfg)
    samples = pack_docs(tok, [pair, multi], mcfg, packing=False, pair_layout="pairs")
    by_doc = {}
    for s in samples:
        by_doc.setdefault(s["doc_ids"][0], []).append(s)
    assert len(by_doc["pair"]) == 2 and len(by_doc["multi"]) == 1  # several images stay interleaved
    creation, comprehension = by_doc["pair"]
    assert creation["dream_slots"][0] >= 0 and creation["image_slots"] == [-1]
    assert comprehension["image_slots"][0] >= 0 and comprehension["dream_slots"] == [-1]
    # The sentence is context for creation and the target of comprehension.
    targets = [t for t in comprehension["labels"] if t != -100]
    assert "red circle" in tok.decode(targets)
    assert creation["labels"][creation["dream_slots"][0] - 1] == tok.dream_start_id
    assert "red circle" not in tok.decode([t for t in creation["labels"] if t != -100])
    assert len({s["sample_id"] for s in samples}) == len(samples)  # ids stay unique
    pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA)


# ---------------------------------------------------------------------------------------------- job entry
# Both tests below must finish without Ray: `ray_init` is replaced by a guard that fails the test.


def _no_ray(monkeypatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pipelines.curate.job.ray_init", started)


def test_empty_input_is_a_zero_document_run_without_ray(tmp_path, monkeypatch, capsys):
    from dreamcore.cli import main

    _no_ray(monkeypatch)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n   \n\n")
    (tmp_path / "blank.jsonl.gz").write_bytes(gzip.compress(b"\n\n"))
    out = tmp_path / "out"
    assert main(["curate", str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.jsonl"),
                 str(tmp_path / "blank.jsonl.gz"), "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["documents_in"] == 0
    m = mf.load(out)
    zero = {"documents": 0, "images": 0}
    assert list(m["stages"]) == list(mf.STAGES)
    assert all(st["in"] == st["out"] == zero and st["dropped"] == {"documents": {}, "images": {}}
               for st in m["stages"].values())
    assert m["outputs"] == {"samples": 0, "files": []} and len(m["shards"]["done"]) == 3
    assert not list(out.glob(".tmp-*"))
    assert main(["curate", str(tmp_path / "empty.jsonl"), "--output", str(out)]) == 0  # rerun: skipped
    assert mf.load(out)["shards"]["skipped_on_resume"] == [str(tmp_path / "empty.jsonl")]
    from pipelines.curate.readers import local_shard_is_empty

    assert not local_shard_is_empty("s3://bucket/a.jsonl")  # remote shards are left to the job (no network)


@pytest.mark.parametrize("output, expected", [
    ("afile", "is an existing file"),
    ("afile/sub", "is a file, so the folder cannot be created"),
    ("nope://bucket/x", "cannot open this storage URI"),  # object stores are checked (tests/test_storage_s3.py)
])
def test_unusable_output_is_one_clear_message_before_ray(tmp_path, monkeypatch, capsys, output, expected):
    from dreamcore.cli import main
    from pipelines.curate.job import CurateError, curate

    _no_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    shard = write_jsonl(tmp_path / "s.jsonl", [mmc4_doc("http://a.com/1", ["http://x/1.jpg"])])
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["curate", str(shard), "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dreamcore curate: --output {output}") and expected in err
    assert err.count("\n") == 1  # one line, no traceback
    with pytest.raises(CurateError, match=expected):  # the Python API checks too
        curate([str(shard)], output)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created (no "s3:" folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_parent_is_named(tmp_path):
    from pipelines.curate.job import CurateError, check_output

    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(CurateError, match="not writable"):
        check_output(tmp_path / "ro" / "out")


def test_a_broken_manifest_is_one_clear_line_from_the_cli(tmp_path, capsys):
    """A manifest.json that is not JSON (a crash mid-write by something else, a hand edit): the CLI
    names the file and the fix and exits 2, before any Ray work."""
    from dreamcore.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    shard = tmp_path / "s.jsonl"
    shard.write_text("")
    assert main(["curate", str(shard), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is not valid JSON" in err and "move it away" in err and "Traceback" not in err
    (out / "samples").mkdir()
    (out / "samples" / "part-g0000-00000.parquet").write_bytes(b"published")
    for text in ("null", "[]", "{}"):  # valid JSON that is no manifest: refused, nothing cleaned away
        (out / "manifest.json").write_text(text)
        assert main(["curate", str(shard), "--output", str(out)]) == 2
        assert "is not a curation manifest" in capsys.readouterr().err
    assert (out / "samples" / "part-g0000-00000.parquet").read_bytes() == b"published"


def test_orphan_cleanup_removes_only_what_a_killed_run_left(tmp_path):
    """_state/hashes-* of groups the manifest lacks (both file namings) and unlisted samples go;
    a published group's hashes and files that are not ours stay (a stray name never crashes)."""
    from pipelines.curate.job import STATE, _clean_orphans

    m = mf.new_manifest({}, {})
    m["groups"] = [{"id": "g0000"}]
    m["outputs"]["files"] = ["samples/part-g0000-00000.parquet"]
    files = {f"{STATE}/hashes-g0000-00000.parquet": True, f"{STATE}/hashes-g0001-00000.parquet": False,
             f"{STATE}/hashes-g0009.parquet": False, f"{STATE}/foo.parquet": True, f"{STATE}/hashes.parquet": True,
             "samples/part-g0000-00000.parquet": True, "samples/part-g0001-00000.parquet": False}
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / ".tmp-g0001-dead").mkdir()
    _clean_orphans(tmp_path, m)
    assert {rel: (tmp_path / rel).exists() for rel in files} == files
    assert not (tmp_path / ".tmp-g0001-dead").exists()
