"""Distributed dedup (pipelines/curate/dedup.py) makes the decisions of the single-process rules
(`DedupRules.plan`), which a brute-force pairwise check backs up: exact copies, near copies at
distance <= d and > d, repeated images, and a second run that sees the first one's published hashes."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipelines.curate import dedup
from pipelines.curate.filters import DedupRules
from pipelines.curate.job import dedup_udf
from pipelines.curate.readers import empty_image, rows_to_table

D = 4  # near_duplicate_distance
Record = tuple[str, str, int, str, str]  # shard, doc_id, index, sha256, phash


def _flip(h: int, bits: int, rng: random.Random) -> int:
    for b in rng.sample(range(64), bits):
        h ^= 1 << b
    return h


def _records(n: int, seed: int, shards: list[str], earlier: list[Record] = ()) -> list[Record]:
    """`n` images over a few shards: ~1/5 exact copies, ~1/5 near copies (1..D bits), ~1/10 far
    copies (D+1..D+3 bits), a logo in 4 documents, some without a phash; copies may be of `earlier`."""
    rng = random.Random(seed)
    out: list[Record] = []
    for i in range(n):
        shard = shards[i % len(shards)]
        doc_id, index = f"{shard}:{rng.randrange(n // 3)}", i  # documents of a few images each
        pool = out + list(earlier)
        src = rng.choice(pool) if pool else None
        kind = rng.random()
        if src and kind < 0.2:
            sha, ph = src[3], src[4]
        elif src and src[4] and kind < 0.5:
            sha, ph = f"s{seed}-{i}", f"{_flip(int(src[4], 16), rng.randint(1, D) if kind < 0.4 else rng.randint(D + 1, D + 3), rng):016x}"
        elif kind < 0.53:
            sha, ph = "logo", "f0f0f0f0f0f0f0f0"
        else:
            sha, ph = f"s{seed}-{i}", "" if kind < 0.56 else f"{rng.getrandbits(64):016x}"
        out.append((shard, doc_id, index, sha, ph))
    return out


def _distributed(records: list[Record], seen: list[tuple[str, str]], rules: DedupRules, plan_dir) -> dict:
    import ray

    keys = ray.data.from_arrow(pa.table(list(zip(*records)) or [[]] * 5, schema=dedup.KEYS_SCHEMA))
    seen_ds = ray.data.from_arrow(pa.table({"sha256": [s for s, _ in seen], "phash": [p for _, p in seen]})) \
        if seen else None
    n = dedup.plan(keys, seen_ds, rules, plan_dir)
    drops: dict = {}
    for shard in {r[0] for r in records}:
        drops |= dedup.read_drops(str(plan_dir), shard)
    assert n == len(drops)
    return drops


def _reference(records: list[Record], seen: list[tuple[str, str]], rules: DedupRules) -> dict:
    return rules.plan([r[1:] for r in records], {s for s, _ in seen}, [int(p, 16) for _, p in seen if p])


def test_reference_near_rule_is_the_pairwise_rule():
    """Brute force: a survivor of the sha256 rules is a near duplicate iff an earlier survivor lies
    within d bits (dropped or not), so a chain A~B~C drops C even when C is far from A."""
    a, b = 0, (1 << 0) | (1 << 1) | (1 << 2)
    c = b | (1 << 10) | (1 << 11) | (1 << 12)  # 3 bits from b, 6 from a
    chain = [("a", 0, "1", f"{a:016x}"), ("b", 0, "2", f"{b:016x}"), ("c", 0, "3", f"{c:016x}")]
    plan = DedupRules(exact=True, near_distance=D, max_documents=0).plan(chain)
    assert set(plan) == {("b", 0), ("c", 0)} and plan[("c", 0)][1].endswith("of b image 0")

    records = sorted(r[1:] for r in _records(300, 1, ["x.jsonl"]))
    rules = DedupRules(exact=False, near_distance=D, max_documents=0)
    plan = rules.plan(records)
    for j, (doc, idx, _, ph) in enumerate(records):
        earlier = [r for r in records[:j] if ph and r[3] and (int(r[3], 16) ^ int(ph, 16)).bit_count() <= D]
        assert ((doc, idx) in plan) == bool(earlier)
        if earlier:
            assert plan[(doc, idx)][1].endswith(f"of {earlier[0][0]} image {earlier[0][1]}")


@pytest.mark.parametrize("rules", [DedupRules(exact=True, near_distance=D, max_documents=3),
                                   DedupRules(exact=False, near_distance=D, max_documents=0)],
                         ids=["all-rules", "near-only"])
def test_distributed_plan_matches_reference_across_two_runs(ray_session, tmp_path, monkeypatch, rules):
    monkeypatch.setattr(dedup, "ENTRIES_PER_PARTITION", 64)  # several partitions, even this small
    shards = ["/in/a.jsonl", "/in/b.jsonl", "/other/c.jsonl"]
    run1 = _records(300, 2, shards)
    want1 = _reference(run1, [], rules)
    got1 = _distributed(run1, [], rules, tmp_path / "run1")
    assert got1 == want1
    reasons = {v[0] for v in want1.values()}
    assert {"near_duplicate_image"} <= reasons and ("duplicate_image" in reasons) == rules.exact
    assert ("repeated_image" in reasons) == bool(rules.max_documents)

    # Run 2 sees what run 1 published; some of its images copy those.
    published = [(r[3], r[4]) for r in run1 if (r[1], r[2]) not in got1]
    run2 = _records(200, 3, shards, earlier=[r for r in run1 if (r[1], r[2]) not in got1])
    want2 = _reference(run2, published, rules)
    got2 = _distributed(run2, published, rules, tmp_path / "run2")
    assert got2 == want2
    assert any("an earlier shard group" in err for _, err in want2.values())
    assert len(want2) < len(run2)  # not everything is a duplicate


def test_no_drops_no_files(ray_session, tmp_path):
    records = [("s", "s:0", 0, "a", f"{1:016x}"), ("s", "s:1", 0, "b", f"{(1 << 40) - 1:016x}")]
    assert _distributed(records, [], DedupRules(), tmp_path / "plan") == {}
    assert not list((tmp_path / "plan").glob("*.parquet"))


def test_dedup_udf_applies_each_shards_file(tmp_path):
    rules = DedupRules(exact=True, near_distance=-1, max_documents=0)
    docs = []
    for shard in ("/in/a.jsonl", "/in/b.jsonl"):
        doc = {"doc_id": "same-name:0", "shard": shard, "url": "", "texts": ["t"], "similarity": [],
               "drop_stage": "", "reason": "", "error": "", "images": [empty_image("u0"), empty_image("u1")]}
        docs.append(doc)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["same-name:0"], "index": pa.array([1], pa.int32()),
                             "reason": ["duplicate_image"], "error": ["same sha256 as x image 0"]},
                            schema=dedup.PLAN_SCHEMA), dedup.shard_file(plan_dir, "/in/b.jsonl"))
    out = dedup_udf(rows_to_table(docs), str(plan_dir)).to_pylist()
    assert rules.stage == "dedup"
    assert [[im["reason"] for im in d["images"]] for d in out] == [["", ""], ["", "duplicate_image"]]
    assert out[1]["images"][1]["drop_stage"] == "dedup"
