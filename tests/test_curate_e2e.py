"""End-to-end curation on the session's local Ray against real HTTP servers on 127.0.0.1.

Every case of the issue ends in its expected status or reason, the manifest invariant holds at
every stage, the samples match SAMPLE_SCHEMA, reruns resume, and the real MMC4 shard is crawled
both through a loopback server and (unreachable) from its real URLs.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _curate_helpers import CaseServer, image_bytes, mmc4_doc, save_tiny_clip, write_jsonl
from PIL import Image

from dreamcore.schema import SAMPLE_SCHEMA
from dreamcore.tokenizer import DreamTokenizer
from pipelines.curate import manifest as mf
from pipelines.curate.config import CurateConfig, embedded
from pipelines.curate.job import CurateError, curate

pytestmark = pytest.mark.e2e

REAL_SHARD = "data/mmc4/docs_no_face_shard_151_v3.partial.jsonl"


def _fast(cfg: CurateConfig) -> CurateConfig:
    cfg.crawl.timeout_s = 1.0
    cfg.crawl.retries = 1
    cfg.crawl.backoff_s = 0.05
    cfg.progress = False
    return cfg


def _rejected(out: Path) -> list[dict]:
    return pq.read_table(out / "rejected").to_pylist()


def _assert_manifest(m: dict) -> None:
    assert {"stages", "outputs"} <= set(m)
    assert list(m["stages"]) == list(mf.STAGES)
    for st in m["stages"].values():
        assert set(st) == {"in", "out", "dropped"} and set(st["dropped"]) == {"documents", "images"}
    assert mf.check_invariant(m) == []


def test_every_case_ends_in_its_reason_and_reruns_resume(ray_session, tmp_path):
    images = {f"{i}.jpg": image_bytes("JPEG", (64, 48), i) for i in range(6)}
    images |= {"a.png": image_bytes("PNG", (40, 40), 50), "b.webp": image_bytes("WEBP", (40, 40), 51),
               "c.png": image_bytes("PNG", (40, 40), 52), "d.png": image_bytes("PNG", (40, 40), 53)}
    with CaseServer(images, slow_s=3.0) as srv:
        b = srv.base
        docs = [mmc4_doc(f"http://ex.com/{i}", [f"{b}/img/{2 * i}.jpg", f"{b}/img/{2 * i + 1}.jpg"], offset=i)
                for i in range(3)]
        cases = ["img/a.png", "img/b.webp", "404", "flaky", "slow", "to-private", "bomb", "text", "noai",
                 "truncated"]
        docs.append(mmc4_doc("http://ex.com/cases", [f"{b}/{c}" for c in cases], n_sent=6))
        empty = mmc4_doc("http://ex.com/empty", [f"{b}/img/c.png"])
        empty["text_list"] = ["", "  "]
        repeated = mmc4_doc("http://ex.com/rep", [f"{b}/img/d.png", f"{b}/redirect-ok"], n_sent=3)
        for info in repeated["image_info"]:
            info["matched_text_index"] = 1  # both images claim sentence 1
        repeated["image_info"][0]["matched_sim"] = 0.5
        (tmp_path / "in").mkdir()
        shard1 = write_jsonl(tmp_path / "in" / "s1.jsonl", docs + [empty, repeated],
                             ["{this is not json", json.dumps({"url": "http://ex.com/nofields"})])
        out = tmp_path / "out"
        m = curate([str(shard1)], out, _fast(embedded()))
        assert srv.hits["/flaky"] == 2  # retried after the 500

    _assert_manifest(m)
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in _rejected(out) if r["image_index"] >= 0}
    expected = {"404": "http_404", "slow": "timeout", "to-private": "ssrf_refused", "bomb": "too_many_pixels",
                "text": "not_an_image", "noai": "robots_opt_out", "truncated": "truncated_image"}
    for name, reason in expected.items():
        assert by_url[name]["reason"] == reason and by_url[name]["stage"] == "crawl", by_url[name]
    assert "flaky" not in by_url and "a.png" not in by_url and "b.webp" not in by_url
    assert by_url["c.png"]["reason"] == "document_dropped"  # its document has no text
    # The source's placements are kept (similarity.placement=source): two images may share a sentence.
    assert not [r for r in _rejected(out) if r["stage"] == "similarity"]
    doc_reasons = {r["doc_id"].split(":")[1]: r["reason"] for r in _rejected(out) if r["image_index"] == -1}
    assert doc_reasons == {"5": "empty_text", "7": "malformed_json", "8": "missing_fields"}
    st = m["stages"]
    assert st["read"]["in"] == {"documents": 8, "images": 19}
    assert st["crawl"]["dropped"]["images"] == {r: 1 for r in expected.values()}
    assert st["write"]["out"] == {"documents": 5, "images": 11}

    # Samples: schema, fixed length, PNG at the model's resolution, tokenizer beside them.
    table = pq.read_table(out / m["outputs"]["files"][0])
    assert table.schema.remove_metadata() == SAMPLE_SCHEMA.remove_metadata()
    rows = pq.read_table(out / "samples").to_pylist()
    assert sum(len(r["images"]) for r in rows) == 11 and len(rows) == m["outputs"]["samples"]
    res = CurateConfig().model_config().image_resolution
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == 256
        assert len(r["images"]) == len(r["image_slots"]) == len(r["dream_slots"])
        for png in r["images"]:
            assert Image.open(io.BytesIO(png)).size == (res, res)
    tok = DreamTokenizer.from_pretrained(out / "tokenizer")
    assert tok.content_hash() == m["tokenizer_hash"]

    # Rerun: the finished shard is skipped; leftovers of a killed run are removed.
    (out / ".tmp-g0009-dead").mkdir()
    (out / "samples" / "part-g0009-00000.parquet").write_bytes(b"half written")
    again = curate([str(shard1)], out, _fast(embedded()))
    assert again["shards"]["skipped_on_resume"] == [str(shard1)] and again["outputs"] == m["outputs"]
    assert not (out / ".tmp-g0009-dead").exists()
    assert not (out / "samples" / "part-g0009-00000.parquet").exists()

    # A new shard through the CLI: only it is processed; counts add up.
    with CaseServer({"e.png": image_bytes("PNG", (40, 40), 60)}) as srv2:
        shard2 = write_jsonl(tmp_path / "in" / "s2.jsonl", [mmc4_doc("http://ex.com/2", [f"{srv2.base}/img/e.png"])])
        from dreamcore.cli import main

        shard2_uri = f"file://{shard2}"  # a URI goes through the same pyarrow filesystem path as s3://
        rc = main(["curate", str(shard1), shard2_uri, "--output", str(out), "--profile", "embedded",
                   "--set", "crawl.timeout_s=1.0", "--set", "crawl.retries=1", "--set", "crawl.backoff_s=0.05",
                   "--set", "progress=false"])
    assert rc == 0
    final = mf.load(out)
    _assert_manifest(final)
    assert final["shards"]["done"] == sorted([str(shard1), shard2_uri])
    assert final["stages"]["read"]["in"]["documents"] == 9 and len(final["groups"]) == 2
    assert final["stages"]["write"]["out"]["images"] == 12
    assert len(final["rejected"]["files"]) == 2

    # Resuming with a layout that would not match the published samples is refused up front.
    changed = _fast(embedded())
    changed.tokenize.packing = "truncate"
    with pytest.raises(CurateError, match="tokenize.packing"):
        curate([str(shard1)], out, changed)


def test_bad_cli_input_is_one_clear_line(ray_session, tmp_path, capsys):
    from dreamcore.cli import main

    assert main(["curate", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "crawl.nope=1"]) == 2
    assert "crawl.nope" in capsys.readouterr().err
    (tmp_path / "s.jsonl").write_text("")
    assert main(["curate", str(tmp_path / "s.jsonl"), "--output", str(tmp_path / "o"),
                 "--set", "similarity.placement=clip", "--set", f"similarity.model={tmp_path / 'no-clip'}"]) == 2
    assert "similarity.model" in capsys.readouterr().err


def test_empty_shard_too_large_for_the_driver_check_is_a_zero_document_run(ray_session, tmp_path):
    """5 KB of blank lines is above local_shard_is_empty's size limit, so it goes through Ray."""
    shard = tmp_path / "blank.jsonl"
    shard.write_text("\n" * 5000)
    m = curate([str(shard)], tmp_path / "out", _fast(CurateConfig()))
    _assert_manifest(m)
    assert all(st["in"] == st["out"] == {"documents": 0, "images": 0} for st in m["stages"].values())
    assert m["shards"]["done"] == [str(shard)] and m["outputs"]["samples"] == 0
    assert not list((tmp_path / "out").glob(".tmp-*"))


