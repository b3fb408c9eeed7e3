"""The per-worker training loop that Ray Train runs on every rank (one per GPU, or CPU workers).

Steps per worker: 1. process group + device, 2. tokenizer and model (random init from config, or
the previous stage's export) with the stage's freezing, 3. DeepSpeed engine over the trainable
parameters only, 4. resume from `ray.train.get_checkpoint()` (model, optimizer, scheduler, step,
data position, RNG), 5. the step loop with progress/metrics/checkpoints, 6. export with
`dreamcore.checkpoint.save_pretrained` at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dreamcore.config import from_dict
from pipelines.train.config import TrainConfig
from pipelines.train.data import DataPosition, iterate_batches
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.metrics import MetricsWriter, mfu, peak_flops, progress_line, train_flops_per_token

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
    positions: dict[str, dict[str, int]] = field(default_factory=dict)  # rank -> DataPosition


# ----------------------------------------------------------------------------------------------
# 1. Process group and device


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
# 2. Model


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
        model.cfg.loss = cfg.model.loss
        model.cfg.decoder.condition_drop_prob = cfg.model.decoder.condition_drop_prob
    else:
        model = DreamLLM(cfg.model, tokenizer)
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


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints


def save_checkpoint(engine: Any, state: TrainerState, rank: int, metrics: dict[str, Any]) -> None:
    """Every rank writes DeepSpeed's files under one tag + its RNG, then reports to Ray Train."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"dreamcore-ckpt-r{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__))
        dist.barrier()
        # Ray Train merges the per-rank folders into one checkpoint directory in the run storage.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_state(rank: int) -> tuple[TrainerState | None, Any]:
    """The trainer state of Ray Train's latest checkpoint of this run (None, None: fresh start).

    Read before the engine exists, so the data stream can start at the right position while the
    model is being built; the checkpoint itself is returned for `restore_engine`.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        state = TrainerState(**json.loads((Path(d) / STATE_FILE).read_text()))
    return state, checkpoint


def restore_engine(engine: Any, checkpoint: Any, rank: int) -> None:
    """Model, optimizer and LR scheduler from DeepSpeed's files; this rank's RNG state."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        engine.load_checkpoint(str(d), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        rng_file = d / f"rng_rank{rank}.pt"
        if rng_file.exists():  # absent if the world size grew: those ranks start a fresh stream
            torch.set_rng_state(torch.load(rng_file)["torch"])


