"""Image dedup on Ray Data, hash-partitioned, so that no process ever holds every hash.

The rules are `filters.DedupRules` (exact sha256, repeated across documents, perceptual near
duplicates); `DedupRules.plan` applies the same rules in one process and is the reference that
tests/test_curate_dedup.py compares this module against.

Order. "First occurrence" means the smallest (doc_id, index, shard), the order the driver-side plan
sorted its records by; images published by earlier shard groups or runs (DIR/_state/hashes-*)
come before all of them. Every row carries its own order key, so no decision depends on which
partition or block a row arrives in (no preserve_order needed).

1. sha256 partitions. This group's images (shard, doc_id, index, sha256, phash) and, when exact
   dedup is on, the published hashes, read as a Ray dataset, get part = crc32(sha256) mod P and
   are grouped by part: every occurrence of a sha256 meets in one `map_groups` call, which marks
   repeated_image (in more than max_documents documents of this group) and then duplicate_image
   for all but the first occurrence (for all of them when the sha256 is already published).
2. band partitions (near duplicates). A Hamming-distance threshold cannot be hash-partitioned, but
   bands can: the 64-bit phash is split into d+1 bands (`filters.phash_bands`); two hashes within
   d bits differ in at most d bands, so they agree exactly on at least one (pigeonhole). Each exact
   survivor and each published phash becomes d+1 rows keyed by (band, band value); the rows of a
   key meet in one call, sorted by order, and each image of this group takes the earliest earlier
   row within d bits. Found in several bands, an image keeps the earliest neighbour of all.
   The rule: an image is a near duplicate when an earlier survivor or published image lies within
   d bits, whether that one was itself dropped or not. The old sequential pass (drop only when
   close to an earlier *kept* image) keeps C in a chain A~B~C where C is far from A; it needs
   rounds over such chains, this rule needs one pass and drops C as well.
3. shard files. Drops are grouped by input shard and written to PLAN_DIR/<key of shard>.parquet.
   `read_drops` hands `dedup_udf` the drops of its batch's shards: image bytes never move, and a
   task holds at most the decisions of the shards in its batch.

Memory: a partition call holds about ENTRIES_PER_PARTITION rows; docs/operations.md has the
arithmetic per node for MMC4's 571M images.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import zlib
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from dreamcore import storage

from .filters import DedupRules, phash_bands

ENTRIES_PER_PARTITION = 1_000_000  # rows per shuffle partition (one reduce task); see docs/operations.md
KEYS_PER_PARTITION = 16  # part keys per shuffle partition: evens out Ray's hash placement of keys,
# and each map_groups call (one key) holds about 1/16 of a partition as Python objects
PUBLISHED = ("an earlier shard group", -1)  # how a drop names a published image (as before)

KEYS_SCHEMA = pa.schema([("shard", pa.string()), ("doc_id", pa.string()), ("index", pa.int32()),
                         ("sha256", pa.string()), ("phash", pa.string())])
_RESOLVED_SCHEMA = pa.schema([("shard", pa.string()), ("doc_id", pa.string()), ("index", pa.int32()),
                              ("phash", pa.string()), ("reason", pa.string()), ("error", pa.string())])
_BAND_SCHEMA = pa.schema([("part", pa.int32()), ("band", pa.int8()), ("value", pa.uint64()), ("h", pa.uint64()),
                          ("seen", pa.bool_()), ("shard", pa.string()), ("doc_id", pa.string()),
                          ("index", pa.int32())])
# One row per drop; near_* name the neighbour of a near duplicate (one row per band that found it).
DROPS_SCHEMA = pa.schema([("shard", pa.string()), ("doc_id", pa.string()), ("index", pa.int32()),
                          ("reason", pa.string()), ("error", pa.string()), ("near_seen", pa.bool_()),
                          ("near_doc", pa.string()), ("near_index", pa.int32()), ("near_shard", pa.string())])
PLAN_SCHEMA = pa.schema([("doc_id", pa.string()), ("index", pa.int32()), ("reason", pa.string()),
                         ("error", pa.string())])


def plan(keys: ray.data.Dataset, seen: ray.data.Dataset | None, rules: DedupRules, plan_dir: str | Path,
         env: dict[str, str] | None = None) -> int:
    """Decide this group's dedup drops and write them by shard under `plan_dir` (shared storage: a
    shared folder or an object-store prefix; `env`, the driver's settings for the latter).

    keys: KEYS_SCHEMA rows, one per image still kept. seen: (sha256, phash) rows of published
    images, or None. Returns the number of drops; the driver sees only counts.
    """
    keys = keys.materialize()  # small (no image bytes); read by both stages
    n = keys.count()
    if n == 0 or not (rules.exact or rules.max_documents or rules.near_distance >= 0):
        return 0
    n_seen = seen.count() if seen is not None else 0
    parts = _partitions(n + (n_seen if rules.exact else 0))
    drops: list[ray.data.Dataset] = []
    survivors = keys
    # 1. sha256 partitions: repeated and exact duplicates.
    if rules.exact or rules.max_documents:
        kw = {"part_keys": parts * KEYS_PER_PARTITION}
        rows = keys.map_batches(_sha_rows, batch_format="pyarrow", fn_kwargs=kw | {"seen": False})
        if rules.exact and seen is not None:
            rows = rows.union(seen.map_batches(_sha_rows, batch_format="pyarrow", fn_kwargs=kw | {"seen": True}))
        resolved = rows.groupby("part", num_partitions=parts).map_groups(
            _resolve_sha, batch_format="pyarrow", fn_kwargs={"rules": rules}).materialize()
        drops.append(resolved.map_batches(_drops_of, batch_format="pyarrow"))
        survivors = resolved.map_batches(_survivors_of, batch_format="pyarrow")
    # 2. band partitions: near duplicates.
    if rules.near_distance >= 0:
        d = rules.near_distance
        band_parts = _partitions((d + 1) * (n + n_seen))
        kw = {"distance": d, "part_keys": band_parts * KEYS_PER_PARTITION}
        rows = survivors.map_batches(_band_rows, batch_format="pyarrow", fn_kwargs=kw | {"seen": False})
        if seen is not None:
            rows = rows.union(seen.map_batches(_band_rows, batch_format="pyarrow", fn_kwargs=kw | {"seen": True}))
        drops.append(rows.groupby("part", num_partitions=band_parts).map_groups(
            _resolve_near, batch_format="pyarrow", fn_kwargs={"distance": d}))
    # 3. one file of drops per shard.
    storage.makedirs(plan_dir)
    written = drops[0].union(*drops[1:]) if len(drops) > 1 else drops[0]
    counts = written.groupby("shard", num_partitions=parts).map_groups(
        _write_shard, batch_format="pyarrow",
        fn_kwargs={"plan_dir": str(plan_dir), "distance": rules.near_distance, "env": env})
    return sum(row["drops"] for row in counts.take_all())  # one row per shard of the group


def _partitions(rows: int) -> int:
    """Shuffle partitions for `rows` entries; part keys run over KEYS_PER_PARTITION times as many."""
    return max(1, -(-rows // ENTRIES_PER_PARTITION))


# ----------------------------------------------------------------------------------------------
# 1. sha256 partitions


def _sha_rows(batch: pa.Table, part_keys: int, seen: bool) -> pa.Table:
    """KEYS rows (or published sha256/phash rows) with their partition and origin."""
    n = batch.num_rows
    if seen:
        batch = pa.table({"shard": [""] * n, "doc_id": [""] * n, "index": pa.array([-1] * n, pa.int32()),
                          "sha256": batch["sha256"], "phash": batch["phash"]}, schema=KEYS_SCHEMA)
    part = [zlib.crc32((s or "").encode()) % part_keys for s in batch["sha256"].to_pylist()]
    return (batch.select(KEYS_SCHEMA.names).cast(KEYS_SCHEMA)
            .append_column("seen", pa.array([seen] * n, pa.bool_()))
            .append_column("part", pa.array(part, pa.int32())))


def _resolve_sha(t: pa.Table, rules: DedupRules) -> pa.Table:
    """One sha256 partition: each hash with every occurrence of it, this group's and published.
    Returns this group's rows with reason/error ("" for survivors)."""
    occurrences: dict[str, list[tuple]] = defaultdict(list)
    cols = (t[c].to_pylist() for c in ("sha256", "seen", "doc_id", "index", "shard", "phash"))
    for sha, seen, doc, idx, shard, ph in zip(*cols):
        occurrences[sha].append((not seen, doc, idx, shard, ph or ""))  # published first, then by order
    out: dict[str, list] = {c: [] for c in _RESOLVED_SCHEMA.names}
    for occ in occurrences.values():
        occ.sort()
        published = not occ[0][0]
        mine = [o for o in occ if o[0]]
        n_docs = len({o[1] for o in mine})
        for k, (_, doc, idx, shard, ph) in enumerate(mine):
            reason = error = ""
            if rules.max_documents and n_docs > rules.max_documents:
                reason, error = "repeated_image", f"same image in {n_docs} documents > {rules.max_documents}"
            elif rules.exact and (published or k > 0):
                first = PUBLISHED if published else mine[0][1:3]
                reason, error = "duplicate_image", f"same sha256 as {first[0]} image {first[1]}"
            for c, v in zip(out, (shard, doc, idx, ph, reason, error)):
                out[c].append(v)
    return pa.table(out, schema=_RESOLVED_SCHEMA)


