"""End-to-end tests of the training job: real Ray Train + Ray Data + DeepSpeed + DreamLLM on CPU.

Small on purpose (the debug model with 64-token rows, a few steps): they check the plumbing (restart
from a checkpoint, resume determinism, export), not learning. Learning is measured by bench/ and
the demo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TRAIN_MODEL_OVERRIDES, make_data_folder, small_model_config  # noqa: E402

from pipelines.train import load_train_config, train  # noqa: E402
from pipelines.train.loop import FAULT_MARKER  # noqa: E402
from pipelines.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("train-data"), small_model_config(), num_docs=48)


# Validation on (the last 8 rows held out, every 2 steps): the resume test then also shows that
# validating does not change the run.
COMMON = ["max_steps=6", "checkpoint.every_steps=3", "scaling.max_failures=0", "scaling.torch_threads=1",
          "validation.every_steps=2", "validation.rows=8"]


def _cfg(*overrides: str, workers: int = 1):
    base = ["micro_batch_size=4", "log_every=1", "optim.warmup_steps=2", "optim.lr=0.003",
            "data.shuffle_buffer=16", *[f"model.{s}" for s in TRAIN_MODEL_OVERRIDES]]
    return load_train_config("tiny", None, [*base, *overrides], workers=workers)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def straight_run(ray_session, data_dir, tmp_path_factory) -> Path:
    """6 steps without interruption, in local mode (workers=0: the loop runs in this process)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = train(_cfg(*COMMON, workers=0), data_dir, run)
    assert result.steps == 6
    return run


def test_local_mode_trains_and_exports(straight_run):
    from dreamcore.checkpoint import from_pretrained

    rows = read_metrics(straight_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # 6 steps at lr 3e-3 already move the loss
    validated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4, 6]
    assert validated[-1]["val_loss"] < validated[0]["val_loss"]  # held-out rows: the model generalises a bit
    assert all(r["val_lm_loss"] > 0 and r["val_vm_loss"] > 0 for r in validated)
    assert (straight_run / "deepspeed_config.json").exists() and (straight_run / "train_config.yaml").exists()
    assert (straight_run / "metrics.csv").exists()
    model, tokenizer = from_pretrained(straight_run / "model")
    assert model.cfg.max_seq_len == 64 and tokenizer.vocab_size == model.llm.config.vocab_size


def test_zero3_matches_zero2_and_restarts_from_its_own_checkpoint(ray_session, data_dir, straight_run, tmp_path):
    """Two workers, 10 steps from the same exported weights: ZeRO-2 straight, and ZeRO-3 (the LLM
    and CLIP loaded straight into partitions by transformers under zero.Init, the rest partitioned
    at initialize; every rank running the same modules each step) with rank 0 dying once after
    step 6, Ray Train restarting both from the ZeRO-3 checkpoint of step 5. Every step's losses
    agree within 1e-5 relative (the same math on other partitions; measured 1e-7), the replayed
    step 6 included; both exports hold the same model."""
    import torch

    from dreamcore.checkpoint import from_pretrained

    # From one export: under zero.Init transformers initialises a model from config its own way.
    common = ("max_steps=10", "checkpoint.every_steps=5", "checkpoint.keep=2", f"init_from={straight_run / 'model'}")
    train(_cfg(*common, "deepspeed.zero_stage=2", "scaling.max_failures=0", workers=2), data_dir, tmp_path / "z2")
    run = tmp_path / "z3"
    result = train(_cfg(*common, "deepspeed.zero_stage=3", "debug.fail_at_step=6", "scaling.max_failures=1",
                        workers=2), data_dir, run)
    assert (run / FAULT_MARKER).exists()  # the failure really happened
    assert result.steps == 10
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10]  # 6 ran twice: before and after
    reference = {r["step"]: r for r in read_metrics(tmp_path / "z2")}
    for r in lines:
        for key in ("loss", "lm_loss", "vm_loss"):
            assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5, abs=1e-7), (r["step"], key)
    assert len(_checkpoints(run)) == 2  # keep=2 of the checkpoints at steps 5 and 10
    (a, _), (b, _) = from_pretrained(tmp_path / "z2" / "model"), from_pretrained(run / "model")
    # Weights: the exports are whole (not ZeRO-3's empty partitions) and the same model. Elementwise
    # equality is not expected: Adam divides by sqrt(v), so a ~1e-7 difference in the gradient of a
    # weight whose gradients are near zero can move it by up to the lr (3e-3) per step. The losses
    # above are the tight check; here: every tensor whole, the median difference tiny, none large.
    diffs = []
    for (name, pa_), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert pa_.shape == pb.shape and pb.numel() > 0, name
        diffs.append((pa_.float() - pb.float()).abs().flatten())
    diffs = torch.cat(diffs)
    print(f"ZeRO-3 vs ZeRO-2 export: median |diff| {diffs.median().item():.2e}, "
          f"99th pct {diffs.quantile(0.99).item():.2e}, max {diffs.max().item():.2e}")
    assert diffs.median().item() <= 1e-5 and diffs.max().item() <= 1e-2


