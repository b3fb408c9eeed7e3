"""The curation job on Ray Data: `curate(inputs, output, config) -> manifest dict`.

1. read      Ray Data reads each shard (any pyarrow/fsspec filesystem); bad lines become drop rows
2. crawl     thread pool per block: fetch, guard, verify, resize (crawl.py)
3. filter    image size/aspect, opt-out domains, text quality (filters.py)
4. dedup     exact/near duplicates and repeated images, hash-partitioned in Ray Data (dedup.py)
5. similarity MMC4 assignment (CLIP actors on GPU when the cluster has GPUs, else CPU)
6. documents min/max images and sentences
7. tokenize  DreamLLM layout, then fixed-length rows (pack or truncate)
8. write     Parquet under a temp folder, moved into DIR/samples/, then the manifest

Input shards are processed in groups (`shards_per_commit`); a group is published (samples,
rejected rows, hashes, manifest) only when complete, so a rerun skips finished shards and a killed
run leaves nothing a reader would take as complete. DIR may be a local folder or an object-store
URI (s3://bucket/prefix, through dreamcore.storage): there files are moved by copy + delete, and
the manifest (one PUT, atomic) is still the commit point, since readers list shards from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dreamcore import storage
from dreamcore.config import to_dict
from dreamcore.schema import (
    CURATE_DOC_SCHEMA,
    CURATE_ENCODED_SCHEMA,
    REJECTED_SCHEMA,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
)
from dreamcore.tokenizer import DreamTokenizer
from pipelines.ray_env import ray_init

from . import dedup
from . import manifest as mf
from .config import CurateConfig
from .crawl import Crawler
from .filters import DedupRules, DocumentStage, FilterStage, apply_plan, kept_images
from .readers import expand_inputs, local_shard_is_empty, parse_shard, rows_to_table
from .similarity import SimilarityStage
from .tokenize import encode_doc, pack_docs, tokenizer_for, train_tokenizer

# Internal state; "_" so readers that glob DIR for samples (and pyarrow datasets) skip it.
STATE = "_state"
HASHES_SCHEMA = pa.schema([("sha256", pa.string()), ("phash", pa.string())])
HASHES_ROWS_PER_FILE = 1_000_000  # ~80 MB files in DIR/_state: few files per group, not one per block


class CurateError(ValueError):
    """The job cannot start or continue; the message names the input and the fix."""


# ----------------------------------------------------------------------------------------------
# UDFs (run in Ray workers; each converts an Arrow batch to rows and back)


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


def read_udf(batch: pa.Table, image_root: str = "", roots: dict[str, str] | None = None) -> pa.Table:
    """`roots`: each shard's folder as the user named it (Ray reports object-store paths without
    their scheme), where instruction data's images are found unless `image_root` is set."""
    rows: list[dict] = []
    for item in batch.to_pylist():
        root = image_root or (roots or {}).get(item["path"], "")
        rows += parse_shard(item["bytes"], item["path"], root)
    return rows_to_table(rows)


@lru_cache(maxsize=2)
def _crawler(cfg_json: str, image_size: int) -> Crawler:
    from .config import CrawlConfig

    return Crawler(CrawlConfig(**json.loads(cfg_json)), image_size)


def crawl_filter_udf(batch: pa.Table, crawl_json: str, image_size: int, filter_cfg: Any,
                     safety_cfg: Any = None) -> pa.Table:
    docs = _crawler(crawl_json, image_size).crawl_docs(_rows(batch))
    docs = FilterStage(filter_cfg, safety_cfg)(docs)
    return rows_to_table(docs)


def hash_keys_udf(batch: pa.Table) -> pa.Table:
    """One row per image still kept: its place (shard, doc_id, index) and hashes; no bytes."""
    out: dict[str, list] = {name: [] for name in dedup.KEYS_SCHEMA.names}
    for doc in _rows(batch.select(["shard", "doc_id", "drop_stage", "images"])):
        if doc["drop_stage"]:
            continue
        for i, img in enumerate(doc["images"]):
            if not img["drop_stage"]:
                for k, v in zip(out, (doc["shard"], doc["doc_id"], i, img["sha256"], img["phash"])):
                    out[k].append(v)
    return pa.table(out, schema=dedup.KEYS_SCHEMA)