def _drops_of(t: pa.Table) -> pa.Table:
    t = t.filter(pc.not_equal(t["reason"], ""))
    n = t.num_rows
    return pa.table({"shard": t["shard"], "doc_id": t["doc_id"], "index": t["index"], "reason": t["reason"],
                     "error": t["error"], "near_seen": pa.nulls(n, pa.bool_()), "near_doc": pa.nulls(n, pa.string()),
                     "near_index": pa.nulls(n, pa.int32()), "near_shard": pa.nulls(n, pa.string())},
                    schema=DROPS_SCHEMA)


def _survivors_of(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t["reason"], "")).select(KEYS_SCHEMA.names[:3] + ["phash"])


# ----------------------------------------------------------------------------------------------
# 2. band partitions


def _band_rows(batch: pa.Table, distance: int, part_keys: int, seen: bool) -> pa.Table:
    """distance+1 rows per phash, one per band, partitioned by (band, band value)."""
    bands = phash_bands(distance)
    n = batch.num_rows
    shard = [""] * n if seen else batch["shard"].to_pylist()
    doc = [""] * n if seen else batch["doc_id"].to_pylist()
    index = [-1] * n if seen else batch["index"].to_pylist()
    out: dict[str, list] = {c: [] for c in _BAND_SCHEMA.names}
    for i, ph in enumerate(batch["phash"].to_pylist()):
        if not ph:
            continue
        h = int(ph, 16)
        for b, (lo, mask) in enumerate(bands):
            v = (h >> lo) & mask
            for c, x in zip(out, ((v * len(bands) + b) % part_keys, b, v, h, seen, shard[i], doc[i], index[i])):
                out[c].append(x)
    return pa.table(out, schema=_BAND_SCHEMA)