def test_zero3_builds_the_llm_and_clip_straight_into_partitions(data_dir, straight_run):
    """Under ZeRO-3 the trainer keeps transformers' HfDeepSpeedConfig alive while it builds the
    model: the LLM and the CLIP tower come out of from_config / from_pretrained already partitioned
    (zero.Init), so no rank holds them whole; the decoder is partitioned later, at initialize."""
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from dreamcore.tokenizer import DreamTokenizer
    from pipelines.train.deepspeed_config import deepspeed_config
    from pipelines.train.loop import _forget_deepspeed_groups, _init_process_group, build_model

    tok = DreamTokenizer.from_pretrained(data_dir / "tokenizer")
    from_config = _cfg("deepspeed.zero_stage=3", workers=0)
    from_export = _cfg("deepspeed.zero_stage=3", f"init_from={straight_run / 'model'}", workers=0)
    own_group = _init_process_group(gpu=False)
    hf_zero3: list = []  # transformers' ZeRO-3 mode lasts while this holds the config (a weak reference)
    try:
        deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
        hf_zero3.append(HfDeepSpeedConfig(deepspeed_config(from_config, 1)))
        for cfg in (from_config, from_export):
            model = build_model(cfg, tok)
            for part in (model.llm, model.vision):
                assert all(hasattr(p, "ds_shape") and p.numel() == 0 for p in part.parameters())
            assert not any(hasattr(p, "ds_shape") for p in model.decoder.parameters())
    finally:
        hf_zero3.clear()
        if own_group:
            torch.distributed.destroy_process_group()
        _forget_deepspeed_groups()


def test_resume_reproduces_the_uninterrupted_run(straight_run, data_dir, tmp_path):
    """N steps straight == N/2 steps, stop (the run dies), relaunch, resume to N: same losses."""
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Exception, match="injected failure"):
        train(_cfg(*COMMON, "debug.fail_at_step=3"), data_dir, resumed_dir)
    assert not (resumed_dir / "model").exists()
    assert [r["step"] for r in read_metrics(resumed_dir)] == [1, 2, 3]
    resumed = train(_cfg(*COMMON), data_dir, resumed_dir)  # same run folder: resumes at step 3
    assert resumed.steps == 6

    a, b = read_metrics(straight_run), read_metrics(resumed_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "vm_loss", "lr") + (("val_loss", "val_vm_loss") if "val_loss" in ra else ()):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def test_next_stage_starts_from_previous_export(straight_run, data_dir, tmp_path):
    """Stage I-creation from the export of a stage-II run: the LLM stays frozen, the queries train."""
    import torch

    from dreamcore.checkpoint import from_pretrained

    run = tmp_path / "stage1"
    cfg = _cfg("max_steps=2", "checkpoint.every_steps=2", f"init_from={straight_run / 'model'}",
               "model.stage=I-creation", "scaling.torch_threads=1", workers=0)
    train(cfg, data_dir, run)
    before, _ = from_pretrained(straight_run / "model")
    after, _ = from_pretrained(run / "model")
    for (name, p0), p1 in zip(before.llm.named_parameters(), after.llm.parameters()):
        assert torch.equal(p0, p1), f"llm.{name} changed although stage I-creation freezes the LLM"
    assert not torch.equal(before.dream_queries, after.dream_queries)
    assert after.cfg.stage == "I-creation"


