"""Training on a weighted mixture of curated folders (data.mixture, `--data FOLDER@WEIGHT`).

Fast units first: the config and its YAML / `--set` / CLI spellings, the mixing counts, the
per-folder streams (fake shards, no Ray) and their resume. Then the driver's checks (tokenizer
mismatch, a changed mixture on relaunch) and, marked e2e, real runs on two folders: the realised
mixture in metrics.jsonl, a killed and resumed run reproducing the straight one, and two workers at
0.5 CPU each streaming both folders without hanging.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TRAIN_MODEL_OVERRIDES, make_data_folder, small_model_config  # noqa: E402

from dreamcore.config import ConfigError  # noqa: E402
from pipelines.train.config import MixtureEntry, TrainConfig, load_train_config, parse_data_arg  # noqa: E402
from pipelines.train.data import DataPosition, iterate_batches, mix_counts  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Configuration


def test_yaml_and_set_spell_a_mixture(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  mixture:\n    - {path: /d/mmc4, weight: 0.6}\n    - path: /d/pairs\n      weight: 0.4\n")
    cfg = load_train_config("tiny", path)
    assert cfg.data.mixture == [MixtureEntry("/d/mmc4", 0.6), MixtureEntry("/d/pairs", 0.4)]
    assert cfg.data.names() == ["mmc4", "pairs"] and cfg.data.weights() == pytest.approx([0.6, 0.4])
    # --set replaces the whole list; weights are relative; a name can be given
    cfg = load_train_config("tiny", path, ["data.mixture=[{path: /x/a, weight: 3}, {path: /y/a, name: caps}]"])
    assert cfg.data.names() == ["a", "caps"] and cfg.data.weights() == pytest.approx([0.75, 0.25])
    # the Python spelling of repeated --data flags wins over both
    cfg = load_train_config("tiny", path, ["data.mixture=[{path: /x/a}]"], data=["/e/one@2", "/f/one"])
    assert cfg.data.mixture == [MixtureEntry("/e/one", 2.0), MixtureEntry("/f/one", 1.0)]
    assert cfg.data.names() == ["one", "one_1"]  # two folders of one name stay apart in the metrics


def test_mixture_values_are_checked():
    for bad, match in (("[{path: /a, weight: 0}]", r"data.mixture\[0\].weight=0.0 \(/a\): weights must be > 0"),
                       ("[{path: /a}, {path: /b, weight: -1}]", r"mixture\[1\].weight"),
                       ("[{weight: 1}]", r"mixture\[0\].path is empty"),
                       ("[{path: /a, name: x}, {path: /b, name: x}]", "used twice"),
                       ("[{path: /a, name: 'a b'}]", "letters, digits"),
                       ("[{path: /a, wieght: 1}]", "wieght")):
        with pytest.raises(ConfigError, match=match):
            load_train_config("tiny", None, [f"data.mixture={bad}"])


def test_data_arg_keeps_uris_and_at_signs_whole():
    assert parse_data_arg("runs/mmc4") == {"path": "runs/mmc4", "weight": 1.0}
    assert parse_data_arg("runs/mmc4@0.6") == {"path": "runs/mmc4", "weight": 0.6}
    assert parse_data_arg("s3://bucket/mmc4@2") == {"path": "s3://bucket/mmc4", "weight": 2.0}
    assert parse_data_arg("s3://bucket/mmc4") == {"path": "s3://bucket/mmc4", "weight": 1.0}
    assert parse_data_arg("/data/user@host/x") == {"path": "/data/user@host/x", "weight": 1.0}
    assert parse_data_arg("@0.5") == {"path": "@0.5", "weight": 1.0}  # no path before the @: a path


def test_one_folder_is_a_mixture_of_one(tmp_path):
    from pipelines.train.job import resolve_mixture

    cfg = resolve_mixture(TrainConfig(), tmp_path / "data")
    assert cfg.data.mixture == [MixtureEntry(str((tmp_path / "data").resolve()), 1.0, "data")]
    assert resolve_mixture(cfg, None) == cfg  # resolving again changes nothing
    mix = load_train_config("tiny", None, data=[f"{tmp_path}/a@3", f"{tmp_path}/b@1"])
    resolved = resolve_mixture(mix, None).data.mixture
    assert [(e.name, e.weight) for e in resolved] == [("a", 0.75), ("b", 0.25)]
    with pytest.raises(ConfigError, match="given twice"):
        resolve_mixture(mix, tmp_path / "data")
    with pytest.raises(ConfigError, match="no training data"):
        resolve_mixture(TrainConfig(), None)


# ----------------------------------------------------------------------------------------------
# Mixing counts


def test_counts_match_the_weights_exactly():
    """0.7 / 0.3 over 20 micro-batches of 8: 112 / 48 rows, every batch 5 or 6 of the first."""
    taken = [0, 0]
    per_batch = []
    for _ in range(20):
        counts = mix_counts([0.7, 0.3], taken, 8)
        per_batch.append(counts[0])
        taken = [t + c for t, c in zip(taken, counts)]
    assert taken == [112, 48]
    assert set(per_batch) == {5, 6}
    assert mix_counts([1.0], [123], 8) == [8]


def test_every_prefix_is_within_one_row_of_the_weights():
    """Tijdeman's bound: |rows_i - n w_i| <= 1 - 1 / (2k - 2) after any n rows, for any weights."""
    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(2, 6)
        w = [rng.random() ** 3 + 1e-3 for _ in range(k)]
        w = [x / sum(w) for x in w]
        taken = [0] * k
        for n in range(1, 201):
            taken = [t + c for t, c in zip(taken, mix_counts(w, taken, 1))]
            assert max(abs(n * wi - ti) for wi, ti in zip(w, taken)) <= 1 - 1 / (2 * k - 2) + 1e-9