def _real_docs(shared_dir: Path) -> list[dict]:
    path = shared_dir / REAL_SHARD
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_mmc4_shard_through_loopback_with_tiny_clip(ray_session, shared_dir, tmp_path):
    docs = _real_docs(shared_dir)
    n_images = sum(len(d["image_info"]) for d in docs)
    images = {}
    for d in docs:
        for info in d["image_info"]:
            name = f"{len(images)}.jpg"
            images[name] = image_bytes("JPEG", (200, 160), len(images))
            info["raw_url"] = name
    clip = save_tiny_clip(tmp_path / "clip")
    cfg = _fast(CurateConfig())
    cfg.crawl.allow_private_networks = True
    cfg.crawl.timeout_s = 5.0
    cfg.similarity.model = str(clip)
    cfg.similarity.placement = "clip"  # score with the CLIP actor instead of the shard's placements
    cfg.similarity.threshold = -1.0  # a random tiny CLIP: let the assignment alone decide
    cfg.filter.max_sentences = 0
    with CaseServer(images) as srv:
        for d in docs:
            for info in d["image_info"]:
                info["raw_url"] = f"{srv.base}/img/{info['raw_url']}"
        shard = write_jsonl(tmp_path / "real.jsonl", docs)
        m = curate([str(shard)], tmp_path / "out", cfg)
    _assert_manifest(m)
    assert m["stages"]["read"]["in"] == {"documents": 107, "images": n_images}
    assert m["stages"]["crawl"]["dropped"]["images"] == {}  # every loopback image downloaded
    assert m["stages"]["write"]["out"]["images"] > 0 and m["outputs"]["samples"] > 0
    sim_drops = m["stages"]["similarity"]["dropped"]["images"]
    assert set(sim_drops) <= {"no_free_sentence"}  # threshold -1: only sentence scarcity drops


