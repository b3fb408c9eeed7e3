"""Model-core cost: one DreamLLM training step against the bare LLM's step on the same tokens.

Baseline, measured in the same run: `bare-llm` = the tiny preset's LlamaForCausalLM alone (same
config, same batch of token ids and labels, next-token CE), forward + backward + AdamW step.
`dreamllm` = the full tiny DreamLLM step on the same rows: CLIP tower + projectors on every image,
dream queries, LLM, diffusion loss of the pixel-space UNet on every image, AdamW over all trainable
parameters (stage II; the tiny preset trains CLIP and UNet too).

The batch is batch 8 x seq 256 of packed interleaved documents (text, image, text), so each row
holds several images, as curated rows do. Each variant runs in a fresh process so peak memory is
its own: on CPU the peak RSS growth over the process's RSS before the first step
(resource.ru_maxrss), on GPU torch.cuda.max_memory_allocated. Printed: median step time of each
(wall, and CPU seconds, which other processes on a shared box do not inflate), the time ratios
and the memory ratio dreamllm / bare-llm. Goal: the tiny DreamLLM step well under
a second on a 2-core CPU.

  python bench/model.py [--steps 12] [--warmup 3] [--batch 8] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOC_TEXTS = [
    ("here is a small red circle on a white page", "the circle is red and round"),
    ("a blue square sits in the middle", "its sides are straight and blue"),
    ("look at this green triangle", "three corners, all green"),
    ("a yellow star shines", "it has five yellow points"),
]


def rows_to_batch(rows, cfg, seed: int = 0) -> dict:
    """Packed rows with random PNG images -> the model's batch, through curation's record format
    and `dreamcore.batch.decode_batch` (bench/packing.py uses it too)."""
    import io

    import numpy as np
    from PIL import Image

    from dreamcore.batch import decode_batch, to_torch

    rng = np.random.default_rng(seed)
    records = []
    for i, row in enumerate(rows):
        pngs = []
        for _ in row.images:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (cfg.image_resolution,) * 2 + (3,), dtype=np.uint8)).save(buf, "PNG")
            pngs.append(buf.getvalue())
        records.append(row.to_sample(f"s{i}", pngs))
    columns = {k: [r[k] for r in records] for k in records[0]}
    return to_torch(decode_batch(columns, cfg))


def make_batch(cfg, tok, batch: int):
    """Rows of packed (text, image, text) documents, through the real tokenizer/batch path."""
    docs = [tok.encode_document([a, 0, b], max_len=cfg.max_seq_len, max_images=cfg.images_per_sample)
            for a, b in DOC_TEXTS] * (batch * 8)
    return rows_to_batch(tok.pack(docs, cfg.max_seq_len, cfg.images_per_sample)[:batch], cfg)


def run_variant(variant: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    from dreamcore.config import preset
    from dreamcore.model import DreamLLM, llm_from_config
    from dreamcore.tokenizer import DreamTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("tiny")
    tok = DreamTokenizer(DreamTokenizer.train([t for pair in DOC_TEXTS for t in pair] * 20, cfg.tokenizer.vocab_size),
                         cfg.vision.num_tokens, cfg.dream.num_queries)
    batch = {k: v.to(args.device) for k, v in make_batch(cfg, tok, args.batch).items()}
    if variant == "dreamllm":
        model = DreamLLM(cfg, tok).to(args.device).train()
        params = model.trainable_parameters()

        def loss_fn():
            return model(batch)["loss"]
    else:
        model = llm_from_config(cfg.llm, tok).to(args.device).train()
        params = list(model.parameters())

        def loss_fn():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = args.device.startswith("cuda")

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB -> bytes (Linux)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    measured = [step() for _ in range(args.warmup + args.steps)][args.warmup:]
    times = [wall for wall, _ in measured]
    cpu_times = [cpu for _, cpu in measured]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - mem_before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    queue.put({
        "variant": variant,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "median_cpu_s": statistics.median(cpu_times),  # CPU seconds: robust to other processes' load
        "peak_bytes": max(peak, 0),
        "images": int((batch["dream_slots"] >= 0).sum()),
        "tokens": int(batch["attention_mask"].sum()),
        "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for variant in ("bare-llm", "dreamllm"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(variant, args, queue))
        proc.start()
        results[variant] = queue.get()
        proc.join()
        if proc.exitcode:
            print(f"{variant}: the benchmark process failed (exit {proc.exitcode})", file=sys.stderr)
            return 1
    base, full = results["bare-llm"], results["dreamllm"]
    load = os.getloadavg()[0]
    print(f"batch {args.batch} x seq 256 (tiny preset), {full['images']} images, {full['tokens']} real tokens, "
          f"device {args.device}, {full['threads']} torch threads, median of {args.steps} steps, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs (the ratio is the figure that survives contention)")
    for r in (base, full):
        print(f"  {r['variant']:9s} step {r['median_s'] * 1000:8.1f} ms wall (min {r['min_s'] * 1000:.1f}), "
              f"{r['median_cpu_s'] * 1000:8.1f} ms CPU  "
              f"peak +{r['peak_bytes'] / 2**20:7.1f} MiB  trainable {r['trainable'] / 1e6:.2f}M")
    mem_ratio = full["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
    print(f"  ratio dreamllm / bare-llm: wall {full['median_s'] / base['median_s']:.2f}x, "
          f"CPU {full['median_cpu_s'] / base['median_cpu_s']:.2f}x, memory {mem_ratio:.2f}x")
    if not args.device.startswith("cuda"):
        # With one thread, CPU seconds are the wall time the step takes on an idle core.
        cost = full["median_cpu_s"] / max(1, full["threads"])
        print(f"  goal: dreamllm step well under 1 s on CPU -> {cost:.2f} s per thread "
              f"({'met' if cost < 0.5 else 'NOT met'}: 'well under' taken as < 0.5 s)")
    print(json.dumps({"bench": "model", "load_average": load, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
