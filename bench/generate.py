"""Offline generation benchmark: `dreamcore generate` on Ray Data vs the same engine in-process.

Both sides run the same N prompts through the same round functions (pipelines/generate/job.py
`text_round` / `image_round` over dreamcore.engine and dreamcore.generate.Document) with the same
batch sizes; the in-process side is one process with one torch thread and no Ray, so the ratio is
the cost of the Ray Data pipeline: actor start and model loads (one per stage actor, 2M + 1 stages
for M image rounds), row serialization between stages, and pipeline fill/drain. Prints documents/s
and documents/s per core for both, and how many documents both sides made identically.

With two or more sizes (`--prompts 16 64`) the offline time is fitted as startup + N / rate, so the
steady-state rate per core is compared too (what a 10,000-prompt job sees).

Usage: python bench/generate.py [--checkpoint DIR] [--prompts 32] [--cpus 2] [--steps 2] [--max-images 1]
       [--json FILE]
(no checkpoint: the tests' tiny debug checkpoint is built in a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["a red circle sits on a white page", "the green square is next to", "draw a yellow circle",
           "here is a picture of a blue square", "two circles and a triangle", "a purple star"]


def write_prompts(path: Path, n: int, args: argparse.Namespace) -> Path:
    lines = [json.dumps({"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i,
                         "temperature": 0.0 if i % 2 else 0.8, "max_new_tokens": args.max_new_tokens,
                         "max_images": args.max_images, "num_inference_steps": args.steps}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def in_process(src: Path, cfg, text, image) -> tuple[float, dict[str, list]]:
    """The rounds over all documents in one process, batched as the pipeline batches them."""
    from pipelines.generate.job import document_record, image_round, read_prompts, text_round, to_rows

    t = time.perf_counter()
    prompts, _ = read_prompts(src, cfg, image.card)
    rows = to_rows(prompts)
    rounds = max(p.params.max_images for p in prompts)
    for r in range(rounds + 1):
        for i in range(0, len(rows), cfg.llm.batch_size):
            text_round(text, rows[i:i + cfg.llm.batch_size])
        if r < rounds:
            for i in range(0, len(rows), cfg.decoder.batch_size):
                image_round(image, rows[i:i + cfg.decoder.batch_size])
    docs = {rec["id"]: rec["parts"] for rec in map(document_record, rows)}
    return time.perf_counter() - t, docs


def offline(src: Path, out: Path, cfg) -> tuple[float, dict[str, list]]:
    import pyarrow.parquet as pq

    from pipelines.generate.job import generate

    t = time.perf_counter()
    manifest = generate(src, out, cfg)
    took = time.perf_counter() - t
    assert manifest["counts"]["pending"] == 0 and manifest["counts"]["dropped"] == 0, manifest["counts"]
    table = pq.read_table(out / "documents", columns=["id", "parts"])
    return took, dict(zip(table.column("id").to_pylist(), table.column("parts").to_pylist()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--prompts", type=int, nargs="+", default=[32], help="N (two or more sizes: fit startup)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray the offline job runs on")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps per image")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-images", type=int, default=1)
    ap.add_argument("--llm-batch", type=int, default=16)
    ap.add_argument("--decoder-batch", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the figures here (bench/serve.py reads them)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dreamcore-bench-gen-"))
    ckpt = args.checkpoint
    if ckpt is None:
        sys.path.insert(0, str(REPO / "tests"))
        from _serve_helpers import make_checkpoint

        ckpt = str(make_checkpoint(tmp / "ckpt"))

    import ray
    import torch

    from pipelines.generate.config import GenerateConfig
    from pipelines.serve.replicas import ImageReplica, TextReplica

    cfg = GenerateConfig(checkpoint=str(Path(ckpt).resolve()), progress=False, docs_per_shard=64)
    cfg.llm.batch_size, cfg.decoder.batch_size = args.llm_batch, args.decoder_batch

    # 1. In-process: one torch thread (one core), the models loaded once (load time not counted).
    torch.set_num_threads(1)
    t = time.perf_counter()
    text, image = TextReplica(cfg.checkpoint, "cpu").engine, ImageReplica(cfg.checkpoint, "cpu")
    load_s = time.perf_counter() - t
    results = []
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for n in args.prompts:
            src = write_prompts(tmp / f"prompts-{n}.jsonl", n, args)
            base_s, base_docs = in_process(src, cfg, text, image)
            # 2. Offline on Ray Data, end to end (actor start and model loads included).
            off_s, off_docs = offline(src, tmp / f"out-{n}", cfg)
            results.append((n, base_s, off_s, sum(base_docs[k] == off_docs.get(k) for k in base_docs)))
    finally:
        ray.shutdown()

    print(f"offline generation benchmark: tiny checkpoint, {args.max_new_tokens} new tokens, up to "
          f"{args.max_images} image(s) of {args.steps} steps per document; {os.cpu_count()} CPUs on the machine, "
          f"Ray given {args.cpus}; batch {args.llm_batch} (LLM) / {args.decoder_batch} (decoder)")
    print(f"in-process model load (not counted): {load_s:.1f} s")
    print(f"{'N':>5} {'in-proc doc/s':>14} {'per core':>9} {'offline doc/s':>14} {'per core':>9} "
          f"{'ratio/core':>11} {'identical':>10}")
    for n, base_s, off_s, same in results:
        b, o = n / base_s, n / off_s
        print(f"{n:>5} {b:>14.2f} {b:>9.2f} {o:>14.2f} {o / args.cpus:>9.2f} {o / args.cpus / b:>11.2f} "
              f"{f'{same}/{n}':>10}")
    figures = {"cpus": args.cpus, "sizes": [{"prompts": n, "in_process_s": b, "offline_s": o, "identical": same,
                                            "ratio_per_core": n / o / args.cpus / (n / b)}
                                           for n, b, o, same in results]}
    if len(results) >= 2:
        (n1, b1, o1, _), (n2, b2, o2, _) = results[0], results[-1]
        rate = (n2 - n1) / (o2 - o1)  # documents/s once the pipeline runs
        base_rate = (n2 - n1) / (b2 - b1)
        figures.update(startup_s=o1 - n1 / rate, steady_ratio_per_core=rate / args.cpus / base_rate)
        print(f"offline fit: startup {o1 - n1 / rate:.1f} s, steady {rate:.2f} doc/s = {rate / args.cpus:.2f} per core; "
              f"in-process steady {base_rate:.2f} doc/s per core; steady ratio per core "
              f"{rate / args.cpus / base_rate:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print("identical: documents equal on both sides. Batches are cut differently on the two sides, and batched "
          "float kernels can move a pixel by one level or flip a near-tie token; --llm-batch 1 --decoder-batch 1 "
          "makes every document bit-exact (and slower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