def _resolve_near(t: pa.Table, distance: int) -> pa.Table:
    """One band partition: each image of this group takes its earliest earlier row within
    `distance` bits among the rows sharing its (band, value)."""
    t = t.sort_by([("band", "ascending"), ("value", "ascending"), ("seen", "descending"),
                   ("doc_id", "ascending"), ("index", "ascending"), ("shard", "ascending")])
    band, value, h = (t[c].to_numpy() for c in ("band", "value", "h"))
    seen = t["seen"].to_numpy(zero_copy_only=False)
    rows = np.arange(t.num_rows)
    new = np.ones(t.num_rows, bool)
    new[1:] = (band[1:] != band[:-1]) | (value[1:] != value[:-1])
    pos = rows - np.maximum.accumulate(np.where(new, rows, 0))  # position within its bucket
    earliest = np.full(t.num_rows, -1)
    active, offset = rows[(pos > 0) & ~seen], 1
    while active.size:  # compare each row with the row `offset` places before it in its bucket
        hit = active[_popcount(h[active] ^ h[active - offset]) <= distance]
        earliest[hit] = hit - offset  # a larger offset is an earlier row: it overwrites
        offset += 1
        active = active[pos[active] >= offset]
    found = np.nonzero(earliest >= 0)[0]
    me, near = t.take(found), t.take(earliest[found])
    n = len(found)
    return pa.table({"shard": me["shard"], "doc_id": me["doc_id"], "index": me["index"],
                     "reason": pa.array(["near_duplicate_image"] * n), "error": pa.array([""] * n),
                     "near_seen": near["seen"], "near_doc": near["doc_id"], "near_index": near["index"],
                     "near_shard": near["shard"]}, schema=DROPS_SCHEMA)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (np.bitwise_count is numpy 2 only; the project allows 1.26)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(axis=1)


