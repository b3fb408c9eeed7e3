"""Dedup benchmark: the driver's memory stays flat while the number of images grows.

Baseline "driver plan": what job.py did before dedup.py, measured in the same run on the same
hashes: gather every image key on the driver, read the published hashes there, DedupRules.plan,
ray.put the plan. "distributed": dedup.plan (hash-partitioned in Ray Data, drops written by shard).

Synthetic hashes are made in Ray tasks, so the driver never holds them: images in documents of 3
over 8 shards, 10% exact copies, 10% near copies (1..d bits), 5% far copies (d+1..d+3 bits, kept),
plus published hashes (n/10, half of them copies of this run's images).

Driver memory: the process's RSS sampled every 2 ms during the step, peak minus the RSS before it.

Run: .venv/bin/python bench/dedup.py [--images 10000 30000 100000] [--entries-per-partition 25000]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from pipelines.curate import dedup  # noqa: E402
from pipelines.curate.filters import DedupRules  # noqa: E402

D = 4
RULES = DedupRules(exact=True, near_distance=D, max_documents=10)


def _mix(k: int) -> int:
    """splitmix64: a deterministic 64-bit value per id."""
    k = (k + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    k = ((k ^ (k >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    k = ((k ^ (k >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return k ^ (k >> 31)


def _flip(h: int, bits: int, seed: int) -> int:
    flipped: set[int] = set()
    while len(flipped) < bits:
        seed = _mix(seed)
        flipped.add(seed % 64)
    for b in flipped:
        h ^= 1 << b
    return h


def _sha(k: int) -> str:
    return hashlib.sha256(str(k).encode()).hexdigest()


def _image(k: int) -> tuple[str, str]:
    """(sha256, phash) of image k: unique, or a copy (exact, near, far) of an earlier image."""
    r, src = _mix(k ^ 0xA5A5) % 100, _mix(k ^ 0x5A5A) % max(k, 1)
    if k and r < 10:
        return _sha(src), f"{_mix(src):016x}"
    if k and r < 20:
        return _sha(k), f"{_flip(_mix(src), 1 + r % D, k):016x}"
    if k and r < 25:
        return _sha(k), f"{_flip(_mix(src), D + 1 + r % 3, k):016x}"
    return _sha(k), f"{_mix(k):016x}"


def keys_udf(batch: dict) -> pa.Table:
    out: dict[str, list] = {c: [] for c in dedup.KEYS_SCHEMA.names}
    for k in batch["id"].tolist():
        doc = k // 3
        sha, ph = _image(k)
        for c, v in zip(out, (f"/data/in/shard{doc % 8}.jsonl", f"shard{doc % 8}.jsonl:{doc}", k % 3, sha, ph)):
            out[c].append(v)
    return pa.table(out, schema=dedup.KEYS_SCHEMA)


def seen_udf(batch: dict, n: int) -> pa.Table:
    shas, phs = [], []
    for j in batch["id"].tolist():
        sha, ph = _image((j * 7) % n) if j % 2 else (_sha(10**12 + j), f"{_mix(10**12 + j):016x}")
        shas.append(sha)
        phs.append(ph)
    return pa.table({"sha256": shas, "phash": phs})


class PeakRSS:
    """Peak RSS of this process above its value at entry, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so steps start even
        except OSError:
            pass
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mb = (self.peak - self.start) / 2**20


def driver_plan(keys: ray.data.Dataset, seen_dir: Path) -> int:
    """The replaced code path (job.py before dedup.py), step for step."""
    refs = keys.to_arrow_refs()
    table = pa.concat_tables(ray.get(refs))
    records = list(zip(*(table.column(c).to_pylist() for c in ("doc_id", "index", "sha256", "phash"))))
    seen = pq.read_table(seen_dir)
    plan = RULES.plan(records, set(seen.column("sha256").to_pylist()),
                      [int(h, 16) for h in seen.column("phash").to_pylist() if h])
    ray.put(plan)
    return len(plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    ap.add_argument("--entries-per-partition", type=int, default=25_000,
                    help="dedup.ENTRIES_PER_PARTITION for this run (small, so even 10k images use partitions)")
    args = ap.parse_args()
    dedup.ENTRIES_PER_PARTITION = args.entries_per_partition
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    rows = []
    try:
        for n in args.images:
            keys = ray.data.range(n, override_num_blocks=8).map_batches(keys_udf, batch_format="numpy").materialize()
            seen_dir = work / f"seen-{n}"
            ray.data.range(n // 10, override_num_blocks=2).map_batches(
                seen_udf, batch_format="numpy", fn_kwargs={"n": n}).write_parquet(str(seen_dir))
            with PeakRSS() as dist:
                drops = dedup.plan(keys, ray.data.read_parquet(str(seen_dir)), RULES, work / f"plan-{n}")
            with PeakRSS() as base:
                base_drops = driver_plan(keys, seen_dir)
            assert drops == base_drops, (n, drops, base_drops)  # same decisions, counted
            rows.append((n, drops, base, dist))
            del keys
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()

    n0, _, base0, dist0 = rows[0]
    print(f"\nDedup of n images + n/10 published hashes, d={D}, {args.entries_per_partition} entries per partition, "
          f"{os.cpu_count()} CPUs. Baseline: 'driver plan' (the replaced code) at the same n.")
    print(f"{'images':>8} {'drops':>7} | {'driver plan s':>13} {'MB':>7} | {'distributed s':>13} {'MB':>7} | "
          f"{'time vs base':>12} {'MB vs base':>10} | {'MB growth vs ' + str(n0):>18} {'(base)':>7}")
    for n, drops, base, dist in rows:
        print(f"{n:>8} {drops:>7} | {base.seconds:>13.2f} {base.mb:>7.1f} | {dist.seconds:>13.2f} {dist.mb:>7.1f} | "
              f"{dist.seconds / base.seconds:>11.2f}x {dist.mb / max(base.mb, 0.1):>9.2f}x | "
              f"{dist.mb / max(dist0.mb, 0.1):>17.2f}x {base.mb / max(base0.mb, 0.1):>6.2f}x")


if __name__ == "__main__":
    main()
