"""The per-worker training loop that Ray Train runs on every rank (one per GPU, or CPU workers).

`train_loop_per_worker` reads as its steps: 1. process group, device, threads and seed, 2. the
trainer state of Ray Train's latest checkpoint and this rank's data stream from that position,
3. tokenizer and model (random init from config, or the previous stage's export) with the stage's
freezing, in a DeepSpeed engine over the trainable parameters only, 4. resume model, optimizer,
scheduler and RNG from the checkpoint, 5. the step loop with progress/metrics/checkpoints,
6. export with `dreamcore.checkpoint.save_pretrained`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from dreamcore.config import from_dict
from pipelines.train.config import OptimConfig, TrainConfig
from pipelines.train.data import DataPosition, dataset_key, iterate_batches
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.metrics import (
    METRICS_FILES,
    MetricsWriter,
    mfu,
    peak_flops,
    progress_line,
    train_flops_per_token,
)
from pipelines.train.schedule import lr_lambdas

DS_TAG = "deepspeed"  # every rank saves under the same tag (DeepSpeed requires it)
STATE_FILE = "trainer_state.json"
FAULT_MARKER = ".fault_injected"


def say(line: str) -> None:
    """One line to the worker's stdout (Ray forwards it to the driver).

    Not `print`: Ray Train V2 patches print into its logger, which shows every line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class InjectedFailure(RuntimeError):
    """Raised once by `debug.fail_at_step` to drill Ray Train's restart from a checkpoint."""


@dataclass
class TrainerState:
    """What, besides DeepSpeed's own state, a checkpoint must hold to resume exactly."""

    step: int = 0
    elapsed_s: float = 0.0  # training time over all attempts (for max_minutes and the log)
    # rank -> DataPosition.to_dict(): folder name -> {epoch, rows_done, rows_total}
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Worker:
    """This rank's place in the run, fixed for the whole loop."""

    cfg: TrainConfig
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    own_group: bool  # the loop created the process group (local mode) and destroys it at the end
    threads_before: int  # torch threads of the caller's process, given back in local mode
    hf_deepspeed_config: Any = None  # ZeRO-3: transformers' HfDeepSpeedConfig, alive for the run


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `config` = {"train": TrainConfig dict (its data.mixture resolved), "run_dir"}."""
    cfg = from_dict(TrainConfig, config["train"]).validate()

    # 1. Process group, device, torch threads, seed
    w = _setup_worker(cfg, Path(config["run_dir"]))

    # 2. Where the run stands, and this rank's data stream from there. The stream starts before
    #    the model is built, so Ray Data's first batch (task start-up, PNG decode) loads meanwhile.
    state, checkpoint = read_state()
    position = DataPosition.from_dict(state.positions.get(str(w.rank), {}), cfg.data.names(), cfg.micro_batch_size)
    batches, first_batch = _start_batches(w, position)

    # 3. Tokenizer (the mixture's first folder's; all are checked to be equal), model with the
    #    stage's freezing, DeepSpeed engine over the trainable parameters
    tokenizer, engine, scheduler = _build_engine(w, Path(cfg.data.mixture[0].path))

    # 4. Model, optimizer, scheduler and RNG from the checkpoint (the data position was applied in 2);
    #    then wait for the first batch, so the step clocks count training only
    _resume(w, engine, checkpoint, state, position)
    batches = itertools.chain([first_batch.result()], batches)

    # 5. Optimizer steps with the progress line, metrics files, reports, validation and checkpoints
    held_out = _held_out(cfg, config.get("held_out"))
    _train_steps(w, engine, scheduler, batches, state, position, held_out)

    # 6. Export for serving/generation; local mode gives the caller's process back as it was
    export_model(engine, tokenizer, w.cfg, w.run_dir / "model", w.rank)
    _teardown_worker(w)
    return {"step": state.step, "export": str(w.run_dir / "model")}


# ----------------------------------------------------------------------------------------------
# 1. Process group, device, threads, seed


def _setup_worker(cfg: TrainConfig, run_dir: Path) -> Worker:
    """Join (or, in local mode, create) the process group; device, torch threads, the init seed."""
    import ray.train

    ctx = ray.train.get_context()
    _quiet_ray_train_reports()
    own_group = _init_process_group(cfg.scaling.gpu)
    device = _device(cfg.scaling.gpu)
    threads_before = torch.get_num_threads()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    return Worker(cfg, run_dir, ctx.get_world_rank(), ctx.get_world_size(), device, own_group, threads_before)


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ray.train.report at INFO with the whole metrics dict, one line a
    report and rank: noise beside the progress line, which says the same for people. Its logger is
    named by its file's path, so it is found by that module."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _teardown_worker(w: Worker) -> None:
    """Undo what `_setup_worker` changed in the process, when the loop ran in the caller's (local mode)."""
    w.hf_deepspeed_config = None  # transformers' ZeRO-3 mode ends with the run (it holds a weak reference)
    if w.own_group:
        dist.destroy_process_group()
        torch.set_num_threads(w.threads_before)


