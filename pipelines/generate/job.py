"""Offline batch generation on Ray Data: `generate(input, output, config) -> manifest dict`.

1. read      the JSONL on the driver; each line is checked as /v1/generate checks a request
             (pipelines/serve/api.py), a bad line becomes a manifest entry with its reason
2. resume    ids already in DIR/documents/*.parquet are skipped (published files are complete)
3. rounds    Ray Data: text round 0 -> image round 0 -> text round 1 -> ... -> text round M, each an
             actor pool holding one half of the checkpoint (pipelines/serve/replicas.py); the rounds
             drive dreamcore.generate.Document over dreamcore.engine, as the server's Ingress does
4. write     the driver takes finished documents in shards of `docs_per_shard`: Parquet under a
             temporary name, renamed into place, then the manifest (the commit point)

Why the rounds are unrolled. A document alternates text and images, and Ray Data runs a fixed
graph of operators with no loop, so the M image rounds a line may ask for (its max_images; M is
the largest over the input) become 2M + 1 operators, each an actor pool of the LLM or of the
decoder sized from `llm` / `decoder`. Every row visits every operator; a finished document
passes through the later ones without model work. The alternatives cost more here: one actor that
holds both halves and loops per batch (a third copy of the loop, and the two halves can no longer be
sized or placed apart); a driver loop that calls two pools of plain actors (no Ray Data: no
streaming backpressure, no progress, the driver holds every document); one Ray Data pass per
round (the models load again every round and each round waits for the slowest batch). What the
unrolled graph costs: each stage loads its half once per actor, and late rounds see thinner
batches as documents finish (see docs/operations.md, "Offline batch generation").
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import ValidationError

from dreamcore.config import ConfigError, to_dict
from dreamcore.engine import TextEngine
from dreamcore.generate import Document, GenerationParams, image_seed
from dreamcore.schema import GENERATED_DOCUMENT_SCHEMA, GENERATED_SCHEMA_VERSION, GENERATION_STATE_SCHEMA
from pipelines.ray_env import ray_init
from pipelines.serve.api import GenerateRequest, RequestError, check_generate, validation_error
from pipelines.serve.replicas import ImageReplica, TextReplica, model_card

from .config import GenerateConfig

DOCS = "documents"
MANIFEST = "manifest.json"
# Per-line generation settings a line may carry (the /v1/generate fields besides `input`, `stream`).
PARAM_FIELDS = ("max_new_tokens", "max_images", "temperature", "top_p", "seed", "num_inference_steps",
                "guidance_scale")
LINE_FIELDS = ("id", "prompt", "parts", *PARAM_FIELDS)
MAX_ID_CHARS = 256
# Reasons the engine gives (the rest are found when reading): deterministic, so a rerun keeps them.
ENGINE_REASONS = ("prompt_too_long", "bad_input")
# Settings that change what a document is: a rerun into the same folder must keep them.
PINNED = ("checkpoint", "checkpoint_config_sha256", "seed", "defaults")

class GenerateError(ValueError):
    """The job cannot start or continue; the message names the input and the fix."""


# ----------------------------------------------------------------------------------------------
# 1. Reading and checking the prompts


@dataclass
class Prompt:
    """One accepted line: the checked prompt parts (text, image file bytes) and its settings."""

    id: str
    line: int
    parts: list[str | bytes]
    params: GenerationParams


@dataclass
class Dropped:
    """One input line that yields no document, and why (the manifest lists every one)."""

    line: int
    id: str | None
    reason: str  # blank_line | invalid_json | bad_id | duplicate_id | invalid_request | prompt_too_long | bad_input
    message: str


def derive_id(line: int, raw: bytes) -> str:
    """The id of a line that has none: its line number and a hash of its bytes (stable across reruns)."""
    return f"line{line}-{hashlib.sha256(raw.strip()).hexdigest()[:12]}"


def derive_seed(base: int, doc_id: str) -> int:
    """The seed of a line that has none: `base` + a hash of the id, so a rerun draws the same document."""
    return (base + int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16)) % (2**31 - 1)


def parse_line(line: int, raw: bytes, cfg: GenerateConfig, card: dict[str, Any]) -> Prompt | Dropped:
    """One JSONL line -> a checked Prompt, or Dropped naming the field and the fix."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        return Dropped(line, None, "invalid_json", f"not a JSON object ({type(e).__name__}: {e})")
    if not isinstance(obj, dict):
        return Dropped(line, None, "invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id")
    if doc_id is None:
        doc_id = derive_id(line, raw)
    elif isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    elif not isinstance(doc_id, str) or not doc_id.strip() or len(doc_id) > MAX_ID_CHARS:
        return Dropped(line, None, "bad_id", f"id must be a non-empty string of at most {MAX_ID_CHARS} "
                                             f"characters (or an integer), got {doc_id!r:.80}")
    unknown = [k for k in obj if k not in LINE_FIELDS]
    if unknown:
        return Dropped(line, doc_id, "invalid_request",
                       f"{unknown[0]}: is not a known field (a line holds {', '.join(LINE_FIELDS)})")
    if ("prompt" in obj) == ("parts" in obj):
        return Dropped(line, doc_id, "invalid_request",
                       "give exactly one of prompt (a string) or parts (text and image parts, as /v1/generate's input)")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        return Dropped(line, doc_id, "invalid_request", "prompt: must be a string (images go in parts)")
    if "parts" in obj and not isinstance(obj["parts"], list):
        return Dropped(line, doc_id, "invalid_request", "parts: must be a list of {type: text|image, ...}")
    key = "prompt" if "prompt" in obj else "parts"
    body = {"input": obj[key], **{k: obj[k] for k in PARAM_FIELDS if k in obj}}
    try:
        req = GenerateRequest.model_validate(body)
        parts, params = check_generate(req, cfg.limits, cfg.defaults, card["num_inference_steps"],
                                       card["guidance_scale"], seed=derive_seed(cfg.seed, doc_id))
    except ValidationError as e:
        message = validation_error(list(e.errors()))["error"]["message"]
    except RequestError as e:
        message = str(e)
    else:
        return Prompt(doc_id, line, parts, params)
    # The server's messages name /v1/generate's `input`; a line calls it `prompt` or `parts`.
    if message.startswith("input"):
        message = key + message[len("input"):]
    return Dropped(line, doc_id, "invalid_request", message)


