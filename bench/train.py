"""Training throughput: Ray Train + DeepSpeed against a bare PyTorch loop, and 2 workers against 1.

Baselines, measured in the same run on the same synthetic shapes data and the same model/batch:
  bare    single-process PyTorch loop: DreamLLM + torch AdamW, batches decoded in memory up front
  ray-1   `pipelines.train.train` with 1 Ray Train worker (DeepSpeed ZeRO-2, Ray Data ingest)
  ray-2   the same with 2 workers (data parallel; the global batch doubles)
  ray-1t2 1 worker with 2 torch threads and the doubled micro-batch: ray-2's global batch on the
          same 2 cores, the other way of using them (the demo's choice: pipelines.recipe.shapes_tiny(workers))
Printed: samples/s of each and the ratios ray-1/bare (goal >= 0.9), ray-2/ray-1 (scaling) and
ray-2/ray-1t2 (2 workers x 1 thread against 1 worker x 2 threads at one global batch).
Both sides use the same number of torch threads (what Ray gives a 1-CPU worker), so the ratio
measures the framework's overhead, not a thread-count difference. The first `--warmup` steps of
each are left out. On a GPU machine the 1B-parameter bf16 ZeRO-2 MFU run would be added; this
script says so when no GPU is present.

  python bench/train.py [--steps 40] [--warmup 10] [--micro-batch 8]
  python bench/train.py --recipe-step [--threads 2]   # the embedded recipe's step: profile + layout speed-up
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dreamcore.config import ModelConfig, preset, to_dict  # noqa: E402
from dreamcore.schema import SAMPLE_SCHEMA  # noqa: E402


def build_data(root: Path, cfg: ModelConfig, num_docs: int) -> Path:
    """Interleaved shapes documents (text, image, text) as SAMPLE_SCHEMA Parquet + tokenizer."""
    import json

    from dreamcore import synthetic
    from dreamcore.tokenizer import DreamTokenizer

    rng = random.Random(0)
    specs = [synthetic.ShapeSpec(*rng.choice(synthetic.TRAIN_COMBOS), variant=rng.randrange(synthetic.NUM_VARIANTS))
             for _ in range(num_docs)]
    texts = [(synthetic.describe(s, rng), synthetic.caption(s, rng)) for s in specs]
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               [t for pair in texts for t in pair])
    tok.save_pretrained(root / "tokenizer")
    encoded = [tok.encode_document([a, 0, b], max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
               for a, b in texts]
    rows = tok.pack(encoded, cfg.max_seq_len, cfg.images_per_sample, doc_ids=[str(i) for i in range(num_docs)])
    records = [row.to_sample(f"s{i}", [synthetic.render_png(specs[d].name, cfg.image_resolution) for d, _ in row.images])
               for i, row in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA), root / "samples-00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"rows": len(records), "model": to_dict(cfg)}))
    return root


def bare_loop(cfg: ModelConfig, data_dir: Path, micro_batch: int, steps: int, warmup: int, lr: float) -> float:
    """samples/s of a plain PyTorch loop over pre-decoded batches (no Ray, no DeepSpeed)."""
    from dreamcore.batch import decode_batch, to_torch
    from dreamcore.model import DreamLLM
    from dreamcore.tokenizer import DreamTokenizer

    torch.manual_seed(0)
    model = DreamLLM(cfg, DreamTokenizer.from_pretrained(data_dir / "tokenizer")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    columns = pq.read_table(data_dir / "samples-00000.parquet").to_pydict()
    n = len(columns["input_ids"]) // micro_batch
    batches = [to_torch(decode_batch({k: v[i * micro_batch:(i + 1) * micro_batch] for k, v in columns.items()}, cfg))
               for i in range(n)]
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        out = model(batches[step % n])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return (steps - warmup) * micro_batch / (time.perf_counter() - t0)


def ray_run(data_dir: Path, run_dir: Path, overrides: list[str], workers: int, steps: int, warmup: int,
            cpus: float) -> float:
    """samples/s from the job's own metrics (windows after warmup; checkpoint time excluded)."""
    from pipelines.train import load_train_config, train
    from pipelines.train.metrics import read_metrics

    cfg = load_train_config("tiny", None, [*overrides, f"max_steps={steps}", f"log_every={warmup}",
                                           f"checkpoint.every_steps={steps}", f"scaling.cpus_per_worker={cpus}",
                                           "scaling.max_failures=0"], workers=workers)
    train(cfg, data_dir, run_dir)
    rows = [r for r in read_metrics(run_dir) if r["step"] > warmup]
    return statistics.mean(r["samples_per_s"] for r in rows)


