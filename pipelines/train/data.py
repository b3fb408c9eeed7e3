"""Training data: check the curated folders, build the Ray Data pipelines, mix them with a resumable position.

Curation writes Parquet shards with `SAMPLE_SCHEMA`, `manifest.json` and `tokenizer/`. Decoding the
PNG bytes into fixed-shape arrays (`dreamcore.batch.decode_batch`) runs in Ray Data `map_batches`
tasks, so the training step never waits on image decode. A run trains on a mixture of one or more
folders (`data.mixture`): one Ray Dataset per folder, and each worker reads its shard of each
(`get_dataset_shard`). The order within a folder's epoch is a pure function of (seed, epoch, rank,
folder) (Ray Data order preserved + a seeded local shuffle); each folder cycles through its own
epochs. A micro-batch takes from each folder the rows `mix_counts` assigns (a pure function of the
rows taken so far), concatenated and shuffled by a seeded permutation. Resuming = replaying each
folder's epoch and skipping the rows already consumed. With one worker this reproduces the
uninterrupted run exactly; with several, Ray's streaming split hands blocks to whichever worker
asks first, so the split between workers (not the global order of samples seen) can differ after a
restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dreamcore import storage
from dreamcore.config import ConfigError, ModelConfig
from dreamcore.schema import SAMPLE_SCHEMA, SCHEMA_VERSION


@dataclass
class StreamPosition:
    """Where a worker is in one folder's stream of rows."""

    epoch: int = 0
    rows_done: int = 0  # rows of this epoch consumed (a resumed worker skips them)
    rows_total: int = 0  # rows taken from this folder over all epochs (what the mixing counts)


@dataclass
class DataPosition:
    """Where a worker is in every folder of the mixture, by the folder's name in `data.names()`."""

    streams: dict[str, StreamPosition] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {name: asdict(p) for name, p in self.streams.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], names: Sequence[str], micro_batch_size: int) -> DataPosition:
        """A checkpoint's position of this rank; folders it does not name start at their beginning.

        Checkpoints written before mixtures hold one stream as {"epoch", "batches_done"}: that is
        the first folder's position.
        """
        if isinstance(data.get("epoch"), int):
            data = {names[0]: {"epoch": data["epoch"], "rows_done": data.get("batches_done", 0) * micro_batch_size}}
        return cls({n: StreamPosition(**data.get(n, {})) for n in names})

    def describe(self) -> str:
        return ", ".join(f"{n}: epoch {p.epoch}, row {p.rows_done}" for n, p in self.streams.items())


def dataset_key(index: int) -> str:
    """The TorchTrainer dataset name of the mixture's `index`-th folder (get_dataset_shard's key)."""
    return f"d{index}"


def parquet_files(data_dir: str | Path) -> list[str]:
    """The sample shards of a curated data folder (local or object-store URI), sorted (a stable order
    for resume), spelled as `data_dir` is."""
    root = str(data_dir)
    if not storage.is_dir(root):
        raise ConfigError(f"--data {root}: no such folder; point it at the output folder of `dreamcore curate`")
    present = set(storage.list_files(root))  # one listing: per-file checks cost a request each on S3
    # The curation manifest lists exactly the published sample shards (never rejected/ or temp
    # files); a hand-made folder without that list (tests, bench/) is globbed instead.
    listed = read_manifest(root).get("outputs", {}).get("files", []) if "manifest.json" in present else []
    if listed:
        files = sorted(storage.join(root, f) for f in listed)
        absent = [storage.join(root, f) for f in listed if Path(f).as_posix() not in present]
        if absent:
            raise ConfigError(f"--data {root}: manifest.json lists shards that are missing: {absent[:3]}; "
                              "re-run `dreamcore curate` into the same folder to repair it")
    else:
        # Sorted by path components, as Path objects sort: the order a checkpoint's data position means.
        files = [storage.join(root, f) for f in sorted(present, key=lambda f: tuple(f.split("/")))
                 if f.endswith(".parquet") and not any(s.startswith((".", "_")) or s == "rejected"
                                                       for s in f.split("/"))]
    if not files:
        raise ConfigError(
            f"--data {root}: no .parquet shards found; run `dreamcore curate --output {root}` first"
        )
    return files


