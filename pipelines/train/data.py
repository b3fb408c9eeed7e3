"""Training data: check the curated folder, build the Ray Data pipeline, iterate with a resumable position.

Curation writes Parquet shards with `SAMPLE_SCHEMA`, `manifest.json` and `tokenizer/`. Decoding the
PNG bytes into fixed-shape arrays (`dreamcore.batch.decode_batch`) runs in Ray Data `map_batches`
tasks, so the training step never waits on image decode. Each worker reads its shard of the stream
(`get_dataset_shard`); the order within an epoch is a pure function of (seed, epoch, rank) (Ray Data
order preserved + a seeded local shuffle), so resuming = replaying the epoch and skipping the
micro-batches already consumed. With one worker this reproduces the uninterrupted run exactly; with
several, Ray's streaming split hands blocks to whichever worker asks first, so the split between
workers (not the global order of samples seen) can differ after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dreamcore.config import ConfigError, ModelConfig
from dreamcore.schema import SAMPLE_SCHEMA, SCHEMA_VERSION


@dataclass
class DataPosition:
    """Where a worker is in its data stream: epoch, and micro-batches consumed in that epoch."""

    epoch: int = 0
    batches_done: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def parquet_files(data_dir: str | Path) -> list[Path]:
    """The sample shards of a curated data folder, sorted (a stable order for resume)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: no such folder; point it at the output folder of `dreamcore curate`")
    manifest = root / "manifest.json"
    # The curation manifest lists exactly the published sample shards (never rejected/ or temp
    # files); a hand-made folder without that list (tests, bench/) is globbed instead.
    listed = json.loads(manifest.read_text()).get("outputs", {}).get("files", []) if manifest.is_file() else []
    if listed:
        files = sorted(root / f for f in listed)
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"--data {root}: manifest.json lists shards that are missing: {absent[:3]}; "
                              "re-run `dreamcore curate` into the same folder to repair it")
    else:
        files = sorted(p for p in root.rglob("*.parquet")
                       if not any(s.startswith((".", "_")) or s == "rejected" for s in p.relative_to(root).parts))
    if not files:
        raise ConfigError(
            f"--data {root}: no .parquet shards found; run `dreamcore curate --output {root}` first"
        )
    return files


def check_data_folder(data_dir: str | Path, model: ModelConfig) -> list[Path]:
    """Fail early, naming the file and the fix, when the data cannot feed this model config."""
    root = Path(data_dir)
    files = parquet_files(root)
    if not (root / "tokenizer").is_dir():
        raise ConfigError(f"--data {root}: no tokenizer/ folder; curation writes it next to the shards")
    schema = pq.read_schema(files[0])
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    version = meta.get("dreamcore.schema_version")
    if version is not None and version != SCHEMA_VERSION:
        raise ConfigError(
            f"{files[0]}: sample schema version {version}, this trainer reads {SCHEMA_VERSION}; "
            "re-run curation with this version of dreamcore"
        )
    missing = [n for n in SAMPLE_SCHEMA.names if n not in schema.names]
    if missing:
        raise ConfigError(f"{files[0]}: missing columns {missing}; expected dreamcore.schema.SAMPLE_SCHEMA")
    first = pq.ParquetFile(files[0]).read_row_group(0, columns=["input_ids"]).column("input_ids")
    if len(first) and len(first[0]) != model.max_seq_len:
        raise ConfigError(
            f"{files[0]}: rows hold {len(first[0])} tokens but model.max_seq_len={model.max_seq_len}; "
            f"train with --set model.max_seq_len={len(first[0])} or re-tokenize"
        )
    return files


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def decode_rows(columns: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: Parquet rows -> the fixed-shape batch dict of docs/architecture.md."""
    from dreamcore.batch import decode_batch

    return decode_batch(columns, cfg)


def build_dataset(files: list[Path], model: ModelConfig, decode_batch_rows: int):
    """read_parquet -> map_batches(decode) as a lazy Ray Dataset (executed by the workers' shards)."""
    import ray.data

    ds = ray.data.read_parquet([str(f) for f in files], columns=SAMPLE_SCHEMA.names)
    # The data position of a checkpoint must mean the same rows on resume (also in local mode,
    # where the dataset is iterated directly instead of through Ray Train's DataConfig).
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        decode_rows,
        fn_kwargs={"cfg": model},
        batch_size=decode_batch_rows,
        batch_format="numpy",
    )


def decoded_size_mib(files: list[Path], model: ModelConfig, sample_rows: int = 4) -> float:
    """Estimated size of the decoded dataset: total rows x the bytes of a few decoded rows.

    Reads only Parquet footers plus `sample_rows` rows, so it is cheap on any corpus size."""
    from dreamcore.batch import decode_batch

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows == 0:
        return 0.0
    first = pq.ParquetFile(files[0])
    sample = first.read_row_group(0, columns=SAMPLE_SCHEMA.names).slice(0, sample_rows).to_pydict()
    n = len(sample["input_ids"])
    decoded = decode_batch(sample, model)
    per_row = sum(a.nbytes for a in decoded.values()) / max(1, n)
    return rows * per_row / 2**20


def iterate_batches(
    shard: Any,
    micro_batch_size: int,
    position: DataPosition,
    seed: int,
    rank: int,
    shuffle_buffer: int,
    prefetch_batches: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless micro-batches from a worker's shard, advancing `position` (mutated in place).

    An epoch is replayed from its start with the same shuffle seed and the first
    `position.batches_done` batches are skipped, so a resumed worker sees what it would have seen.
    """
    while True:
        skip = position.batches_done
        seen = 0
        batches = shard.iter_batches(
            batch_size=micro_batch_size,
            batch_format="numpy",
            drop_last=True,  # fixed shapes; every rank takes the same number of rows per step
            prefetch_batches=prefetch_batches,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=(seed + 1000 * position.epoch + rank) if shuffle_buffer else None,
        )
        for batch in batches:
            seen += 1
            if seen <= skip:
                continue
            position.batches_done += 1
            yield batch
        if seen == 0:
            raise ConfigError(
                f"worker {rank} got no full micro-batch of {micro_batch_size} rows in epoch "
                f"{position.epoch}; use fewer workers, a smaller micro_batch_size, or more data"
            )
        position.epoch += 1
        position.batches_done = 0