def recipe_step(steps: int, warmup: int, threads: int) -> None:
    """The embedded recipe's training step: where its time goes, and what its layout saves.

    Same run, same model, same data, in-process (no Ray): the recipe's batches (stories and pairs
    both packed with document masking, the diffusion loss on 32 dream images a step) against the
    plain way to mix them (pairs one sequence a row, as the pair-only recipe had them, padded to
    the stories' 256 tokens in a mixed batch; the diffusion loss on every dream image).
    Printed: seconds per step, images/s (dream images the step sees), the speed-up, and the
    forward time of each component of the recipe's step (LLM, vision encoder, UNet).
    """
    import dataclasses as dc

    sys.path.insert(0, str(Path(__file__).parent))
    from quality import build_rows

    from dreamcore.batch import to_torch, trim_padding
    from dreamcore.model import DreamLLM
    from dreamcore.synthetic import make_corpus
    from dreamcore.tokenizer import DreamTokenizer
    from pipelines.recipe import shapes_tiny
    from pipelines.train.data import mix_counts

    torch.set_num_threads(threads)
    recipe = shapes_tiny(workers=1)
    cfg = recipe.train.model
    rows_per_step = recipe.train.micro_batch_size
    corpora = [make_corpus(min(d.corpus.num_docs, 400), d.corpus.seed, "http://127.0.0.1:1",
                           d.corpus.single_image_fraction, d.corpus.story_fraction) for d in recipe.datasets]
    tok = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                               corpus_texts=[t for d in corpora[0] for t in d["text_list"]])
    def batches(layouts: list[tuple[str, str]], weights: list[float], rows: int) -> list[dict]:
        parts = [build_rows(cfg, docs, tok, packing, pair_layout)
                 for docs, (packing, pair_layout) in zip(corpora, layouts)]
        taken, cursors, out = [0] * len(parts), [0] * len(parts), []
        for _ in range(steps):
            pieces = []
            for i, n in enumerate(mix_counts(weights, taken, rows)):
                taken[i] += n
                idx = [(cursors[i] + j) % len(parts[i]["input_ids"]) for j in range(n)]
                cursors[i] += n
                pieces.append({k: v[idx] for k, v in parts[i].items()})
            out.append(to_torch(trim_padding({k: np.concatenate([q[k] for q in pieces]) for k in pieces[0]})))
        return out

    def timed(model_cfg, data: list[dict]) -> tuple[float, float]:
        torch.manual_seed(0)
        model = DreamLLM(model_cfg, tok).train()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        t0, images = None, 0
        for step, batch in enumerate(data):
            if step == warmup:
                t0, images = time.perf_counter(), 0
            images += int((batch["dream_slots"] >= 0).sum())
            out = model(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        dt = (time.perf_counter() - t0) / (steps - warmup)
        return dt, images / (steps - warmup) / dt

    layouts = [(d.curate.tokenize.packing, d.curate.tokenize.pair_layout) for d in recipe.datasets]
    weights = [d.weight for d in recipe.datasets]
    # The naive mixture's pair rows hold one sequence each: as many of them as the recipe's packed
    # pair rows hold sequences (about 9), so both steps see about the same documents.
    pair_seqs = 9
    naive_layouts = [("truncate", pl) if pl == "pairs" else (pk, pl) for pk, pl in layouts]
    naive_counts = [rows_per_step * w * (pair_seqs if pl == "pairs" else 1) for w, (_, pl) in zip(weights, layouts)]
    naive_rows = round(sum(naive_counts))
    naive_cfg = dc.replace(cfg, loss=dc.replace(cfg.loss, vm_max_images=0))
    naive = timed(naive_cfg, batches(naive_layouts, [c / sum(naive_counts) for c in naive_counts], naive_rows))
    ours = timed(cfg, batches(layouts, weights, rows_per_step))
    print(f"recipe step ({threads} thread(s), {steps} steps, first {warmup} left out):")
    print(f"  naive stage II (pairs unpacked, {naive_rows} rows; all dream images): {naive[0]:.3f} s/step")
    print(f"  recipe (packed, {rows_per_step} rows; diffusion loss on {cfg.loss.vm_max_images} images)  "
          f": {ours[0]:.3f} s/step   speed-up {naive[0] / ours[0]:.2f}x")

    # Where the recipe's forward goes, by component (forward hooks; backward costs about 2x each).
    model = DreamLLM(cfg, tok).train()
    spent: dict[str, float] = {}
    for name, module in (("LLM", model.llm.model), ("vision encoder", model.vision), ("UNet", model.decoder.unet)):
        module.register_forward_pre_hook(lambda m, a, n=name: spent.__setitem__(n + "@", time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, n=name: spent.__setitem__(
            n, spent.get(n, 0.0) + time.perf_counter() - spent[n + "@"]))
    data = batches(layouts, weights, rows_per_step)[:10]
    with torch.no_grad():
        model(data[0])
        spent.clear()
        t0 = time.perf_counter()
        for batch in data[1:]:
            model(batch)
        total = time.perf_counter() - t0
    shares = ", ".join(f"{n} {spent.get(n, 0.0) / total:.0%}" for n in ("LLM", "vision encoder", "UNet"))
    print(f"  recipe forward {total / (len(data) - 1):.3f} s: {shares} (the rest: losses, projections, layout)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--recipe-step", action="store_true",
                        help="profile the embedded recipe's step in-process and compare its layout (no Ray)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --recipe-step")
    args = parser.parse_args()
    if args.recipe_step:
        recipe_step(args.steps, args.warmup, args.threads)
        return 0
    import ray

    cfg = preset("tiny")
    overrides = [f"micro_batch_size={args.micro_batch}", f"optim.lr={args.lr}", "data.shuffle_buffer=0"]
    torch.set_num_threads(1)  # what Ray gives a worker with 1 (or 0.5) CPU: OMP_NUM_THREADS=1
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        # Enough rows that the measured steps stay inside one epoch: an epoch boundary restarts Ray
        # Data's streaming execution, a cost the in-memory baseline does not have.
        data = build_data(tmp / "data", cfg, num_docs=max(256, 4 * args.steps * args.micro_batch))
        bare = bare_loop(cfg, data, args.micro_batch, args.steps, args.warmup, args.lr)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})
        one = ray_run(data, tmp / "run1", overrides, 1, args.steps, args.warmup, cpus=1.0)
        two = ray_run(data, tmp / "run2", overrides, 2, args.steps, args.warmup, cpus=0.5)
        threaded = ray_run(data, tmp / "run1t2", [*overrides, f"micro_batch_size={2 * args.micro_batch}",
                                                  "scaling.torch_threads=2"], 1, args.steps, args.warmup, cpus=1.0)
        ray.shutdown()
    print(f"model: tiny preset; micro-batch {args.micro_batch}; {args.steps} steps, first {args.warmup} left out")
    print(f"bare PyTorch loop (1 process, 1 thread) : {bare:8.2f} samples/s")
    print(f"Ray Train + DeepSpeed, 1 worker         : {one:8.2f} samples/s   ratio vs bare {one / bare:.2f} (goal >= 0.9)")
    print(f"Ray Train + DeepSpeed, 2 workers        : {two:8.2f} samples/s   ratio vs 1 worker {two / one:.2f}")
    print(f"1 worker x 2 threads, micro-batch {2 * args.micro_batch:<4d}: {threaded:8.2f} samples/s   "
          f"2 workers x 1 thread vs this (same global batch): {two / threaded:.2f}")
    if torch.cuda.is_available():
        print("GPU present: run the 1B bf16 ZeRO-2 MFU benchmark with `dreamcore train --gpu` (not automated here)")
    else:
        print(f"no GPU on this machine ({os.cpu_count()} CPU cores): the 1B-parameter bf16 ZeRO-2 tokens/s and "
              "MFU measurement was not run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