def check_data_folder(data_dir: str | Path, model: ModelConfig) -> list[str]:
    """Fail early, naming the file and the fix, when the data cannot feed this model config."""
    root = str(data_dir)
    files = parquet_files(root)
    if not storage.is_dir(storage.join(root, "tokenizer")):
        raise ConfigError(f"--data {root}: no tokenizer/ folder; curation writes it next to the shards")
    with open_parquet(files[0]) as first_file:
        schema = first_file.schema_arrow
        first = (first_file.read_row_group(0, columns=["input_ids"]).column("input_ids")
                 if "input_ids" in schema.names and first_file.num_row_groups else [])
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
    if len(first) and len(first[0]) != model.max_seq_len:
        raise ConfigError(
            f"{files[0]}: rows hold {len(first[0])} tokens but model.max_seq_len={model.max_seq_len}; "
            f"train with --set model.max_seq_len={len(first[0])} or re-tokenize"
        )
    return files


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The folder's curation manifest, {} without one; a file that is not a JSON object is a
    ConfigError naming it and the fix."""
    path = storage.join(data_dir, "manifest.json")
    if not storage.is_file(path):
        return {}
    try:
        manifest = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        manifest = e
    if not isinstance(manifest, dict):
        raise ConfigError(f"--data {data_dir}: {path} is not a JSON object ({manifest!s:.80}); re-run "
                          "`dreamcore curate` into the folder, or move the file away to train on its shards")
    return manifest


@contextmanager
def open_parquet(file: str | Path) -> Iterator[pq.ParquetFile]:
    """A Parquet file of a local folder or an object store, closed after use."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as f:
        yield pq.ParquetFile(f)