def test_unreachable_real_urls_all_end_as_download_failures(ray_session, shared_dir, tmp_path):
    docs = _real_docs(shared_dir)
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(docs[0]["image_info"][0]["raw_url"]).hostname
    try:
        socket.getaddrinfo(host, 80)
        pytest.skip(f"{host} resolves: this machine reaches the web, and tests never download")
    except OSError:
        pass
    cfg = _fast(CurateConfig())  # public-web defaults: SSRF guard on
    cfg.crawl.timeout_s = 2.0
    cfg.crawl.retries = 0
    m = curate([str(shared_dir / REAL_SHARD)], tmp_path / "out", cfg)
    _assert_manifest(m)
    n_images = sum(len(d["image_info"]) for d in docs)
    crawl = m["stages"]["crawl"]
    assert crawl["in"]["images"] == n_images and crawl["out"]["images"] == 0
    assert sum(crawl["dropped"]["images"].values()) == n_images
    assert set(crawl["dropped"]["images"]) <= {"dns_failure", "connection_error", "timeout", "ssrf_refused"}
    rejected = [r for r in _rejected(tmp_path / "out") if r["image_index"] >= 0]
    assert len(rejected) == n_images and all(r["reason"] and r["error"] for r in rejected)
    assert m["outputs"]["samples"] == 0 and m["stages"]["documents"]["out"]["documents"] == 0
    shutil.rmtree(tmp_path / "out")