# ----------------------------------------------------------------------------------------------
# 5. The loop


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `config` = {"train": TrainConfig dict, "data_dir", "run_dir"}."""
    import deepspeed
    import ray.train

    from dreamcore.batch import to_torch, trim_padding
    from dreamcore.tokenizer import DreamTokenizer

    cfg = from_dict(TrainConfig, config["train"]).validate()
    run_dir, data_dir = Path(config["run_dir"]), Path(config["data_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # 1. Process group + device
    own_group = _init_process_group(cfg.scaling.gpu)
    device = _device(cfg.scaling.gpu)
    threads_before = torch.get_num_threads()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)

    # Start the data stream first: Ray Data's first batch (task start-up, PNG decode) arrives
    # while the model and the engine are being built instead of after.
    state, checkpoint = read_state(rank)
    state = state or TrainerState()
    position = DataPosition(**state.positions.get(str(rank), {}))
    batches = iterate_batches(
        ray.train.get_dataset_shard("train"), cfg.micro_batch_size, position, cfg.seed, rank,
        cfg.data.shuffle_buffer, cfg.data.prefetch_batches,
    )
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-batch")
    first_batch = prefetch.submit(next, batches)

    # 2. Tokenizer + model, stage freezing
    tokenizer = DreamTokenizer.from_pretrained(data_dir / "tokenizer")
    model = build_model(cfg, tokenizer)
    if cfg.precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    params = trainable_parameters(model)

    # 3. DeepSpeed engine over the trainable parameters only
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=deepspeed_config(cfg, world), dist_init_required=False
    )

    if rank == 0:
        n_all = sum(p.numel() for p in model.parameters())
        say(f"[train] {world} worker(s) x {torch.get_num_threads()} torch threads, {cfg.precision}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, stage {cfg.model.stage}: {sum(p.numel() for p in params):,} of "
            f"{n_all:,} parameters train; global batch {cfg.global_batch_size(world)}")

    # 4. Resume (the data position was applied above, before the stream started)
    if checkpoint is None and scheduler is not None:
        # DeepSpeed's WarmupCosineLR sits at iteration -1 (lr 0) until its first step; without
        # this the first optimizer step would be taken at lr 0 and wasted.
        scheduler.step()
    if checkpoint is not None:
        restore_engine(engine, checkpoint, rank)
        if rank == 0:
            say(f"[train] resumed at step {state.step} (epoch {position.epoch}, "
                f"batch {position.batches_done})")
    pending = [first_batch.result()]
    prefetch.shutdown()

    # 5. Steps
    writer = MetricsWriter(run_dir) if rank == 0 else None
    llm = cfg.model.llm
    n_llm = sum(p.numel() for p in model.llm.parameters()) if hasattr(model, "llm") else 0
    flops_tok = train_flops_per_token(n_llm, llm.num_layers, llm.hidden_size, cfg.model.max_seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device), cfg.deepspeed.peak_tflops) if cfg.scaling.gpu else None
    window = torch.zeros(6, dtype=torch.float64, device=device)  # loss, lm, vm, tokens, images, samples
    window_steps = 0
    t_window = time.perf_counter()
    t_attempt = time.perf_counter()
    elapsed_before = state.elapsed_s
    start_step = state.step
    stop = False
    while state.step < cfg.max_steps and not stop:
        for _ in range(cfg.grad_accum):
            batch = to_torch(trim_padding(pending.pop() if pending else next(batches)), device)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            # Summed on the device and read once per log interval: no GPU sync on every step.
            window += torch.stack([
                out["loss"].detach().float() / cfg.grad_accum,
                out["lm_loss"].detach().float() / cfg.grad_accum,
                out["vm_loss"].detach().float() / cfg.grad_accum,
                batch["attention_mask"].sum().float(),
                ((batch["image_slots"] >= 0) | (batch["dream_slots"] >= 0)).sum().float(),
                torch.tensor(float(batch["input_ids"].shape[0]), device=device),
            ])
        state.step += 1
        window_steps += 1
        state.elapsed_s = elapsed_before + time.perf_counter() - t_attempt
        state.positions = {str(rank): position.to_dict()}
        if cfg.max_minutes > 0:
            stop = _any_rank(state.elapsed_s >= 60 * cfg.max_minutes)
        last = state.step >= cfg.max_steps or stop

        metrics: dict[str, Any] = {}
        if state.step % cfg.log_every == 0 or last:
            dt = time.perf_counter() - t_window
            n = window_steps
            sums = window.tolist()
            loss, lm, vm, tokens, images, samples = _mean_over_ranks(
                [sums[0] / n, sums[1] / n, sums[2] / n, sums[3], sums[4], sums[5]]
            )
            tok_s = tokens * world / dt
            metrics = {
                "step": state.step, "epoch": position.epoch, "loss": loss, "lm_loss": lm, "vm_loss": vm,
                "lr": scheduler.get_last_lr()[0] if scheduler is not None else cfg.optim.lr,
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": tok_s, "images_per_s": images * world / dt,
                "samples_per_s": samples * world / dt, "step_time_s": dt / n,
                "mfu": mfu(tok_s, flops_tok, world, peak), "elapsed_s": state.elapsed_s,
            }
            if writer is not None:
                writer.write(metrics)
                done_here = state.step - start_step
                eta = (cfg.max_steps - state.step) * (time.perf_counter() - t_attempt) / max(1, done_here)
                say(progress_line(metrics, cfg.max_steps, eta))
            window.zero_()
            window_steps = 0

        if state.step % cfg.checkpoint.every_steps == 0 or last:
            # Ray Train only keeps metrics of checkpointed reports: gather positions of all ranks.
            gathered = [None] * world
            dist.all_gather_object(gathered, position.to_dict())
            state.positions = {str(r): p for r, p in enumerate(gathered)}
            save_checkpoint(engine, state, rank, metrics or {"step": state.step})
        elif metrics:
            ray.train.report(metrics)
        if metrics:
            t_window = time.perf_counter()  # throughput counts training, not checkpoint/report time

        if cfg.debug.fail_at_step and state.step == cfg.debug.fail_at_step and rank == 0:
            marker = run_dir / FAULT_MARKER
            if not marker.exists():
                marker.write_text(f"failure injected after step {state.step}\n")
                raise InjectedFailure(f"debug.fail_at_step={state.step}: injected failure (once)")

    if writer is not None:
        writer.close()

    # 6. Export for serving/generation
    export_model(engine, tokenizer, cfg, run_dir / "model", rank)
    if own_group:
        dist.destroy_process_group()
        torch.set_num_threads(threads_before)  # local mode ran in the caller's process
    return {"step": state.step, "export": str(run_dir / "model")}


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
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        say(f"[train] exported model to {out}")