def decode_rows(columns: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: Parquet rows -> the fixed-shape batch dict of docs/architecture.md."""
    from dreamcore.batch import decode_batch

    return decode_batch(columns, cfg)


def build_dataset(files: Sequence[str | Path], model: ModelConfig, decode_batch_rows: int):
    """read_parquet -> map_batches(decode) as a lazy Ray Dataset (executed by the workers' shards).

    Shards in an object store are read through the same pyarrow filesystem the checks used, so the
    endpoint and credentials of the driver's environment reach Ray Data's read tasks.
    """
    import ray.data

    fs = storage.arrow_path(files[0])[0] if files else None
    ds = ray.data.read_parquet([storage.arrow_path(f)[1] for f in files], filesystem=fs, columns=SAMPLE_SCHEMA.names)
    # The data position of a checkpoint must mean the same rows on resume (also in local mode,
    # where the dataset is iterated directly instead of through Ray Train's DataConfig).
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        decode_rows,
        fn_kwargs={"cfg": model},
        batch_size=decode_batch_rows,
        batch_format="numpy",
    )


def count_rows(files: Sequence[str | Path]) -> int:
    """Rows of the shards, from their Parquet footers."""
    total = 0
    for f in files:
        with open_parquet(f) as pf:
            total += pf.metadata.num_rows
    return total


def check_rows_per_worker(folder: str, rows: int, workers: int, micro_batch_size: int) -> None:
    """Ray Train splits each dataset equally (the remainder dropped): every worker needs one whole
    micro-batch of every folder per epoch. Checked on the driver, before any worker starts."""
    if rows // workers < micro_batch_size:
        raise ConfigError(
            f"--data {folder}: {rows} training rows give each of {workers} worker(s) {rows // workers}, less "
            f"than one micro-batch of {micro_batch_size}; use fewer workers, a smaller micro_batch_size, or "
            "more data")


def held_out_split(files: Sequence[str | Path], rows: int, where: str) -> int:
    """Rows of `files` left to training when the last `rows` are held out for validation."""
    total = count_rows(files)
    if rows >= total:
        raise ConfigError(f"validation.rows={rows} would hold out all {total} rows of {where}; "
                          "lower it (or curate more data)")
    return total - rows


def read_held_out(files: Sequence[str | Path], rows: int) -> Any:
    """The last `rows` rows of `files` (the validation split) as a pyarrow Table of SAMPLE_SCHEMA."""
    import pyarrow as pa

    tables, need = [], rows
    for f in reversed(list(files)):
        with open_parquet(f) as pf:
            table = pf.read(columns=SAMPLE_SCHEMA.names)
        tables.insert(0, table.slice(max(0, table.num_rows - need)))
        need -= tables[0].num_rows
        if need <= 0:
            break
    return pa.concat_tables(tables)


def decoded_size_mib(files: Sequence[str | Path], model: ModelConfig, sample_rows: int = 4) -> float:
    """Estimated size of the decoded dataset: total rows x the bytes of a few decoded rows.

    Reads only Parquet footers plus `sample_rows` rows, so it is cheap on any corpus size."""
    from dreamcore.batch import decode_batch

    rows = count_rows(files)
    if rows == 0:
        return 0.0
    with open_parquet(files[0]) as first:
        sample = first.read_row_group(0, columns=SAMPLE_SCHEMA.names).slice(0, sample_rows).to_pydict()
    n = len(sample["input_ids"])
    decoded = decode_batch(sample, model)
    per_row = sum(a.nbytes for a in decoded.values()) / max(1, n)
    return rows * per_row / 2**20


def mix_counts(weights: Sequence[float], taken: Sequence[int], rows: int) -> list[int]:
    """How many of the next `rows` rows each folder gives, after `taken[i]` rows from folder i so far.

    Row by row, Tijdeman's chairman assignment: the next row goes to the folder whose next row is
    due first ((taken + 1 - a) / weight smallest, a = 1 / (2k - 2)) among those at least `a` rows
    behind their share. Every prefix of the row sequence is then within 1 - a rows of each weight
    (k = 2: half a row), so a micro-batch holds each folder's share rounded, and the realised mixture
    over any number of steps is the weights. The counts are a pure function of `taken`: a resumed
    worker continues the same sequence, and every rank takes the same rows from each folder, so
    the streaming splits of all folders advance in step.
    """
    k = len(weights)
    if k == 1:
        return [rows]
    a = 1.0 / (2 * k - 2)
    counts, out = list(taken), [0] * k
    n = sum(counts)
    for _ in range(rows):
        n += 1
        behind = [j for j in range(k) if n * weights[j] - counts[j] >= a - 1e-9] or list(range(k))
        i = min(behind, key=lambda j: ((counts[j] + 1 - a) / weights[j], j))
        counts[i] += 1
        out[i] += 1
    return out


class RowStream:
    """Endless rows of one folder's shard, taken in any amounts; advances `position` (mutated in place).

    Rows come from Ray Data in chunks of `chunk_rows` (the micro-batch size, last partial chunk of an
    epoch dropped, as the one-folder stream always did). An epoch is replayed from its start with the
    same shuffle seed and its first `position.rows_done` rows are skipped, so a resumed worker sees
    what it would have seen.
    """

    def __init__(self, shard: Any, name: str, index: int, position: StreamPosition, chunk_rows: int,
                 seed: int, rank: int, shuffle_buffer: int, prefetch_batches: int):
        self.shard, self.name, self.index, self.position = shard, name, index, position
        self.chunk_rows, self.seed, self.rank = chunk_rows, seed, rank
        self.shuffle_buffer, self.prefetch_batches = shuffle_buffer, prefetch_batches
        self._batches: Iterator[dict[str, np.ndarray]] | None = None
        self._chunk: dict[str, np.ndarray] | None = None
        self._offset = 0  # rows of `_chunk` already taken
        self._chunks_seen = 0  # in this epoch, skipped ones included
        self._skip = 0  # rows of this epoch still to skip (consumed before a restart)

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The next `n` rows, as slices of one or more chunks."""
        parts = []
        while n > 0:
            if self._chunk is None or self._offset >= _rows(self._chunk):
                self._next_chunk()
            m = min(n, _rows(self._chunk) - self._offset)
            parts.append({k: v[self._offset:self._offset + m] for k, v in self._chunk.items()})
            self._offset += m
            self.position.rows_done += m
            self.position.rows_total += m
            n -= m
        return parts

    def _next_chunk(self) -> None:
        while True:
            if self._batches is None:
                self._start_epoch()
            batch = next(self._batches, None)
            if batch is None:  # the epoch is over: the next one, reshuffled
                if self._chunks_seen == 0:
                    raise ConfigError(
                        f"worker {self.rank} got no full micro-batch of {self.chunk_rows} rows of {self.name} in "
                        f"epoch {self.position.epoch}; use fewer workers, a smaller micro_batch_size, or more data"
                    )
                self.position.epoch += 1
                self.position.rows_done = 0
                self._batches = None
                continue
            self._chunks_seen += 1
            rows = _rows(batch)
            if self._skip >= rows:  # consumed before the restart
                self._skip -= rows
                continue
            self._chunk, self._offset, self._skip = batch, self._skip, 0
            return

    def _start_epoch(self) -> None:
        seed = self.seed + 1000 * self.position.epoch + self.rank + 100_003 * self.index
        self._batches = iter(self.shard.iter_batches(
            batch_size=self.chunk_rows,
            batch_format="numpy",
            drop_last=True,  # fixed shapes; every rank takes the same number of rows per step
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=seed if self.shuffle_buffer else None,
        ))
        self._chunks_seen = 0
        self._skip = self.position.rows_done


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values())))