def _lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from f


def read_prompts(path: str | Path, cfg: GenerateConfig, card: dict[str, Any]) -> tuple[list[Prompt], list[Dropped]]:
    """Every line of the JSONL(.gz) as an accepted Prompt or a Dropped entry (first use of an id wins)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"input {path} does not exist or is not a file; give a JSONL file of "
                            '{"id": ..., "prompt": "..."} lines')
    prompts: list[Prompt] = []
    dropped: list[Dropped] = []
    first_line: dict[str, int] = {}
    for n, raw in enumerate(_lines(path), start=1):
        if not raw.strip():
            dropped.append(Dropped(n, None, "blank_line", "the line is empty"))
            continue
        item = parse_line(n, raw, cfg, card)
        if item.id is not None and item.id in first_line:
            dropped.append(Dropped(n, item.id, "duplicate_id", f"id {item.id!r} is already used on line "
                                                               f"{first_line[item.id]}"))
            continue
        if item.id is not None:
            first_line[item.id] = n
        (prompts if isinstance(item, Prompt) else dropped).append(item)
    return prompts, dropped


# ----------------------------------------------------------------------------------------------
# 3. The rounds: plain functions over rows (in-process in bench/generate.py), wrapped as actor UDFs


@dataclass
class DocRow:
    """A document in flight between rounds; `reason` set: the engine refused it (it stops here)."""

    id: str
    line: int
    doc: Document
    reason: str = ""
    error: str = ""


def to_rows(prompts: list[Prompt]) -> list[DocRow]:
    return [DocRow(p.id, p.line, Document(p.parts, p.params)) for p in prompts]


def text_round(engine: TextEngine, rows: list[DocRow]) -> None:
    """One text round for every running document of `rows`, in one engine batch (as LLMServer does)."""
    todo = [r for r in rows if not r.reason and not r.doc.finished]
    if not todo:
        return
    for r, res in zip(todo, engine.continue_batch([r.doc.text_request() for r in todo])):
        if res.error is not None:  # too long for the context, or an image the model cannot read
            r.reason, r.error = ("prompt_too_long" if res.too_long else "bad_input"), res.error
        else:
            r.doc.add_text(res)


def image_round(replica: ImageReplica, rows: list[DocRow]) -> None:
    """The image each document asked for, in one decoder batch; fed back as PNG, as the server does."""
    todo = [r for r in rows if not r.reason and r.doc.wants_image]
    if not todo:
        return
    for r, img in zip(todo, replica.decode_batch([r.doc.image_request() for r in todo])):
        r.doc.add_image(img.png)


def encode_rows(rows: list[DocRow]) -> pa.Table:
    cols = {"id": [r.id for r in rows], "line": [r.line for r in rows],
            "state": [pickle.dumps(r.doc, protocol=pickle.HIGHEST_PROTOCOL) for r in rows],
            "reason": [r.reason for r in rows], "error": [r.error for r in rows]}
    return pa.table(cols, schema=GENERATION_STATE_SCHEMA)


def decode_rows(batch: pa.Table) -> list[DocRow]:
    # The states are this job's own pickles, made by the previous round (never read from disk).
    return [DocRow(r["id"], r["line"], pickle.loads(r["state"]), r["reason"], r["error"])
            for r in batch.to_pylist()]


class TextRound:
    """Ray Data actor UDF: the LLM half of the checkpoint (TextReplica), one text round per batch."""

    def __init__(self, checkpoint: str, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.engine = TextReplica(checkpoint, device).engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = decode_rows(batch)
        text_round(self.engine, rows)
        return encode_rows(rows)


class ImageRound:
    """Ray Data actor UDF: the decoder half of the checkpoint (ImageReplica), one image per document."""

    def __init__(self, checkpoint: str, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.replica = ImageReplica(checkpoint, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = decode_rows(batch)
        image_round(self.replica, rows)
        return encode_rows(rows)


def free_cpus(cfg: GenerateConfig, rounds: int, wait_s: float = 30.0) -> float:
    """The cluster's free CPUs. Actors of a Ray Data run that just ended (an earlier call in this
    driver) give their CPUs back a moment later: while the pools would fit the whole cluster but
    not what is free now, wait for them (at most `wait_s`) instead of refusing the run."""
    total = float(ray.cluster_resources().get("CPU", 0))
    deadline = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0))
        try:
            cfg.stage_cpus(rounds, free)
            return free
        except ConfigError:
            try:
                cfg.stage_cpus(rounds, total)
            except ConfigError:
                return free  # it would not fit an idle cluster either: the caller reports it
            if time.monotonic() > deadline:
                return free
        time.sleep(0.5)


def build_pipeline(rows: list[DocRow], cfg: GenerateConfig, rounds: int, cluster_cpus: float) -> ray.data.Dataset:
    """from_items -> text 0 -> image 0 -> ... -> text `rounds` (nothing runs until it is consumed)."""
    llm_cpus, dec_cpus = cfg.stage_cpus(rounds, cluster_cpus)
    blocks = max(1, -(-len(rows) // cfg.llm.batch_size))
    ds = ray.data.from_arrow([encode_rows(rows[i::blocks]) for i in range(blocks)])
    args = {"checkpoint": cfg.checkpoint, "device": cfg.device}
    for r in range(rounds + 1):
        ds = ds.map_batches(
            TextRound, batch_size=cfg.llm.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={**args, "threads": cfg.llm.threads},
            compute=ray.data.ActorPoolStrategy(size=cfg.llm.actors), num_cpus=llm_cpus, num_gpus=cfg.llm.num_gpus,
        )
        if r < rounds:
            ds = ds.map_batches(
                ImageRound, batch_size=cfg.decoder.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={**args, "threads": cfg.decoder.threads},
                compute=ray.data.ActorPoolStrategy(size=cfg.decoder.actors), num_cpus=dec_cpus,
                num_gpus=cfg.decoder.num_gpus,
            )
    return ds


# ----------------------------------------------------------------------------------------------
# 4. Writing: documents as Parquet, published by rename


def _part(kind: str, value: str | bytes, seed: int | None = None) -> dict[str, Any]:
    if kind == "text":
        return {"type": "text", "text": value, "image": None, "seed": None}
    return {"type": "image", "text": None, "image": value, "seed": seed}


def document_record(row: DocRow) -> dict[str, Any]:
    """A finished document as one GENERATED_DOCUMENT_SCHEMA row (images as the PNG bytes the decoder made)."""
    doc = row.doc
    if not doc.finished:
        raise RuntimeError(f"document {row.id} left the last round unfinished: the rounds are fewer than its "
                           "max_images (a bug in the pipeline's round count)")
    prompt = [_part("text", p) if isinstance(p, str) else _part("image", p) for p in doc.prompt]
    parts, k = [], 0
    for p in doc.output:
        if isinstance(p, str):
            parts.append(_part("text", p))
        else:
            parts.append(_part("image", p, image_seed(doc.params.seed, k)))
            k += 1
    return {"id": row.id, "line": row.line, "prompt": prompt, "parts": parts, "finish_reason": doc.finish_reason,
            "prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
            "images": doc.images, "seed": doc.params.seed, "params": json.dumps(dataclasses.asdict(doc.params))}


def write_shard(out: Path, name: str, rows: list[DocRow]) -> Path:
    """Write under a temporary name, then rename: a file in DIR/documents/ is always complete."""
    final = out / DOCS / name
    tmp = out / DOCS / f".tmp-{name}"
    pq.write_table(pa.Table.from_pylist([document_record(r) for r in rows], schema=GENERATED_DOCUMENT_SCHEMA), tmp)
    os.replace(tmp, final)
    return final


def written_ids(out: Path) -> dict[str, dict[str, Any]]:
    """Published files -> {file: {"ids": [...]}}; removes what a killed write left (.tmp-*)."""
    docs = out / DOCS
    docs.mkdir(parents=True, exist_ok=True)
    for tmp in docs.glob(".tmp-*"):
        tmp.unlink()
    files: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for f in sorted(docs.glob("*.parquet")):
        ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        rel = f"{DOCS}/{f.name}"
        for i in ids:
            if i in seen:  # never written twice by this job: someone copied files in
                raise GenerateError(f"id {i!r} is in both {seen[i]} and {rel}; remove one of the files")
            seen[i] = rel
        files[rel] = {"ids": ids}
    return files


# ----------------------------------------------------------------------------------------------
# Manifest


def _save_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _pinned(cfg: GenerateConfig, ckpt: Path) -> dict[str, Any]:
    return {"checkpoint": str(ckpt), "checkpoint_config_sha256":
            hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest(),
            "seed": cfg.seed, "defaults": to_dict(cfg.defaults)}


def _check_resume(old: dict[str, Any], pinned: dict[str, Any]) -> None:
    for key in PINNED:
        if old.get("pinned", {}).get(key) != pinned[key]:
            raise GenerateError(
                f"output folder was generated with {key}={old.get('pinned', {}).get(key)!r}, this run asks for "
                f"{pinned[key]!r}; the documents would not match the published ones: use a new --output "
                "folder or the original settings")


class Ledger:
    """Where every input line stands (written / dropped / pending); saved as DIR/manifest.json."""

    def __init__(self, out: Path, input_path: Path, cfg: GenerateConfig, pinned: dict[str, Any],
                 prompts: list[Prompt], dropped: list[Dropped], files: dict[str, dict[str, Any]],
                 runs: list[dict[str, Any]]) -> None:
        self.out, self.input, self.cfg, self.pinned = out, input_path, cfg, pinned
        self.line_of = {p.id: p.line for p in prompts}
        self.dropped = list(dropped)  # lines refused when read
        self.refused: list[Dropped] = []  # accepted lines the engine refused (their ids are in line_of)
        self.files = files
        self.runs = runs
        self.lines = len(prompts) + len(dropped)

    def written(self) -> set[str]:
        return {i for f in self.files.values() for i in f["ids"] if i in self.line_of}

    def manifest(self, status: str) -> dict[str, Any]:
        written = len(self.written())
        dropped = self.dropped + self.refused
        pending = len(self.line_of) - written - len(self.refused)
        all_ids = {i for f in self.files.values() for i in f["ids"]}
        return {
            "schema_version": GENERATED_SCHEMA_VERSION,
            "status": status,
            "input": str(self.input),
            "pinned": self.pinned,
            "config": to_dict(self.cfg),
            "counts": {"lines": self.lines, "written": written, "dropped": len(dropped), "pending": pending,
                       "written_not_in_input": len(all_ids) - written},
            "dropped_by_reason": dict(sorted(Counter(d.reason for d in dropped).items())),
            "dropped": [dataclasses.asdict(d) for d in sorted(dropped, key=lambda d: d.line)],
            "files": [{"file": k, "documents": len(v["ids"])} for k, v in sorted(self.files.items())],
            "runs": self.runs,
        }

    def save(self, status: str) -> dict[str, Any]:
        m = self.manifest(status)
        c = m["counts"]
        if c["written"] + c["dropped"] + c["pending"] != c["lines"] or (status == "complete" and c["pending"]):
            raise AssertionError(f"manifest accounting broken: {c}")  # a bug, not bad input
        _save_json(self.out / MANIFEST, m)
        return m


# ----------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def _data_context(cfg: GenerateConfig) -> Iterator[None]:
    """Job-local Ray Data settings, restored afterwards (tests and the demo share the process)."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = cfg.progress and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved


def generate(input_path: str | Path, output: str | Path, config: GenerateConfig,
             address: str | None = None) -> dict[str, Any]:
    """Generate a document for every accepted line of `input_path` into `output`; returns the manifest.

    Rerunning with the same output skips ids already written; the manifest accounts for every line.
    """
    cfg = config
    if not cfg.checkpoint:
        raise GenerateError("no checkpoint: pass --checkpoint DIR (or set checkpoint in --config)")
    ckpt = Path(cfg.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        raise GenerateError(f"checkpoint {cfg.checkpoint} has no config.json; give a folder written by "
                            "save_pretrained or by `dreamcore train`")
    cfg = dataclasses.replace(cfg, checkpoint=str(ckpt))
    card = model_card(str(ckpt))
    out, input_path = Path(output), Path(input_path).resolve()
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. Read and check every line; skip what an earlier run published.
    prompts, dropped = read_prompts(input_path, cfg, card)
    pinned = _pinned(cfg, ckpt)
    old = load_manifest(out)
    if old is not None:
        _check_resume(old, pinned)
    files = written_ids(out)
    done = {i for f in files.values() for i in f["ids"]}
    # With the same checkpoint and settings (checked above) the engine would refuse these again.
    refused_before = {d["id"]: d for d in (old or {}).get("dropped", []) if d["reason"] in ENGINE_REASONS}
    carried = [Dropped(p.line, p.id, refused_before[p.id]["reason"], refused_before[p.id]["message"])
               for p in prompts if p.id in refused_before and p.id not in done]
    pending = [p for p in prompts if p.id not in done and p.id not in refused_before]
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "skipped_on_resume": len(prompts) - len(pending),
           "generated": 0, "dropped_by_engine": 0, "duration_s": 0.0}
    ledger = Ledger(out, input_path, cfg, pinned, prompts, dropped, files, [*(old or {}).get("runs", []), run])
    ledger.refused += carried
    ledger.save("running")
    if not pending:
        return ledger.save("complete")

    # 3-4. The rounds on Ray Data; shards published as finished documents arrive.
    t0 = time.perf_counter()
    ray_init(address)
    rounds = max(p.params.max_images for p in pending)
    try:
        ds = build_pipeline(to_rows(pending), cfg, rounds, free_cpus(cfg, rounds))
    except ConfigError as e:
        raise GenerateError(str(e)) from None
    token = uuid.uuid4().hex[:8]
    with _data_context(cfg):
        for batch in ds.iter_batches(batch_size=cfg.docs_per_shard, batch_format="pyarrow"):
            rows = decode_rows(batch)
            finished = [r for r in rows if not r.reason]
            refused = [Dropped(r.line, r.id, r.reason, r.error) for r in rows if r.reason]
            if finished:
                name = f"part-{token}-{len(ledger.files):05d}.parquet"
                write_shard(out, name, finished)
                ledger.files[f"{DOCS}/{name}"] = {"ids": [r.id for r in finished]}
            ledger.refused += refused
            run["generated"] += len(finished)
            run["dropped_by_engine"] += len(refused)
            run["duration_s"] = round(time.perf_counter() - t0, 3)
            ledger.save("running")
    return ledger.save("complete")


__all__ = ["GenerateError", "build_pipeline", "generate", "read_prompts"]