def _init_process_group(gpu: bool) -> bool:
    """Ray Train workers arrive with a process group; local mode (workers=0) gets a 1-rank one.

    Returns True when this function created the group (the loop then destroys it at the end, so
    a later local-mode run in the same process starts clean).
    """
    if dist.is_initialized():
        return False
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it; Ray Train sets it on workers
    _forget_deepspeed_groups()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        backend="nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    return True


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed cached in module globals during an earlier run.

    Ray Train's local mode destroys the process group when a run ends; a second local-mode run in
    the same process (tests, notebooks) would otherwise hand DeepSpeed's stale groups to the new one.
    """
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and name.endswith(("GROUP", "GROUPS", "RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def _device(gpu: bool) -> torch.device:
    if gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# 2. Trainer state and data stream


def read_state() -> tuple[TrainerState, Any]:
    """The trainer state of Ray Train's latest checkpoint of this run, and that checkpoint.

    A fresh start gives `TrainerState()` and None. Read before the engine exists, so the data
    stream can start at the right position while the model is being built.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainerState(), None
    return trainer_state(checkpoint), checkpoint


def trainer_state(checkpoint: Any) -> TrainerState:
    """The TrainerState a checkpoint holds; a checkpoint without one (not written by this trainer,
    or cut short) is one clear error naming it, not a JSON traceback."""
    text = checkpoint_text(checkpoint, STATE_FILE)
    if not text:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no {STATE_FILE}: it was not written (or not "
                           "finished) by `dreamcore train`; remove it from the run's storage or start a new run")
    return TrainerState(**json.loads(text))


