"""`dreamcore generate` offline: JSONL prompts -> Ray Data rounds -> Parquet documents + manifest.

Units (no Ray): every line is checked as /v1/generate checks a request and a bad one becomes a
manifest entry with its reason; ids and seeds of lines without them are stable; pool sizing refuses
what would hang Ray Data; published files are found again, half-written ones removed.
End to end (the session's Ray, the debug checkpoint): a run that dies after its first shard is
rerun and every id is written exactly once, every input line is accounted for, and each
document equals, token for token and pixel for pixel, what `generate_document` makes in-process.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _model_helpers import png, solid_image
from _serve_helpers import make_checkpoint
from PIL import Image

from dreamcore.cli import build_parser
from dreamcore.config import ConfigError
from dreamcore.generate import GenerationParams
from dreamcore.schema import GENERATED_DOCUMENT_SCHEMA
from pipelines.generate import job
from pipelines.generate.config import GenerateConfig, PoolConfig
from pipelines.generate.job import (
    Dropped,
    GenerateError,
    Prompt,
    derive_id,
    derive_seed,
    generate,
    parse_line,
    read_prompts,
    written_ids,
)
from pipelines.serve.api import GenerateRequest, check_generate

CARD = {"num_inference_steps": 4, "guidance_scale": 2.0}  # what model_card reads from config.json
REPO = Path(__file__).resolve().parents[1]


def line(**obj) -> bytes:
    return json.dumps(obj).encode()


def b64_png(colour=(200, 30, 30), size=16) -> str:
    return base64.b64encode(png(solid_image(colour, size))).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt")


# ----------------------------------------------------------------------------------------------
# Reading and checking lines


def test_a_line_is_checked_exactly_as_the_server_checks_a_request():
    cfg = GenerateConfig()
    got = parse_line(1, line(id="a", prompt="a red circle", max_new_tokens=9, temperature=0.0, seed=5), cfg, CARD)
    req = GenerateRequest(input="a red circle", max_new_tokens=9, temperature=0.0, seed=5)
    parts, params = check_generate(req, cfg.limits, cfg.defaults, 4, 2.0, seed=123)
    assert isinstance(got, Prompt) and got.id == "a" and got.parts == parts and got.params == params
    assert params.seed == 5 and params.max_images == cfg.defaults.max_images and params.num_inference_steps == 4

    img = parse_line(2, line(id="b", parts=[{"type": "image", "image": b64_png()}, {"type": "text", "text": "it is"}]),
                     cfg, CARD)
    assert isinstance(img, Prompt) and isinstance(img.parts[0], bytes) and img.parts[1] == "it is"
    assert Image.open(io.BytesIO(img.parts[0])).size == (16, 16)


@pytest.mark.parametrize("raw, reason, says", [
    (b"{not json", "invalid_json", "JSONDecodeError"),
    (b"[1, 2]", "invalid_json", "expected a JSON object"),
    (line(id=["x"], prompt="p"), "bad_id", "id must be"),
    (line(id="", prompt="p"), "bad_id", "id must be"),
    (line(id="x", prompt="p", stream=True), "invalid_request", "stream: is not a known field"),
    (line(id="x"), "invalid_request", "exactly one of prompt"),
    (line(id="x", prompt="p", parts=[]), "invalid_request", "exactly one of prompt"),
    (line(id="x", prompt=["p"]), "invalid_request", "prompt: must be a string"),
    (line(id="x", parts=[]), "invalid_request", "parts: is empty"),
    (line(id="x", prompt="p", max_new_tokens=10_000), "invalid_request", "max_new_tokens: 10000 is more than the limit"),
    (line(id="x", prompt="p", temperature="hot"), "invalid_request", "temperature"),
    (line(id="x", prompt="p", top_p=0), "invalid_request", "top_p"),
    (line(id="x", prompt="p" * 9000), "invalid_request", "prompt: text is 9000 characters, more than the limit"),
    (line(id="x", parts=[{"type": "image", "image": "!!"}]), "invalid_request", "parts[0].image: is not valid base64"),
    (line(id="x", parts=[{"type": "image", "image": base64.b64encode(b"no image").decode()}]), "invalid_request",
     "parts[0].image: is not a PNG or JPEG image"),
])
def test_a_bad_line_is_dropped_with_a_reason_naming_the_field(raw, reason, says):
    got = parse_line(3, raw, GenerateConfig(), CARD)
    assert isinstance(got, Dropped) and got.line == 3 and got.reason == reason, got
    assert says in got.message, got.message
    assert "Traceback" not in got.message and "/work" not in got.message


def test_ids_and_seeds_of_lines_without_them_are_stable():
    cfg = GenerateConfig(seed=7)
    raw = line(prompt="a red circle")
    a, b, other_line = (parse_line(4, raw, cfg, CARD), parse_line(4, raw, cfg, CARD), parse_line(5, raw, cfg, CARD))
    assert a.id == b.id == derive_id(4, raw) and a.id.startswith("line4-") and other_line.id != a.id
    assert a.params.seed == b.params.seed == derive_seed(7, a.id) and other_line.params.seed != a.params.seed
    assert parse_line(4, raw, GenerateConfig(seed=8), CARD).params.seed != a.params.seed
    assert parse_line(6, line(id=12, prompt="p"), cfg, CARD).id == "12"


def test_every_line_is_read_once_blank_and_duplicate_lines_included(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([line(id="a", prompt="x"), b"", line(id="a", prompt="y"), b"{", line(prompt="z")])
                     + b"\n")
    prompts, dropped = read_prompts(path, GenerateConfig(), CARD)
    assert [p.line for p in prompts] == [1, 5]
    assert [(d.line, d.reason) for d in dropped] == [(2, "blank_line"), (3, "duplicate_id"), (4, "invalid_json")]
    assert "already used on line 1" in dropped[1].message
    with pytest.raises(GenerateError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl", GenerateConfig(), CARD)


# ----------------------------------------------------------------------------------------------
# Configuration and command line


def test_pools_are_sized_to_fit_beside_ray_data():
    cfg = GenerateConfig()
    llm, dec = cfg.stage_cpus(rounds=2, cluster_cpus=2)  # 3 LLM + 2 decoder actors share 1.5 CPUs
    assert llm == dec == pytest.approx(0.3)
    fixed = GenerateConfig(llm=PoolConfig(num_cpus=0.5))
    with pytest.raises(ConfigError, match="Ray Data would wait forever"):
        fixed.stage_cpus(rounds=4, cluster_cpus=2)  # 5 x 0.5 for the LLM alone
    with pytest.raises(ConfigError, match="llm.actors"):
        GenerateConfig(llm=PoolConfig(actors=0))


def test_the_generate_verb_has_two_forms():
    argv = ["generate", "--checkpoint", "/ck", "--input", "in.jsonl", "--output", "out",
            "--set", "decoder.batch_size=4", "--llm-actors", "2"]
    args = build_parser(argv).parse_args(argv)
    assert args._module == "pipelines.generate.cli"
    from pipelines.generate import cli

    cfg = cli.load(args)
    assert cfg.checkpoint == "/ck" and cfg.decoder.batch_size == 4 and cfg.llm.actors == 2
    with pytest.raises(ConfigError, match="unknown config key 'decoder.batch'"):
        cli.load(build_parser(argv).parse_args([*argv, "--set", "decoder.batch=4"]))
    client = ["generate", "--endpoint", "http://127.0.0.1:8000", "a red circle"]
    assert build_parser(client).parse_args(client)._module == "dreamcore.client"
    code = ("import sys\nfrom dreamcore.cli import build_parser\nbuild_parser(['generate'])\n"
            "heavy = [m for m in ('ray', 'torch') if m in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


# ----------------------------------------------------------------------------------------------
# Resume bookkeeping


def test_published_files_are_found_and_half_written_ones_removed(tmp_path):
    docs = tmp_path / job.DOCS
    docs.mkdir()
    table = pa.table({"id": ["a", "b"]})
    pq.write_table(table, docs / "part-1.parquet")
    (docs / ".tmp-part-2.parquet").write_bytes(b"killed mid-write")
    assert written_ids(tmp_path) == {f"{job.DOCS}/part-1.parquet": {"ids": ["a", "b"]}}
    assert not (docs / ".tmp-part-2.parquet").exists()
    pq.write_table(pa.table({"id": ["b"]}), docs / "part-3.parquet")
    with pytest.raises(GenerateError, match="'b' is in both"):
        written_ids(tmp_path)


def test_a_rerun_with_other_settings_is_refused(checkpoint, tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"{\n")  # nothing to generate: no Ray work
    out = tmp_path / "out"
    m = generate(tmp_path / "in.jsonl", out, GenerateConfig(checkpoint=str(checkpoint)))
    assert m["status"] == "complete" and m["counts"] == {"lines": 1, "written": 0, "dropped": 1, "pending": 0,
                                                         "written_not_in_input": 0}
    with pytest.raises(GenerateError, match="generated with seed=0"):
        generate(tmp_path / "in.jsonl", out, GenerateConfig(checkpoint=str(checkpoint), seed=1))
    with pytest.raises(GenerateError, match="no config.json"):
        generate(tmp_path / "in.jsonl", out, GenerateConfig(checkpoint=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# End to end on the session's Ray


def _params(i: int) -> dict:
    # Greedy and seeded sampling; one image allowed, so a document goes text -> image -> text.
    return {"max_new_tokens": 6, "max_images": 1 if i % 3 else 0, "temperature": 0.0 if i % 2 else 0.9,
            "top_p": 0.9, "seed": 100 + i, "num_inference_steps": 2, "guidance_scale": 2.0}


PROMPTS = ["a red circle", "the green square is next to", "draw a yellow circle", "here is a picture of",
           "a blue square", "two circles"]


def _input(path: Path) -> Path:
    lines = [line(id=f"doc{i}", prompt=p, **_params(i)) for i, p in enumerate(PROMPTS)]
    lines.insert(2, line(id="img", parts=[{"type": "image", "image": b64_png()}, {"type": "text", "text": "it is"}],
                         **_params(7)))
    lines += [b"{oops", line(id="doc0", prompt="again"), line(id="toolong", prompt="circle " * 300, **_params(1)),
              line(id="over", prompt="x", max_images=99)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _dies_after_first_shard(monkeypatch):
    """The job dies while writing its second shard, leaving the half-written file a kill leaves."""
    real = job.write_shard
    calls = []

    def write_then_die(out, name, rows):
        calls.append(name)
        if len(calls) == 1:
            return real(out, name, rows)
        (out / job.DOCS / f".tmp-{name}").write_bytes(b"half a parquet file")
        raise KeyboardInterrupt  # as Ctrl-C or SIGTERM would end the driver here

    monkeypatch.setattr(job, "write_shard", write_then_die)


@pytest.mark.e2e
def test_a_killed_run_resumes_and_every_document_equals_in_process(ray_session, checkpoint, tmp_path,
                                                                   monkeypatch):
    src = _input(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    # Batches of one: batched float kernels (left padding, UNet batch) can move a pixel by one level or
    # flip a near-tie token in ~1% of documents (bench/generate.py), so bit-exact equality with
    # generate_document, which runs each document alone, is the batch-of-one setting (docs/operations.md).
    cfg = GenerateConfig(checkpoint=str(checkpoint), docs_per_shard=2, progress=False)
    cfg.llm.batch_size, cfg.decoder.batch_size = 1, 1

    # 1. A run that dies after publishing one shard: the manifest says what is still pending.
    with monkeypatch.context() as m:
        _dies_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            generate(src, out, cfg)
    partial = job.load_manifest(out)
    first = partial["counts"]["written"]  # 2, or 1 when the too-long prompt shared the first shard
    refused = sum(d["reason"] == "prompt_too_long" for d in partial["dropped"])
    assert partial["status"] == "running" and first + refused == 2 and partial["counts"]["pending"] == 8 - first - refused
    assert len(partial["files"]) == 1 and list((out / job.DOCS).glob(".tmp-*"))

    # 2. The rerun skips the published ids and finishes; every line is accounted for.
    manifest = generate(src, out, cfg)
    assert manifest["status"] == "complete" and not list((out / job.DOCS).glob(".tmp-*"))
    assert manifest["runs"][-1]["skipped_on_resume"] == 2 and manifest["runs"][-1]["generated"] == 7 - first
    assert manifest["counts"] == {"lines": 11, "written": 7, "dropped": 4, "pending": 0, "written_not_in_input": 0}
    assert {(d["line"], d["id"], d["reason"]) for d in manifest["dropped"]} == {
        (8, None, "invalid_json"), (9, "doc0", "duplicate_id"), (10, "toolong", "prompt_too_long"),
        (11, "over", "invalid_request")}
    assert manifest["dropped_by_reason"] == {"duplicate_id": 1, "invalid_json": 1, "invalid_request": 1,
                                             "prompt_too_long": 1}
    table = pq.read_table(out / job.DOCS)
    assert table.schema.equals(GENERATED_DOCUMENT_SCHEMA)
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted([f"doc{i}" for i in range(6)] + ["img"])  # each id once
    assert sum(f["documents"] for f in manifest["files"]) == 7

    # 3. A third run has nothing left to do (and starts no pipeline).
    again = generate(src, out, cfg)
    assert again["runs"][-1]["skipped_on_resume"] == 8 and again["runs"][-1]["generated"] == 0

    # 4. Each document equals generate_document's in-process, same seed, token for token and image for image.
    import torch

    from dreamcore.checkpoint import from_pretrained
    from dreamcore.engine import TextEngine
    from dreamcore.generate import generate_document

    torch.set_num_threads(1)
    model, tok = from_pretrained(str(checkpoint))
    model.eval()
    engine = TextEngine(model, tok)
    images_seen = 0
    for r in rows:
        i = 7 if r["id"] == "img" else int(r["id"][3:])
        params = GenerationParams(**_params(i))
        assert json.loads(r["params"]) == vars(params) and r["seed"] == params.seed
        prompt = [p["text"] if p["type"] == "text" else p["image"] for p in r["prompt"]]
        want = generate_document(model, tok, prompt, params, engine=engine)
        got = r["parts"]
        assert [p["type"] for p in got] == ["text" if isinstance(w, str) else "image" for w in want], r["id"]
        for g, w in zip(got, want):
            if isinstance(w, str):
                assert g["text"] == w
            else:
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(g["image"])).convert("RGB")), np.asarray(w))
                images_seen += 1
        assert r["images"] == sum(p["type"] == "image" for p in got) <= params.max_images
        assert r["finish_reason"] in ("eos", "length") and 0 < r["completion_tokens"] <= params.max_new_tokens
    assert images_seen >= 2  # the nudged checkpoint draws: the image round and the feedback ran