# ----------------------------------------------------------------------------------------------
# Streams over fake shards (Ray Data's iter_batches contract, no Ray)


class FakeShard:
    """A worker's shard: `rows` ids, drop_last chunks, a seeded permutation when shuffling."""

    def __init__(self, ids: list[int]):
        self.ids = np.asarray(ids)
        self.epochs = 0

    def iter_batches(self, batch_size, batch_format, drop_last, prefetch_batches, local_shuffle_buffer_size,
                     local_shuffle_seed):
        assert batch_format == "numpy" and drop_last
        self.epochs += 1
        ids = self.ids
        if local_shuffle_buffer_size:
            ids = ids[np.random.default_rng(local_shuffle_seed).permutation(len(ids))]
        for start in range(0, len(ids) - batch_size + 1, batch_size):
            chunk = ids[start:start + batch_size]
            yield {"id": chunk, "input_ids": np.stack([np.full(3, i) for i in chunk])}


def _mixed(shards, weights, position, micro=8, seed=0):
    names = [f"f{i}" for i in range(len(shards))]
    return iterate_batches(shards, names, weights, micro, position, seed, 0, 16, 1)


def _fresh(n: int) -> DataPosition:
    return DataPosition.from_dict({}, [f"f{i}" for i in range(n)], 8)


def test_batches_mix_the_folders_and_cycle_each_one():
    big, small = FakeShard(list(range(1000, 1100))), FakeShard(list(range(20)))  # small: 2 chunks an epoch
    position = _fresh(2)
    batches = _mixed([big, small], [0.7, 0.3], position)
    seen = [next(batches) for _ in range(20)]
    assert all(len(b["id"]) == 8 and b["input_ids"].shape == (8, 3) for b, _ in seen)
    assert all((b["input_ids"][:, 0] == b["id"]).all() for b, _ in seen)  # columns stay row-aligned
    ids = np.concatenate([b["id"] for b, _ in seen])
    assert (ids >= 1000).sum() == 112 and (ids < 1000).sum() == 48
    assert [sum(c[i] for _, c in seen) for i in range(2)] == [112, 48]
    # within a batch the folders are interleaved, not one block after the other
    assert any(not (b["id"][:c[0]] >= 1000).all() for b, c in seen)
    # each folder cycles its own epochs: the small one (16 usable rows an epoch) is at the end of its
    # third (the next row starts the fourth), the big one (96 usable rows) 16 rows into its second
    assert position.to_dict() == {"f0": {"epoch": 1, "rows_done": 16, "rows_total": 112},
                                  "f1": {"epoch": 2, "rows_done": 16, "rows_total": 48}}
    small_ids = ids[ids < 1000]
    assert list(small_ids[:16]) != list(small_ids[16:32])  # reshuffled per epoch