def test_validation_split_is_the_last_rows_and_never_all_of_them(data_dir):
    from pipelines.train.data import held_out_split, parquet_files, read_held_out

    files = parquet_files(data_dir)
    total = held_out_split(files, 1, "d") + 1
    held = read_held_out(files, 8)
    assert held.num_rows == 8 and held_out_split(files, 8, "d") == total - 8
    import pyarrow.parquet as pq

    assert held.column("sample_id").to_pylist() == pq.read_table(files).column("sample_id").to_pylist()[-8:]
    with pytest.raises(ValueError, match=f"validation.rows={total} would hold out all {total} rows of d"):
        held_out_split(files, total, "d")


def test_workers_of_one_host_restore_one_remote_checkpoint_side_by_side(tmp_path):
    """Eight workers of a node read one object-store checkpoint at once: each gets the whole
    checkpoint in a folder of its own, removed after (Ray's shared download folder made the
    multi-node fault test fail once: one worker deleted it while another waited)."""
    import threading

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from pipelines.train.loop import STATE_FILE, checkpoint_dir, checkpoint_text

    # A filesystem that is not pyarrow's LocalFileSystem is what Ray treats as remote (S3, GCS).
    (tmp_path / "bucket" / "ckpt" / "ds").mkdir(parents=True)
    (tmp_path / "bucket" / "ckpt" / STATE_FILE).write_text('{"step": 5}')
    (tmp_path / "bucket" / "ckpt" / "ds" / "mp_rank_00.pt").write_bytes(b"x" * 100_000)
    checkpoint = Checkpoint("bucket/ckpt", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    seen, errors = [], []

    def restore() -> None:
        try:
            with checkpoint_dir(checkpoint) as d:
                seen.append((d, (d / STATE_FILE).read_text(), (d / "ds" / "mp_rank_00.pt").stat().st_size))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=restore) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({d for d, _, _ in seen}) == 8
    assert {(text, size) for _, text, size in seen} == {('{"step": 5}', 100_000)}
    assert not any(d.exists() for d, _, _ in seen)
    assert checkpoint_text(checkpoint, STATE_FILE) == '{"step": 5}'
    assert checkpoint_text(checkpoint, "absent.json") == ""


def test_a_checkpoint_without_trainer_state_is_one_clear_error(tmp_path):
    from ray.train import Checkpoint

    from pipelines.train.loop import STATE_FILE, TrainerState, trainer_state

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(RuntimeError, match=f"checkpoint .*ckpt has no {STATE_FILE}.*start a new run"):
        trainer_state(Checkpoint(str(tmp_path / "ckpt")))
    (tmp_path / "ckpt" / STATE_FILE).write_text('{"step": 7}')
    assert trainer_state(Checkpoint(str(tmp_path / "ckpt"))) == TrainerState(step=7)