def checkpoint_text(checkpoint: Any, name: str) -> str:
    """One small file of a Ray Train checkpoint, read where it lies ("" if absent): not the whole
    checkpoint, whose model and optimizer states `restore_engine` downloads once."""
    if checkpoint is None:
        return ""
    path = f"{checkpoint.path.rstrip('/')}/{name}"
    fs = checkpoint.filesystem
    if fs.get_file_info(path).type != pafs.FileType.File:
        return ""
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@contextlib.contextmanager
def checkpoint_dir(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder: the checkpoint itself when it is local, else a
    download of this process's own. Not `Checkpoint.as_directory`: its download folder is shared by
    every process of a host, and when one worker has read it and deleted it while another waited
    on its lock, the other fails ("Checkpoint directory ... does not exist"); several workers on
    one node restoring one checkpoint hit that."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    local = Path(tempfile.mkdtemp(prefix="dreamcore-checkpoint-"))
    try:
        checkpoint.to_directory(str(local))
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _start_batches(w: Worker, position: DataPosition) -> tuple[Iterator[tuple[dict[str, Any], list[int]]], Future]:
    """This rank's endless (micro-batch, rows per folder) from `position`, and the first, fetched in a thread."""
    import ray.train

    cfg = w.cfg
    shards = [ray.train.get_dataset_shard(dataset_key(i)) for i in range(len(cfg.data.mixture))]
    batches = iterate_batches(
        shards, cfg.data.names(), cfg.data.weights(), cfg.micro_batch_size, position, cfg.seed, w.rank,
        cfg.data.shuffle_buffer, cfg.data.prefetch_batches,
    )
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-batch")
    first_batch = prefetch.submit(next, batches)
    prefetch.shutdown(wait=False)  # its one thread ends once the first batch is in
    return batches, first_batch


# ----------------------------------------------------------------------------------------------
# 3. Model and engine


def _build_engine(w: Worker, data_dir: Path) -> tuple[Any, Any, Any]:
    """(tokenizer, DeepSpeed engine, LR scheduler): the data's tokenizer, the stage's model."""
    import deepspeed

    from dreamcore.tokenizer import DreamTokenizer

    cfg = w.cfg
    tokenizer = DreamTokenizer.from_pretrained(data_dir / "tokenizer")
    ds_config = deepspeed_config(cfg, w.world)
    if cfg.deepspeed.zero_stage == 3:
        # While this object lives, transformers builds and loads the LLM and the CLIP tower straight
        # into ZeRO-3 partitions (deepspeed.zero.Init; from_config and from_pretrained alike), so no
        # rank holds the whole LLM; DeepSpeed partitions the rest (projectors, UNet, VAE) at
        # initialize. Kept for the run, as HF's Trainer keeps its own. zero.Init reads the world
        # from deepspeed.comm: point it at this process group first.
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        w.hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    # From an export, the run's random streams start where the seed put them, however the parts
    # were loaded (under ZeRO-3, zero.Init draws while it initialises the partitions it then loads).
    before = rng_states() if cfg.init_from else None
    model = build_model(cfg, tokenizer)
    if before is not None:
        set_rng_states(before)
    model.same_modules_on_every_rank = cfg.deepspeed.zero_stage == 3
    if cfg.precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    params = trainable_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, cfg.optim), config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambdas(opt.param_groups, cfg.optim, cfg.max_steps)),
        dist_init_required=False,
    )
    if w.rank == 0:
        n_train, n_all = sum(map(_numel, params)), sum(map(_numel, model.parameters()))
        say(f"[train] {w.world} worker(s) x {torch.get_num_threads()} torch threads, {cfg.precision}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, stage {cfg.model.stage}: {n_train:,} of "
            f"{n_all:,} parameters train; global batch {cfg.global_batch_size(w.world)}")
    return tokenizer, engine, scheduler


def _numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size; ZeRO-3 leaves an empty tensor in each partitioned one."""
    return getattr(p, "ds_numel", p.numel())


def build_model(cfg: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    """Random init from config, or the previous stage's exported model; then the stage's freezing."""
    from dreamcore.model import DreamLLM, apply_stage

    if cfg.init_from:
        from dreamcore.checkpoint import from_pretrained

        model, previous_tokenizer = from_pretrained(cfg.init_from)
        if previous_tokenizer.content_hash() != tokenizer.content_hash():
            raise ValueError(
                f"init_from={cfg.init_from}: its tokenizer differs from the one the data was tokenized with; "
                "curate this stage's data with the previous stage's tokenizer (tokenizer.name_or_path)"
            )
        # The new stage's loss weights and freezing apply; the architecture comes from the export.
        model.cfg.stage = cfg.model.stage
        model.cfg.chat_template = cfg.model.chat_template  # what SFT data was laid out with; serving reads it
        model.cfg.loss = cfg.model.loss
        model.cfg.decoder.condition_drop_prob = cfg.model.decoder.condition_drop_prob
    else:
        # Pretrained parts load in the run's precision: a bf16 run never materialises them in fp32.
        model = DreamLLM(cfg.model, tokenizer, load_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    apply_stage(model, cfg.model.stage)
    return model.train()


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast every fully frozen direct submodule (CLIP, SD UNet/VAE) to `dtype`; returns their names.

    Frozen weights need no fp32 master copy: in bf16 they take half the memory, and since they are
    kept out of the optimizer, nothing else ever reads them in fp32.
    """
    cast = []
    for name, module in model.named_children():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.to(dtype)
            cast.append(name)
    return cast


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters the optimizer sees: frozen modules never get optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {model.cfg.stage!r} leaves no trainable parameter; check apply_stage")
    return params