# ----------------------------------------------------------------------------------------------
# 3. shard files


def shard_file(plan_dir: str | Path, shard: str) -> str:
    return storage.join(plan_dir, f"{hashlib.sha1(shard.encode()).hexdigest()[:24]}.parquet")


def _write_shard(t: pa.Table, plan_dir: str, distance: int, env: dict[str, str] | None = None) -> pa.Table:
    """One shard's drops, one row per image: a near duplicate found in several bands keeps its
    earliest neighbour. Written whole or not at all (a retried task rewrites it): locally under a
    temp name, then renamed; in an object store by one upload."""
    shard = t["shard"][0].as_py()
    plan: dict[tuple[str, int], tuple[str, str]] = {}
    nearest: dict[tuple[str, int], tuple] = {}
    for r in t.to_pylist():
        key = (r["doc_id"], r["index"])
        if r["reason"] != "near_duplicate_image":
            plan[key] = (r["reason"], r["error"])
        else:
            order = (not r["near_seen"], r["near_doc"], r["near_index"], r["near_shard"])
            nearest[key] = min(nearest.get(key, order), order)
    for key, (published, doc, idx, _) in nearest.items():
        first = (doc, idx) if published else PUBLISHED
        plan[key] = ("near_duplicate_image", f"perceptual hash within {distance} of {first[0]} image {first[1]}")
    out = pa.table({"doc_id": [k[0] for k in plan], "index": [k[1] for k in plan],
                    "reason": [v[0] for v in plan.values()], "error": [v[1] for v in plan.values()]},
                   schema=PLAN_SCHEMA)
    path = shard_file(plan_dir, shard)
    if storage.is_uri(path):
        with storage.using(env):
            fs, inner = storage.filesystem(path)
            pq.write_table(out, inner, filesystem=fs)
    else:
        tmp = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}")
        pq.write_table(out, tmp)
        os.replace(tmp, path)
    return pa.table({"shard": [shard], "drops": pa.array([len(plan)], pa.int64())})


@lru_cache(maxsize=8)
def read_drops(plan_dir: str, shard: str) -> dict[tuple[str, int], tuple[str, str]]:
    """{(doc_id, index): (reason, error)} of one shard; {} when nothing of it was dropped.
    Cached per worker (batches of a shard share it): callers must not change it. In an object
    store, the caller has set the settings to reach it (storage.using)."""
    path = shard_file(plan_dir, shard)
    if not storage.is_file(path):
        return {}
    fs, inner = storage.arrow_path(path)
    t = pq.read_table(inner, filesystem=fs)
    return {(d, i): (r, e) for d, i, r, e in zip(*(t[c].to_pylist() for c in PLAN_SCHEMA.names))}
