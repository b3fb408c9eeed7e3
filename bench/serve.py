"""Serving benchmark: latency/throughput over HTTP, Serve overhead, decoder batching. One run, one machine.

Prints, against baselines measured in the same run:
- p50/p95 latency and throughput of POST /v1/images at 1, 4 and 16 concurrent clients on loopback;
- the Serve path vs the same engines called in-process (overhead ratio, 1 client);
- batched vs unbatched decoder throughput (8 images in one `decode_batch` vs 8 calls of one).

Usage: python bench/serve.py [--checkpoint DIR] [--steps 10] [--requests 32]
(no checkpoint: a tiny untrained one is built in a temp folder, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def post(url: str, body: dict) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url + "/v1/images", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process baseline (Ray gives each replica OMP_NUM_THREADS=1)")
    args = ap.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        sys.path.insert(0, str(REPO / "tests"))
        from _serve_helpers import make_checkpoint

        ckpt = str(make_checkpoint(Path(tempfile.mkdtemp(prefix="dreamcore-bench-")) / "ckpt"))

    import ray
    import torch

    # Same thread budget as one replica, else the baseline oversubscribes the cores and looks slow.
    torch.set_num_threads(args.threads)

    from dreamcore.engine import DreamConditions
    from dreamcore.generate import dream_requests
    from pipelines.serve import load_serve_config, shutdown, start_local
    from pipelines.serve.replicas import ImageReplica, TextReplica

    body = {"prompt": "a red circle", "n": 1, "seed": 1, "num_inference_steps": args.steps}

    # 1. In-process baseline: the same engines, no Ray, no HTTP.
    text, image = TextReplica(ckpt, "cpu").engine, ImageReplica(ckpt, "cpu")

    def in_process() -> float:
        t = time.perf_counter()
        r = text.continue_batch(dream_requests([body["prompt"]], seed=1))[0]
        image.decode_batch([DreamConditions(r.cond, r.uncond, 1, args.steps, 3.0)])
        return time.perf_counter() - t

    in_process()  # warm-up
    base = [in_process() for _ in range(8)]

    # 2. Decoder batching: 8 images in one call vs one at a time.
    r = text.continue_batch(dream_requests(["a blue square"]))[0]
    items = [DreamConditions(r.cond, r.uncond, s, args.steps, 3.0) for s in range(8)]
    t = time.perf_counter()
    for it in items:
        image.decode_batch([it])
    unbatched = len(items) / (time.perf_counter() - t)
    t = time.perf_counter()
    image.decode_batch(items)
    batched = len(items) / (time.perf_counter() - t)

    # 3. The Serve path over loopback HTTP.
    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = load_serve_config(None, ["llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0",
                                   "decoder.autoscaling.max_replicas=1", "llm.autoscaling.max_replicas=1",
                                   "ingress.max_queued_requests=1000", "decoder.max_queued_requests=1000",
                                   "decoder.max_ongoing_requests=16"], checkpoint=ckpt, port=8765)
    url = start_local(config=cfg)
    try:
        post(url, body)  # warm-up
        rows = []
        for c in (1, 4, 16):
            n = max(c, args.requests if c > 1 else 8)
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(lambda _: post(url, body), range(n)))
            wall = time.perf_counter() - t
            rows.append((c, statistics.median(lat), pct(lat, 0.95), n / wall))
    finally:
        shutdown()
        ray.shutdown()

    print(f"serving benchmark: tiny checkpoint, {args.steps} denoising steps, 1 image per request, "
          f"{os.cpu_count()} CPUs, one replica per deployment")
    print(f"{'clients':>8} {'p50 s':>8} {'p95 s':>8} {'req/s':>8}")
    for c, p50, p95, thr in rows:
        print(f"{c:>8} {p50:>8.3f} {p95:>8.3f} {thr:>8.2f}")
    p50_1 = rows[0][1]
    print(f"baseline in-process (same engines, no Ray/HTTP, {args.threads} torch thread(s)): p50 {statistics.median(base):.3f} s")
    print(f"Serve path / in-process at 1 client (p50): {p50_1 / statistics.median(base):.2f}x")
    print(f"throughput at 16 clients / at 1 client: {rows[2][3] / rows[0][3]:.2f}x (batching + concurrency)")
    print(f"decoder batched (8 per call) vs unbatched: {batched:.2f} vs {unbatched:.2f} images/s = "
          f"{batched / unbatched:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