def optimizer_groups(model: Any, optim: OptimConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: the lr-multiplied components (`optim.lr_mults`)
    each in their own group at lr x mult, everything else first at lr (the logged lr is group 0's).

    The schedule (pipelines/train/schedule.py) gives each group its lr per step from its component
    `name`, which the group keeps (with its initial `lr_mult`) for readers.
    """
    params = trainable_parameters(model)
    named = model.named_groups()
    owner = {id(p): name for name, ps in named.items() for p in ps}
    base: list[torch.nn.Parameter] = []
    by_name: dict[str, list[torch.nn.Parameter]] = {}
    for p in params:
        name = owner.get(id(p), "")
        (by_name.setdefault(name, []) if name in optim.lr_mults else base).append(p)
    groups = [{"params": base, "lr": optim.lr, "lr_mult": 1.0, "name": "base"}] if base else []
    groups += [{"params": by_name[name], "lr": optim.lr * mult, "lr_mult": mult, "name": name}
               for name, mult in optim.lr_mults.items() if name in by_name]
    return groups


# ----------------------------------------------------------------------------------------------
# 4. Resume


def _resume(w: Worker, engine: Any, checkpoint: Any, state: TrainerState, position: DataPosition) -> None:
    """Restore the engine (and the LR scheduler's step) from `checkpoint`, if there is one."""
    if checkpoint is None:
        return
    restore_engine(engine, checkpoint, w.rank)
    if w.rank == 0:
        say(f"[train] resumed at step {state.step} ({position.describe()})")


def rng_states() -> dict[str, Any]:
    """Every random stream a step may draw from: torch CPU, CUDA (when present), numpy, Python."""
    import random

    import numpy as np

    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved (older checkpoints hold the torch CPU state only)."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def restore_engine(engine: Any, checkpoint: Any, rank: int) -> None:
    """Model, optimizer and LR scheduler from DeepSpeed's files; this rank's RNG state."""
    with checkpoint_dir(checkpoint) as d:
        engine.load_checkpoint(str(d), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        rng_file = d / f"rng_rank{rank}.pt"
        if rng_file.exists():  # absent if the world size grew: those ranks start a fresh stream
            set_rng_states(torch.load(rng_file, weights_only=False))


# ----------------------------------------------------------------------------------------------
# 5. Steps


def _train_steps(w: Worker, engine: Any, scheduler: Any, batches: Iterator[tuple[dict[str, Any], list[int]]],
                 state: TrainerState, position: DataPosition, held_out: dict[str, Any] | None = None) -> None:
    """Optimizer steps up to max_steps (or max_minutes): log, validate, report, checkpoint; advances `state`."""
    import ray.train

    from dreamcore.batch import to_torch, trim_padding

    cfg = w.cfg
    log = _StepLog(w, engine, scheduler, state)
    stop = False
    while state.step < cfg.max_steps and not stop:
        for _ in range(cfg.grad_accum):
            rows, counts = next(batches)
            batch = to_torch(trim_padding(rows), w.device)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            log.add(out, batch, counts)
        state.step += 1
        log.steps += 1
        state.elapsed_s = log.elapsed_s()
        state.positions = {str(w.rank): position.to_dict()}
        if cfg.max_minutes > 0:
            stop = _any_rank(state.elapsed_s >= 60 * cfg.max_minutes)
        last = state.step >= cfg.max_steps or stop

        validation = {}
        if held_out is not None and (state.step % cfg.validation.every_steps == 0 or last):
            validation = validation_losses(w, engine, held_out)
        logging = state.step % cfg.log_every == 0 or last or bool(validation)
        metrics = log.write(state, position, validation) if logging else {}
        if state.step % cfg.checkpoint.every_steps == 0 or last:
            # Ray Train only keeps metrics of checkpointed reports: gather positions of all ranks.
            state.positions = _all_positions(position, w.world)
            save_checkpoint(engine, state, w.rank, metrics or {"step": state.step}, w.run_dir)
        elif metrics:
            ray.train.report(metrics)
        if metrics:
            log.restart_clock()  # throughput counts training, not checkpoint/report time
        _inject_failure(w, state.step)
    log.close()


def _held_out(cfg: TrainConfig, ref: Any) -> dict[str, Any] | None:
    """The validation rows (an object-store ref of a SAMPLE_SCHEMA table, see job.train), decoded."""
    if ref is None:
        return None
    import ray

    from dreamcore.batch import decode_batch

    return decode_batch(ray.get(ref).to_pydict(), cfg.model)


def validation_losses(w: Worker, engine: Any, held_out: dict[str, Any]) -> dict[str, float]:
    """Losses on the held-out rows, in eval mode, without gradients. Every rank computes them on
    all rows (ZeRO-3 needs every rank in each forward; the rows are few). The noise and timesteps
    of the diffusion loss come from a fixed seed, so evaluations at different steps compare; the
    training random streams are restored after, so validating does not change the run."""
    from dreamcore.batch import to_torch, trim_padding

    saved = rng_states()
    torch.manual_seed(w.cfg.seed + 1_000_003)
    n = len(held_out["input_ids"])
    mb = w.cfg.micro_batch_size
    sums = torch.zeros(3, dtype=torch.float64)
    engine.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, mb):
                rows = {k: v[start:start + mb] for k, v in held_out.items()}
                out = engine(to_torch(trim_padding(rows), w.device))
                k = len(rows["input_ids"])
                sums += torch.tensor([out[key].float().item() * k for key in ("loss", "lm_loss", "vm_loss")],
                                     dtype=torch.float64)
    finally:
        engine.train()
        set_rng_states(saved)
    loss, lm, vm = (sums / n).tolist()
    return {"val_loss": loss, "val_lm_loss": lm, "val_vm_loss": vm}


class _StepLog:
    """Losses and counts since the last log row, the clocks, and rank 0's metrics files.

    Sums stay on the device and are read once per log interval: no GPU sync on every step.
    """

    def __init__(self, w: Worker, engine: Any, scheduler: Any, state: TrainerState):
        cfg = w.cfg
        self.w, self.engine, self.scheduler = w, engine, scheduler
        self.writer = MetricsWriter(w.run_dir) if w.rank == 0 else None
        llm = cfg.model.llm
        n_llm = sum(p.numel() for p in engine.module.llm.parameters())
        self.flops_tok = train_flops_per_token(n_llm, llm.num_layers, llm.hidden_size, cfg.model.max_seq_len)
        self.peak = (peak_flops(torch.cuda.get_device_name(w.device), cfg.deepspeed.peak_tflops)
                     if cfg.scaling.gpu else None)
        # loss, lm_loss, vm_loss, tokens, images, samples, then the rows of each mixture folder
        self.names = cfg.data.names()
        self.sums = torch.zeros(6 + len(self.names), dtype=torch.float64, device=w.device)
        self.steps = 0  # optimizer steps in the sums
        self.t_window = time.perf_counter()
        self.t_attempt = time.perf_counter()
        self.elapsed_before = state.elapsed_s
        self.start_step = state.step

    def add(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], counts: list[int]) -> None:
        """One micro-batch: its losses (as a share of the optimizer step), counts and rows per folder."""
        accum = self.w.cfg.grad_accum
        on_device = torch.stack([
            out["loss"].detach().float() / accum,
            out["lm_loss"].detach().float() / accum,
            out["vm_loss"].detach().float() / accum,
            batch["attention_mask"].sum().float(),
            ((batch["image_slots"] >= 0) | (batch["dream_slots"] >= 0)).sum().float(),
        ]).double()
        rows = torch.tensor([float(batch["input_ids"].shape[0]), *map(float, counts)], dtype=torch.float64)
        self.sums += torch.cat([on_device, rows.to(self.w.device, non_blocking=True)])

    def elapsed_s(self) -> float:
        """Training time over all attempts of this run."""
        return self.elapsed_before + time.perf_counter() - self.t_attempt

    def write(self, state: TrainerState, position: DataPosition, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metrics row of the steps since the last one (all ranks take part); rank 0 writes it
        to the metrics files and prints the progress line. The sums start again from zero.

        `epoch` is the first folder's; `rows_<name>` (rows taken from each folder since the last row,
        all ranks) and `epoch_<name>` show the realised mixture."""
        cfg, world = self.w.cfg, self.w.world
        dt = time.perf_counter() - self.t_window
        n = self.steps
        sums = self.sums.tolist()
        loss, lm, vm, tokens, images, samples, *rows = _mean_over_ranks(
            [sums[0] / n, sums[1] / n, sums[2] / n, *sums[3:]]
        )
        epochs = [position.streams[name].epoch for name in self.names]
        tok_s = tokens * world / dt
        metrics = {
            "step": state.step, "epoch": epochs[0], "loss": loss, "lm_loss": lm, "vm_loss": vm,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tok_s, "images_per_s": images * world / dt,
            "samples_per_s": samples * world / dt, "step_time_s": dt / n,
            "mfu": mfu(tok_s, self.flops_tok, world, self.peak), "elapsed_s": state.elapsed_s,
            "resumed_from": self.start_step,  # the step this attempt began at: 0, or its checkpoint's
        }
        for name, r, e in zip(self.names, rows, epochs):
            metrics[f"rows_{name}"] = round(r * world)
            metrics[f"epoch_{name}"] = e
        metrics.update(extra or {})
        if self.writer is not None:
            self.writer.write(metrics)
            done_here = state.step - self.start_step
            eta = (cfg.max_steps - state.step) * (time.perf_counter() - self.t_attempt) / max(1, done_here)
            say(progress_line(metrics, cfg.max_steps, eta))
        self.sums.zero_()
        self.steps = 0
        return metrics

    def restart_clock(self) -> None:
        self.t_window = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_checkpoint(engine: Any, state: TrainerState, rank: int, metrics: dict[str, Any],
                    run_dir: Path | None = None) -> None:
    """Every rank writes DeepSpeed's files under one tag + its RNG, then reports to Ray Train.

    Rank 0 adds the trainer state and the run's metrics files so far (from `run_dir`): the
    history up to this step then survives with the checkpoint (see job._fetch_metrics)."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"dreamcore-ckpt-r{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__))
            for name in METRICS_FILES if run_dir is not None else ():
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, tmp / name)
        dist.barrier()
        # Ray Train merges the per-rank folders into one checkpoint directory in the run storage.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _all_positions(position: DataPosition, world: int) -> dict[str, dict[str, Any]]:
    """Every rank's data position (a collective), keyed by rank as TrainerState.positions is."""
    gathered = [None] * world
    dist.all_gather_object(gathered, position.to_dict())
    return {str(r): p for r, p in enumerate(gathered)}


def _inject_failure(w: Worker, step: int) -> None:
    """debug.fail_at_step: rank 0 raises once after that step; the marker file keeps it to once."""
    if w.cfg.debug.fail_at_step and step == w.cfg.debug.fail_at_step and w.rank == 0:
        marker = w.run_dir / FAULT_MARKER
        if not marker.exists():
            marker.write_text(f"failure injected after step {step}\n")
            raise InjectedFailure(f"debug.fail_at_step={step}: injected failure (once)")


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo reduces CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], device=_collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------
# 6. Export


def export_model(engine: Any, tokenizer: Any, cfg: TrainConfig, out: Path, rank: int) -> None:
    """Rank 0 writes the model with save_pretrained; under ZeRO-3 all ranks gather the weights first."""
    from dreamcore.checkpoint import save_pretrained

    module = engine.module
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                save_pretrained(module, tokenizer, out)
    elif rank == 0:
        save_pretrained(module, tokenizer, out)
    dist.barrier()
    if rank == 0:
        say(f"[train] exported model to {out}")