def test_resumed_stream_continues_exactly():
    """A position saved after k batches gives the batches the uninterrupted stream gave after k."""
    shards = lambda: [FakeShard(list(range(1000, 1100))), FakeShard(list(range(20)))]  # noqa: E731
    position = _fresh(2)
    straight = _mixed(shards(), [0.7, 0.3], position, seed=5)
    saved = {}
    batches = []
    for k in range(24):
        batches.append(next(straight))
        if k in (6, 13):
            saved[k + 1] = copy.deepcopy(position.to_dict())
    for done, state in saved.items():
        resumed = _mixed(shards(), [0.7, 0.3], DataPosition.from_dict(state, ["f0", "f1"], 8), seed=5)
        for k in range(done, 24):
            b, c = next(resumed)
            assert c == batches[k][1] and (b["id"] == batches[k][0]["id"]).all(), (done, k)


def test_one_folder_streams_whole_chunks_as_before():
    """A mixture of one yields Ray Data's chunks unchanged (no permutation): the one-folder order."""
    batches = _mixed([FakeShard(list(range(40)))], [1.0], _fresh(1))
    chunks = FakeShard(list(range(40))).iter_batches(8, "numpy", True, 1, 16, 0)
    for _ in range(5):
        batch, counts = next(batches)
        assert counts == [8] and (batch["id"] == next(chunks)["id"]).all()


def test_checkpoints_from_before_mixtures_resume_the_first_folder():
    position = DataPosition.from_dict({"epoch": 2, "batches_done": 3}, ["mmc4", "pairs"], 8)
    assert position.to_dict() == {"mmc4": {"epoch": 2, "rows_done": 24, "rows_total": 0},
                                  "pairs": {"epoch": 0, "rows_done": 0, "rows_total": 0}}


def test_a_shard_without_a_full_chunk_is_named():
    batches = _mixed([FakeShard(list(range(100))), FakeShard(list(range(5)))], [0.5, 0.5], _fresh(2))
    with pytest.raises(ConfigError, match="no full micro-batch of 8 rows of f1"):
        next(batches)


# ----------------------------------------------------------------------------------------------
# The driver's checks (before any Ray work)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    cfg = small_model_config()
    return {"mmc4": make_data_folder(root / "mmc4", cfg, num_docs=48, prefix="m"),
            "pairs": make_data_folder(root / "pairs", cfg, num_docs=24, prefix="p")}


def _cfg(*overrides: str, data: list[str], workers: int = 1):
    base = ["micro_batch_size=4", "log_every=1", "optim.warmup_steps=2", "optim.lr=0.003",
            "data.shuffle_buffer=16", "scaling.max_failures=0", "scaling.torch_threads=1",
            *[f"model.{s}" for s in TRAIN_MODEL_OVERRIDES]]
    return load_train_config("tiny", None, [*base, *overrides], workers=workers, data=data)


def test_folders_with_different_tokenizers_are_refused(folders, tmp_path):
    from pipelines.train.job import train

    other = make_data_folder(tmp_path / "other", small_model_config(), num_docs=8,
                             extra_tokenizer_texts=("zebra quokka axolotl",) * 20)
    cfg = _cfg(data=[str(folders["mmc4"]), f"{other}@0.5"])
    with pytest.raises(ConfigError) as e:
        train(cfg, None, tmp_path / "run")
    msg = str(e.value)
    assert str(other) in msg and str(folders["mmc4"]) in msg
    assert f"model_overrides.tokenizer.name_or_path={folders['mmc4'] / 'tokenizer'}" in msg
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_relaunch_with_another_mixture_is_refused(folders, tmp_path):
    from dreamcore.config import save_yaml
    from pipelines.train.job import _check_same_mixture, resolve_mixture

    run = tmp_path / "run"
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    first = resolve_mixture(_cfg(data=[f"{folders['mmc4']}@0.7", f"{folders['pairs']}@0.3"]), None)
    save_yaml(first, run / "train_config.yaml")
    _check_same_mixture(first, run)  # the same mixture resumes
    again = resolve_mixture(_cfg(data=[f"{folders['mmc4']}@7", f"{folders['pairs']}@3"]), None)
    _check_same_mixture(again, run)  # the same weights, spelled differently
    other = resolve_mixture(_cfg(data=[f"{folders['mmc4']}@0.5", f"{folders['pairs']}@0.5"]), None)
    with pytest.raises(ConfigError, match=r"mixture mmc4@0.7, pairs@0.3, this launch gives mmc4@0.5, pairs@0.5"):
        _check_same_mixture(other, run)