def dedup_udf(batch: pa.Table, plan_dir: str, env: dict[str, str] | None = None) -> pa.Table:
    """Applies the drops dedup.plan wrote for the shards of this batch (one file per shard); `env`:
    the driver's object-store settings when the plan is in one."""
    docs = _rows(batch)
    with storage.using(env):
        for shard in {d["shard"] for d in docs}:
            apply_plan([d for d in docs if d["shard"] == shard], dedup.read_drops(plan_dir, shard), "dedup")
    return rows_to_table(docs)


class SimilarityUDF:
    """Holds the CLIP model for the life of the actor (one load per actor, not per batch)."""

    def __init__(self, sim_cfg: Any, filter_cfg: Any):
        self.similarity = SimilarityStage(sim_cfg)
        self.documents = DocumentStage(filter_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rows_to_table(self.documents(self.similarity(_rows(batch))))


def similarity_udf(batch: pa.Table, sim_cfg: Any, filter_cfg: Any) -> pa.Table:
    """Without a CLIP model the assignment is cheap: plain tasks, no actors."""
    return SimilarityUDF(sim_cfg, filter_cfg)(batch)


def _tokenizer(tok_path: str, mcfg: Any, env: dict[str, str] | None) -> DreamTokenizer:
    """The job's tokenizer in a worker; one in an object store is downloaded once per node
    (storage.cached_copy), with `env` (the driver's settings) to reach the store."""
    if storage.is_uri(tok_path):
        with storage.using(env):
            tok_path = str(storage.cached_copy(tok_path))
    return tokenizer_for(tok_path, mcfg)


def encode_udf(batch: pa.Table, tok_path: str, mcfg: Any, env: dict[str, str] | None = None) -> pa.Table:
    tok = _tokenizer(tok_path, mcfg, env)
    docs = [encode_doc(tok, d, mcfg) for d in _rows(batch)]
    return pa.Table.from_pylist(docs, schema=CURATE_ENCODED_SCHEMA)


def pack_udf(batch: pa.Table, tok_path: str, mcfg: Any, packing: bool, pair_layout: str,
             env: dict[str, str] | None = None) -> pa.Table:
    tok = _tokenizer(tok_path, mcfg, env)
    samples = pack_docs(tok, _rows(batch), mcfg, packing, pair_layout)
    return pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA)