def concat_rows(parts: list[dict[str, np.ndarray]], where: str) -> dict[str, np.ndarray]:
    """Row slices (of one or several folders) -> one batch; the folders' decoded keys must agree."""
    if len(parts) == 1:
        return parts[0]
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ConfigError(
                f"{where}: the folders decode to different columns ({sorted(keys)} vs {sorted(p)}); "
                "curate every folder of a mixture with the same dreamcore version"
            )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def iterate_batches(
    shards: Sequence[Any],
    names: Sequence[str],
    weights: Sequence[float],
    micro_batch_size: int,
    position: DataPosition,
    seed: int,
    rank: int,
    shuffle_buffer: int,
    prefetch_batches: int,
) -> Iterator[tuple[dict[str, np.ndarray], list[int]]]:
    """Endless (micro-batch, rows from each folder) from a worker's shards, advancing `position`.

    Each micro-batch takes `mix_counts` rows from each folder's stream, concatenated in folder order
    and (with more than one folder) permuted by a generator seeded with (seed, rank, micro-batch
    index), so the folders' rows are mixed within the batch and a resumed run permutes the same way.
    """
    streams = [
        RowStream(shard, name, i, position.streams[name], micro_batch_size, seed, rank, shuffle_buffer,
                  prefetch_batches)
        for i, (shard, name) in enumerate(zip(shards, names))
    ]
    while True:
        taken = [s.position.rows_total for s in streams]
        counts = mix_counts(weights, taken, micro_batch_size)
        parts = [part for s, c in zip(streams, counts) if c for part in s.take(c)]
        batch = concat_rows(parts, f"worker {rank}")
        if len(streams) > 1:
            order = np.random.default_rng([seed, rank, sum(taken) // micro_batch_size]).permutation(micro_batch_size)
            batch = {k: v[order] for k, v in batch.items()}
        yield batch, counts