# ----------------------------------------------------------------------------------------------
# Real runs (Ray Train + Ray Data + DeepSpeed on CPU)

COMMON = ["max_steps=6", "checkpoint.every_steps=3"]


def _rows(run: Path, name: str) -> int:
    from pipelines.train.metrics import read_metrics

    return sum(r[f"rows_{name}"] for r in read_metrics(run))


@pytest.fixture(scope="module")
def straight_mix(ray_session, folders, tmp_path_factory) -> Path:
    from pipelines.train.job import train

    run = tmp_path_factory.mktemp("straight-mix") / "run"
    data = [f"{folders['mmc4']}@0.7", f"{folders['pairs']}@0.3"]
    assert train(_cfg(*COMMON, data=data, workers=0), None, run).steps == 6
    return run


@pytest.mark.e2e
def test_metrics_show_the_realised_mixture(straight_mix):
    from pipelines.train.metrics import read_metrics

    rows = read_metrics(straight_mix)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["rows_mmc4"] + r["rows_pairs"] for r in rows] == [4] * 6
    assert (_rows(straight_mix, "mmc4"), _rows(straight_mix, "pairs")) == tuple(mix_counts([0.7, 0.3], [0, 0], 24))
    assert rows[-1]["epoch_pairs"] == 0 and rows[-1]["epoch"] == rows[-1]["epoch_mmc4"] == 0
    saved = (straight_mix / "train_config.yaml").read_text()
    assert "name: mmc4" in saved and "weight: 0.7" in saved  # the run folder records the mixture


@pytest.mark.e2e
def test_resumed_mixture_reproduces_the_uninterrupted_run(straight_mix, folders, tmp_path):
    """6 steps straight == 3 steps, the run dies, relaunch, resume to 6: same losses (one worker)."""
    from pipelines.train.job import train
    from pipelines.train.metrics import read_metrics

    data = [f"{folders['mmc4']}@0.7", f"{folders['pairs']}@0.3"]
    run = tmp_path / "resumed"
    with pytest.raises(Exception, match="injected failure"):
        train(_cfg(*COMMON, "debug.fail_at_step=3", data=data), None, run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert train(_cfg(*COMMON, data=data), None, run).steps == 6
    a, b = read_metrics(straight_mix), read_metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert (ra["rows_mmc4"], ra["rows_pairs"]) == (rb["rows_mmc4"], rb["rows_pairs"])
        for key in ("loss", "lm_loss", "vm_loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_two_workers_read_two_folders_on_two_cpus(ray_session, folders, tmp_path):
    """Two datasets double Ray Data's read/decode tasks; workers at 0.5 CPU leave it a CPU: no hang.
    Streamed (the demanding case for ingest; the cached path is the demo's and
    test_train_job.test_cached_and_streamed_data_train_identically's).
    Each worker's 12 rows of pairs last 4 steps at 0.7 of 4 rows: both ranks restart its epoch in step 5."""
    from pipelines.train.job import train

    data = [f"{folders['mmc4']}@0.3", f"{folders['pairs']}@0.7"]
    cfg = _cfg("max_steps=5", "checkpoint.every_steps=5", "data.cache_max_mib=0",
               "scaling.cpus_per_worker=0.5", data=data, workers=2)
    run = tmp_path / "two"
    assert train(cfg, None, run).steps == 5
    per_worker = mix_counts([0.3, 0.7], [0, 0], 5 * 4)
    assert (_rows(run, "mmc4"), _rows(run, "pairs")) == (2 * per_worker[0], 2 * per_worker[1])
    assert per_worker[1] > 12