def accounting_udf(batch: pa.Table) -> pa.Table:
    """One row per document (image_index -1) and per image; `stage` "" means kept."""
    cols = {name: [] for name in REJECTED_SCHEMA.names}
    for doc in _rows(batch.select(["doc_id", "shard", "url", "drop_stage", "reason", "error", "images"])):
        entries = [(-1, doc["url"], doc["drop_stage"], doc["reason"], doc["error"])]
        entries += [(i, im["url"], im["drop_stage"], im["reason"], im["error"])
                    for i, im in enumerate(doc["images"])]
        for idx, url, stage, reason, error in entries:
            for k, v in zip(cols, (doc["doc_id"], doc["shard"], idx, url, stage, reason, error)):
                cols[k].append(v)
    return pa.table(cols, schema=REJECTED_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def _data_context(cfg: CurateConfig):
    """Job-local Ray Data settings, restored afterwards (the demo trains in the same process)."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
    ctx.enable_progress_bars = cfg.progress and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    ctx.execution_options.preserve_order = True  # deterministic dedup "first occurrence" and files
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def _clean_orphans(out: str | Path, manifest: dict) -> None:
    """Remove what a killed run left: temp folders, samples/rejected files the manifest lacks
    (local folders and object-store prefixes alike)."""
    for name in storage.list_dirs(out):
        if name.startswith(".tmp-"):
            storage.delete_dir(storage.join(out, name))
    listed = set(manifest["outputs"]["files"]) | set(manifest["rejected"]["files"])
    groups = {g["id"] for g in manifest["groups"]}
    for sub in ("samples", "rejected", STATE):
        for fname in storage.list_files(storage.join(out, sub), recursive=False):
            if not fname.endswith(".parquet"):
                continue
            rel = f"{sub}/{fname}"
            # _state/hashes-<group>[-<i>].parquet of a group the manifest lacks; other files are not ours
            name = fname.removesuffix(".parquet").split("-")
            if (sub != STATE and rel not in listed) or \
                    (sub == STATE and name[0] == "hashes" and name[1:2] != [] and name[1] not in groups):
                storage.delete_file(storage.join(out, rel))


def _check_resume(manifest: dict, cfg: CurateConfig) -> None:
    """Samples of a resumed run must match the published ones: same layout, packing, schema."""
    old, now = manifest["config"], to_dict(cfg)
    pinned = {"model": (old["model"], now["model"]),
              "model_overrides": (old["model_overrides"], now["model_overrides"]),
              "tokenize.packing": (old["tokenize"]["packing"], now["tokenize"]["packing"]),
              # Output folders curated before tokenize.pair_layout existed hold interleaved rows.
              "tokenize.pair_layout": (old["tokenize"].get("pair_layout", "interleaved"),
                                       now["tokenize"]["pair_layout"]),
              # Folders curated before similarity.placement existed placed images by the matrix.
              "similarity.placement": (old["similarity"].get("placement", "matrix"),
                                       now["similarity"]["placement"])}
    for key, (was, is_now) in pinned.items():
        if was != is_now:
            raise CurateError(
                f"output folder was curated with {key}={was!r}, this run asks for {is_now!r}; the new "
                "samples would not match the published ones: use a new --output folder or the original config"
            )
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CurateError(f"output folder holds schema version {manifest['schema_version']}, this code "
                          f"writes {SCHEMA_VERSION}: use a new --output folder")


def _prepare_tokenizer(out: str | Path, cfg: CurateConfig, kept_texts: Any,
                       published: bool = False) -> DreamTokenizer:
    """DIR/tokenizer/: the configured tokenizer, or a BPE trained on kept text (first group only).

    Locally the folder appears by one rename. In an object store the upload is not atomic, so an
    existing tokenizer/ is trusted only once a published group used it (`published`: the manifest
    has its hash); otherwise it is a killed run's upload and is made and uploaded again.
    """
    if storage.is_uri(out):
        return _prepare_tokenizer_uri(storage.join(out, "tokenizer"), cfg, kept_texts, published)
    mcfg = cfg.model_config()
    tok_dir = Path(out) / "tokenizer"
    if tok_dir.exists():
        return tokenizer_for(str(tok_dir), mcfg)
    tmp = Path(out) / f".tmp-tokenizer-{uuid.uuid4().hex[:8]}"
    tok = _make_tokenizer(tmp, cfg, kept_texts)
    os.replace(tmp, tok_dir)
    return tok


def _prepare_tokenizer_uri(tok_uri: str, cfg: CurateConfig, kept_texts: Any, published: bool) -> DreamTokenizer:
    """tokenizer/ in an object store: made in a local temp folder, then uploaded whole."""
    mcfg = cfg.model_config()
    if published and storage.is_dir(tok_uri):
        return tokenizer_for(str(storage.cached_copy(tok_uri)), mcfg)
    tmp = Path(tempfile.mkdtemp(prefix="dreamcore-tokenizer-"))
    try:
        tok = _make_tokenizer(tmp / "tokenizer", cfg, kept_texts)
        storage.upload_dir(tmp / "tokenizer", tok_uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _make_tokenizer(tmp: Path, cfg: CurateConfig, kept_texts: Any) -> DreamTokenizer:
    """The configured tokenizer, or a BPE trained on kept text, saved into the folder `tmp`."""
    mcfg = cfg.model_config()
    if mcfg.tokenizer.name_or_path:
        tok = DreamTokenizer.build(mcfg.tokenizer, mcfg.vision.num_tokens, mcfg.dream.num_queries)
        tok.save_pretrained(tmp)
    else:
        texts = kept_texts()
        if not texts:
            raise CurateError("no document survived filtering, so there is no text to train the tokenizer on; "
                              "see DIR/rejected/ and the manifest's dropped counts, or set "
                              "model_overrides.tokenizer.name_or_path")
        tok = train_tokenizer(texts, mcfg, str(tmp))
    return tok


def _check_models(cfg: CurateConfig) -> None:
    """Fail before any Ray work when a configured model or word list cannot be loaded."""
    problems = [p for p in [cfg.similarity.problem()] if p] + cfg.safety.problems()
    if problems:
        raise CurateError("; ".join(problems))
    for kind, path in (("fasttext", cfg.safety.language_model), ("cascade", cfg.safety.face_detector),
                       ("nsfw", cfg.safety.nsfw_model)):
        if path:
            from . import safety

            try:
                safety.load_model(kind, path)
            except ValueError as e:
                raise CurateError(str(e)) from None
    model = cfg.similarity.model
    if model and cfg.similarity.enabled and cfg.similarity.placement != "source":
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise CurateError(
                f"similarity.model={model!r} cannot be loaded ({str(e).splitlines()[0]}); give a CLIP folder "
                "(config.json, weights, tokenizer, preprocessor_config.json) or a cached hub id, or unset it "
                "to use the documents' own similarity_matrix"
            ) from None


def check_output(output: str | Path) -> Path | str:
    """`output` as a local folder path or an object-store URI, or a CurateError naming --output and the fix.

    Checked before any Ray work: a local folder must be creatable and writable; for a URI the store
    must be reachable and the bucket must exist (storage.check_access), and the URI must not carry
    credentials (they would end up in the manifest and logs).
    """
    text = str(output).removeprefix("file://")
    if storage.is_uri(text):
        return _check_output_uri(text)
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise CurateError(f"--output {text} is an existing file, not a folder; give a new or existing folder path")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CurateError(f"--output {text}: {existing} is a file, so the folder cannot be created under it; "
                          "give a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CurateError(f"--output {text}: {existing} is not writable by this user; give a folder you can write")
    return out


def _check_output_uri(uri: str) -> str:
    """An object-store --output, checked in one request; the message never echoes credentials."""
    try:
        storage.check_access(uri, "--output")
        inner = storage.filesystem(uri)[1]
    except storage.StorageError as e:
        text = str(e)
        raise CurateError(text if text.startswith("--output ") else f"--output {text}") from None
    if "/" not in inner:
        raise CurateError(f"--output {uri}: give a folder inside the bucket, e.g. {uri.rstrip('/')}/data/NAME")
    return storage.resolve(uri)


def curate(inputs: list[str], output: str | Path, config: CurateConfig | None = None,
           address: str | None = None) -> dict:
    """Curate `inputs` (shards, folders, globs, URIs) into `output`; returns the manifest."""
    out = check_output(output)
    cfg = config or CurateConfig()
    mcfg = cfg.model_config()
    _check_models(cfg)
    shards = expand_inputs(list(inputs))
    storage.makedirs(out)
    try:
        manifest = mf.load(out)
    except ValueError as e:  # a manifest.json that is not JSON: one line naming it and the fix
        raise CurateError(f"--output {out}: {e}") from None
    if manifest is None:
        manifest = mf.new_manifest(to_dict(cfg), to_dict(mcfg))
    else:
        _check_resume(manifest, cfg)
    _clean_orphans(out, manifest)
    done = set(manifest["shards"]["done"])
    pending = [s for s in shards if s not in done]
    manifest["shards"]["skipped_on_resume"] = sorted(set(shards) & done)
    empty = [s for s in pending if local_shard_is_empty(s)]
    if empty:  # an empty input is a valid run: published with zero counts, without starting Ray
        gid, tmp = _new_group(out, manifest)
        _publish_nothing(empty, gid, tmp, out, manifest, {})
        pending = [s for s in pending if s not in empty]
    if not pending:
        mf.save(out, manifest)
        return manifest
    ray_init(address)
    with _data_context(cfg):
        for start in range(0, len(pending), cfg.shards_per_commit):
            _run_group(pending[start:start + cfg.shards_per_commit], out, cfg, manifest)
    return manifest


def _timed(durations: dict, key: str, t0: float) -> float:
    now = time.perf_counter()
    durations[key] = round(durations.get(key, 0.0) + now - t0, 3)
    return now


def _write_table(table: pa.Table, path: str | Path) -> None:
    fs, inner = storage.arrow_path(path)
    pq.write_table(table, inner, filesystem=fs)


def _new_group(out: str | Path, manifest: dict) -> tuple[str, str]:
    """The next group's id and its temp folder (removed by _publish, or by the next run's cleanup)."""
    gid = f"g{len(manifest['groups']):04d}"
    tmp = storage.join(out, f".tmp-{gid}-{uuid.uuid4().hex[:8]}")
    if not storage.is_uri(out):  # object stores have no folders: the prefix exists once a file is written
        Path(tmp).mkdir(parents=True)
    return gid, tmp


def _run_group(group: list[str], out: str | Path, cfg: CurateConfig, manifest: dict) -> None:
    """One shard group, start to publish; `manifest` is updated and saved only at the end."""
    gid, tmp = _new_group(out, manifest)
    durations: dict[str, float] = {}
    t = time.perf_counter()
    docs = _read_crawl_filter(group, cfg)
    t = _timed(durations, "read+crawl+filter", t)
    if docs.count() == 0:  # shards too large for the driver's check, yet empty: nothing to dedup
        _publish_nothing(group, gid, tmp, out, manifest, durations)
        return
    docs = _dedup_similarity_documents(docs, out, cfg, storage.join(tmp, "dedup"))
    t = _timed(durations, "dedup+similarity+documents", t)
    encoded = _tokenize_and_write(docs, out, cfg, manifest, storage.join(tmp, "samples"))
    t = _timed(durations, "tokenize", t)
    acct_refs = encoded.map_batches(accounting_udf, batch_format="pyarrow").to_arrow_refs()
    acct = pa.concat_tables(ray.get(acct_refs)) if acct_refs else REJECTED_SCHEMA.empty_table()
    _write_table(acct.filter(pa.compute.not_equal(acct["stage"], "")), storage.join(tmp, "rejected.parquet"))
    _write_hashes(encoded, storage.join(tmp, "hashes"))
    _timed(durations, "write", t)
    _publish(group, gid, tmp, out, acct, manifest, durations)


def _read_crawl_filter(group: list[str], cfg: CurateConfig) -> ray.data.Dataset:
    """Steps 1-3, streamed, then materialized: dedup needs two passes over the crawled rows."""
    ds = ray.data.read_binary_files(group, include_paths=True, override_num_blocks=len(group))
    roots = {shard.split("://", 1)[-1]: shard.rsplit("/", 1)[0] for shard in group}
    ds = ds.map_batches(read_udf, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"image_root": cfg.image_root, "roots": roots}).materialize()
    # One shard is one block: split it so crawl tasks run side by side (a block's batches run in
    # sequence, so one slow host would otherwise stall the whole shard).
    ds = ds.repartition(max(1, -(-ds.count() // cfg.crawl.batch_size)))
    return ds.map_batches(
        crawl_filter_udf, batch_size=cfg.crawl.batch_size, batch_format="pyarrow",
        fn_kwargs={"crawl_json": json.dumps(to_dict(cfg.crawl)), "image_size": cfg.image_size(),
                   "filter_cfg": cfg.filter, "safety_cfg": cfg.safety},
        num_cpus=cfg.crawl.num_cpus,
    ).materialize()


def _dedup_similarity_documents(docs: ray.data.Dataset, out: str | Path, cfg: CurateConfig,
                                plan_dir: str) -> ray.data.Dataset:
    """Steps 4-6. Dedup is planned from hashes only, partitioned across the cluster (dedup.py):
    its drops are written by shard under `plan_dir` (in the group's temp folder or prefix, which
    every node reaches) and applied where the documents are."""
    rules = DedupRules(cfg.filter.dedup_exact, cfg.filter.near_duplicate_distance,
                       cfg.filter.max_documents_per_image)
    keys = docs.map_batches(hash_keys_udf, batch_format="pyarrow")
    env = storage.environment() if storage.is_uri(plan_dir) else None
    if dedup.plan(keys, _seen_hashes(out), rules, plan_dir, env):
        docs = docs.map_batches(dedup_udf, batch_format="pyarrow", fn_kwargs={"plan_dir": plan_dir, "env": env})

    sim = cfg.similarity
    if sim.model and sim.placement != "source":  # CLIP on actors: one model load per actor, a GPU each when the cluster has any
        gpus = sim.num_gpus if sim.num_gpus >= 0 else (1.0 if _cluster_gpus() > 0 else 0.0)
        docs = docs.map_batches(
            SimilarityUDF, batch_size=sim.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"sim_cfg": sim, "filter_cfg": cfg.filter},
            compute=ray.data.ActorPoolStrategy(size=sim.actors), num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
    else:
        docs = docs.map_batches(similarity_udf, batch_format="pyarrow",
                                fn_kwargs={"sim_cfg": sim, "filter_cfg": cfg.filter})
    return docs.materialize()


def _tokenize_and_write(docs: ray.data.Dataset, out: str | Path, cfg: CurateConfig, manifest: dict,
                        samples_dir: str) -> ray.data.Dataset:
    """Step 7-8: tokenizer (trained on kept text when none is configured), encode, pack, write
    Parquet under `samples_dir` (a temp folder). Returns the encoded rows (accounting source)."""
    mcfg = cfg.model_config()
    kept = docs.filter(lambda r: not r["drop_stage"])
    if kept.count() == 0:
        return docs  # nothing to tokenize: the accounting (everything dropped) is still published

    def kept_texts() -> list[str]:
        sample = kept.limit(cfg.tokenize.tokenizer_sample_docs).select_columns(["texts"])
        return [" ".join(r["texts"]) for r in sample.take_all()]

    try:
        tok = _prepare_tokenizer(out, cfg, kept_texts, published=manifest["tokenizer_hash"] is not None)
    except ValueError as e:  # the tokenizer module's messages name the path and the fix
        raise CurateError(str(e)) from None
    manifest["tokenizer_hash"] = tok.content_hash()
    tok_kw: dict[str, Any] = {"tok_path": storage.join(out, "tokenizer"), "mcfg": mcfg}
    if storage.is_uri(out):  # workers download it; the settings travel pickled, never in a runtime_env
        tok_kw["env"] = storage.environment()
    encoded = docs.map_batches(encode_udf, batch_size=cfg.tokenize.batch_size, batch_format="pyarrow",
                               fn_kwargs=tok_kw).materialize()
    fs, path = storage.arrow_path(samples_dir)
    (
        encoded.filter(lambda r: not r["drop_stage"])
        .map_batches(pack_udf, batch_size=cfg.tokenize.batch_size, batch_format="pyarrow",
                     fn_kwargs=tok_kw | {"packing": cfg.tokenize.packing == "pack",
                                         "pair_layout": cfg.tokenize.pair_layout})
        .write_parquet(path, filesystem=fs, max_rows_per_file=cfg.tokenize.samples_per_file, schema=SAMPLE_SCHEMA)
    )
    return encoded


def _parquet_in(folder: str) -> list[str]:
    """The .parquet files directly in `folder` (local or URI), sorted by name; [] if it is absent."""
    return [storage.join(folder, f) for f in storage.list_files(folder, recursive=False) if f.endswith(".parquet")]


def _publish(group: list[str], gid: str, tmp: str, out: str | Path, acct: pa.Table, manifest: dict,
             durations: dict[str, float]) -> None:
    """Move the group's files into place, then save the manifest: the group's commit point (in an
    object store the moves are copies + deletes; readers list shards from the manifest only)."""
    written = _parquet_in(storage.join(tmp, "samples"))
    n_samples, n_docs, n_images = _count_written(written)
    rows = acct.select(["image_index", "stage", "reason"]).to_pylist()
    stages = mf.stage_counts([(r["stage"], r["reason"]) for r in rows if r["image_index"] == -1],
                             [(r["stage"], r["reason"]) for r in rows if r["image_index"] >= 0],
                             written=(n_docs, n_images))
    for sub in ("samples", "rejected", STATE):
        storage.makedirs(storage.join(out, sub))
    files = []
    for i, f in enumerate(written):
        files.append(f"samples/part-{gid}-{i:05d}.parquet")
        storage.move(f, storage.join(out, files[-1]))
    rej_rel = f"rejected/rejected-{gid}.parquet"
    storage.move(storage.join(tmp, "rejected.parquet"), storage.join(out, rej_rel))
    for i, f in enumerate(_parquet_in(storage.join(tmp, "hashes"))):
        storage.move(f, storage.join(out, STATE, f"hashes-{gid}-{i:05d}.parquet"))
    storage.delete_dir(tmp)

    manifest["stages"] = mf.merge_stages(manifest["stages"], stages)
    manifest["outputs"]["samples"] += n_samples
    manifest["outputs"]["files"] += files
    manifest["rejected"]["files"].append(rej_rel)
    manifest["shards"]["done"] = sorted(set(manifest["shards"]["done"]) | set(group))
    for k, v in durations.items():
        manifest["durations"][k] = round(manifest["durations"].get(k, 0.0) + v, 3)
    manifest["groups"].append({"id": gid, "shards": group, "samples": n_samples, "durations": durations})
    problems = mf.check_invariant(manifest)
    if problems:  # a bug, not bad input: fail loudly rather than publish wrong counts
        raise AssertionError("manifest invariant broken: " + "; ".join(problems))
    mf.save(out, manifest)


def _publish_nothing(group: list[str], gid: str, tmp: str, out: str | Path, manifest: dict,
                     durations: dict[str, float]) -> None:
    """Publish a group whose shards hold no documents: zero counts, an empty rejected file."""
    _write_table(REJECTED_SCHEMA.empty_table(), storage.join(tmp, "rejected.parquet"))
    _publish(group, gid, tmp, out, REJECTED_SCHEMA.empty_table(), manifest, durations)


def _count_written(files: list[str]) -> tuple[int, int, int]:
    """Samples, documents and images in the published shards, each document and image once.

    A document is in one row, except a one-image document laid out as pairs (tokenize.pair_layout):
    its creation row and comprehension row hold the same single image, counted once.
    """
    samples = images = 0
    rows_of: dict[str, int] = {}
    for f in files:
        fs, path = storage.arrow_path(f)
        t = pq.read_table(path, columns=["doc_ids", "image_slots"], filesystem=fs)
        samples += t.num_rows
        for ids in t.column("doc_ids").to_pylist():
            for d in ids:
                rows_of[d] = rows_of.get(d, 0) + 1
        images += sum(len(x) for x in t.column("image_slots").to_pylist())
    repeats = sum(n - 1 for n in rows_of.values())
    return samples, len(rows_of), images - repeats


def _write_hashes(encoded: Any, folder: str) -> None:
    """Hashes of images that made it into samples, written by the workers (never gathered here):
    later shard groups and runs dedup against them."""
    def keep(batch: pa.Table) -> pa.Table:
        out = {"sha256": [], "phash": []}
        for doc in batch.select(["drop_stage", "images"]).to_pylist():
            for img in kept_images(doc) if not doc["drop_stage"] else []:
                out["sha256"].append(img["sha256"])
                out["phash"].append(img["phash"])
        return pa.table(out, schema=HASHES_SCHEMA)

    fs, path = storage.arrow_path(folder)
    encoded.map_batches(keep, batch_format="pyarrow").write_parquet(
        path, filesystem=fs, schema=HASHES_SCHEMA, min_rows_per_file=HASHES_ROWS_PER_FILE)


def _seen_hashes(out: str | Path) -> ray.data.Dataset | None:
    """Hashes published by earlier groups and runs, as a dataset the dedup partitions read."""
    state = storage.join(out, STATE)
    files = [f for f in _parquet_in(state) if f.rsplit("/", 1)[-1].startswith("hashes-")]
    if not files:
        return None
    fs = storage.arrow_path(state)[0]
    return ray.data.read_parquet([storage.arrow_path(f)[1] for f in files], filesystem=fs, schema=HASHES_SCHEMA)


__all__ = ["curate", "check_output", "CurateError", "CURATE_DOC_SCHEMA"]