def test_too_few_rows_per_worker_is_one_error_before_any_worker_starts(data_dir, tmp_path):
    """48 rows, 2 workers: 24 each, less than a micro-batch of 32. The driver says so at once,
    instead of every worker failing and Ray Train retrying the group."""
    from dreamcore.config import ConfigError

    with pytest.raises(ConfigError, match="48 training rows give each of 2 worker.s. 24, less than one micro-batch of 32"):
        train(_cfg("micro_batch_size=32", "scaling.max_failures=2", workers=2), data_dir, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_decoded_size_estimate_matches_the_decoded_data(data_dir):
    """The cache decision reads footers + a few rows; the estimate equals a full decode here."""
    import pyarrow.parquet as pq

    from dreamcore.batch import decode_batch
    from pipelines.train.data import decoded_size_mib, parquet_files

    files = parquet_files(data_dir)
    cfg = small_model_config()
    full = sum(a.nbytes for f in files for a in decode_batch(pq.read_table(f).to_pydict(), cfg).values())
    assert decoded_size_mib(files, cfg) == pytest.approx(full / 2**20, rel=1e-6)


def test_cached_and_streamed_data_train_identically(ray_session, data_dir, tmp_path):
    """48 rows / 4 per batch = 12 steps an epoch: 14 steps cross an epoch boundary. Keeping the
    decoded data in the object store must not change which rows a step sees, in either epoch."""
    runs = {}
    for name, cache in (("cached", 1024), ("streamed", 0)):
        cfg = _cfg("max_steps=14", "checkpoint.every_steps=14", f"data.cache_max_mib={cache}", workers=0)
        train(cfg, data_dir, tmp_path / name)
        runs[name] = read_metrics(tmp_path / name)
    a, b = runs["cached"], runs["streamed"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 15))
    assert a[-1]["epoch"] == 1  # the second epoch was reached
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7), ra["step"]


def test_the_jobs_deepspeed_step_is_the_benchs_adamw_step(data_dir):
    """bench/quality.py measures the recipe with plain torch AdamW and `group_lr`; the job trains
    it with DeepSpeed ZeRO-2 (`deepspeed_config`) and LambdaLR over `lr_lambdas`. On the same batches
    from the same weights, with the recipe's per-component lr multipliers and ramps, clipping and
    warmup, both give the same losses, so a figure of the bench stands for the job's."""
    import copy

    import deepspeed
    import pyarrow.parquet as pq
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from dreamcore.batch import decode_batch, to_torch, trim_padding
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer
    from pipelines.train.deepspeed_config import deepspeed_config
    from pipelines.train.loop import _init_process_group, optimizer_groups
    from pipelines.train.schedule import group_lr, lr_lambdas

    cfg = _cfg("optim.lr_mults={llm: 0.25}", "optim.lr_mult_ramps={llm: [0.75, 0.3, 0.6]}", "optim.grad_clip=1.0",
               "max_steps=8", workers=0)
    optim, steps = cfg.optim, cfg.max_steps
    rows = decode_batch(pq.read_table(sorted(data_dir.glob("*.parquet"))).to_pydict(), cfg.model)
    batches = [to_torch(trim_padding({k: v[4 * s:4 * s + 4] for k, v in rows.items()})) for s in range(steps)]
    torch.manual_seed(0)
    reference = DreamLLM(cfg.model, DreamTokenizer.from_pretrained(data_dir / "tokenizer")).train()
    job_model = copy.deepcopy(reference)

    opt = torch.optim.AdamW(optimizer_groups(reference, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
    bench = []
    for s, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = group_lr(group, s, optim, steps)
        torch.manual_seed(100 + s)  # the same diffusion noise and timesteps in both
        out = reference(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(reference.trainable_parameters(), optim.grad_clip)
        opt.step()
        bench.append(float(out["loss"]))

    own_group = _init_process_group(gpu=False)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=job_model, model_parameters=optimizer_groups(job_model, optim), config=deepspeed_config(cfg, 1),
            lr_scheduler=lambda o: LambdaLR(o, lr_lambdas(o.param_groups, optim, steps)), dist_init_required=False)
        job = []
        for s, batch in enumerate(batches):
            torch.manual_seed(100 + s)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            job.append(float(out["loss"]))
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    assert job == pytest.approx(bench, rel=1e-4), (job, bench)
    assert bench[-1] < bench[0]  # the steps train
