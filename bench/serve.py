"""Serving benchmark: each serving goal against its baseline, measured in the same run on one machine.

Goals (issue "continuous-batching engine"), each printed with its measured ratio:
1. Serve overhead: POST /v1/images p50 at 1 client over Serve + loopback HTTP <= 1.10x the same
   engines called in-process (no Ray, no HTTP; one torch thread, as Ray gives a replica).
2. Concurrency: throughput at 16 clients >= 4x that at 1 client.
3. Decoder batching: 8 images denoised together (the replica's step-level batching,
   dreamcore/denoiser.py) >= 3x per image against the same 8 one at a time.
4. Prefix reuse: a 3-image document's prefilled + decoded tokens with sessions (the LLM replica's
   scheduler) = its length (every token but the last sampled one, which nothing reads, runs once);
   latency against the stateless rounds (each re-prefills the document).
5. Offline `dreamcore generate` >= 0.9x the in-process engine's documents/s per core (runs
   bench/generate.py, which prints its own table; --skip-offline leaves it out).

Usage: python bench/serve.py [--checkpoint DIR] [--steps 10] [--requests 32] [--skip-offline]
(no checkpoint: the tests' tiny debug checkpoint is built in a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def decoder_batching(image, dreams) -> tuple[float, float]:
    """Images/s of the replica's denoiser: all at once (joined at step 0) vs one image at a time."""
    den = image.denoiser

    def run(batch) -> None:
        futures = [den.submit(d) for d in batch]
        while den.step():
            pass
        [f.result() for f in futures]

    run(dreams[:1])  # warm-up
    t = time.perf_counter()
    for d in dreams:
        run([d])
    one = len(dreams) / (time.perf_counter() - t)
    t = time.perf_counter()
    run(dreams)
    return len(dreams) / (time.perf_counter() - t), one


def prefix_reuse(text_replica, image, prompt: str, steps: int) -> dict:
    """One document with up to 3 images, text side timed: sessions (scheduler) vs stateless rounds."""
    from dreamcore.engine import decode_dreams
    from dreamcore.generate import Document, GenerationParams

    params = GenerationParams(max_new_tokens=60, max_images=3, temperature=0.0, seed=3, num_inference_steps=steps)
    engine, sched = text_replica.engine, text_replica.scheduler

    def run(with_sessions: bool) -> tuple[Document, float, int, int]:
        doc, text_s, spent, last = Document([prompt], params), 0.0, 0, 0
        p0, d0 = sched.prefill_tokens, sched.decode_tokens
        while not doc.finished:
            t = time.perf_counter()
            if with_sessions:
                ticket = sched.submit(doc.text_request(), session_id="bench")
                while not ticket.done:
                    sched.step()
                res = ticket.result
            else:
                res = engine.continue_batch([doc.text_request()])[0]
                spent += res.prompt_tokens + res.new_tokens
            text_s += time.perf_counter() - t
            last = res.prompt_tokens + res.new_tokens - 1  # the tokens to run: all but the last sampled
            doc.add_text(res)
            if doc.wants_image:
                doc.add_image(decode_dreams(image.decoder, [doc.image_request()])[0])
        if with_sessions:
            spent = sched.prefill_tokens - p0 + sched.decode_tokens - d0
        return doc, text_s, spent, last

    run(True)  # warm-up
    doc, stateful_s, stateful_tokens, length = run(True)
    _, stateless_s, stateless_tokens, _ = run(False)
    return {"images": doc.images, "length": length, "stateful_tokens": stateful_tokens,
            "stateless_tokens": stateless_tokens, "stateful_s": stateful_s, "stateless_s": stateless_s}


def offline_ratio(ckpt: str, steps: int) -> dict | None:
    out = Path(tempfile.mkdtemp(prefix="dreamcore-bench-serve-")) / "generate.json"
    cmd = [sys.executable, str(REPO / "bench" / "generate.py"), "--checkpoint", ckpt, "--prompts", "64", "512",
           "--steps", str(steps), "--json", str(out)]
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process baseline (Ray gives each replica OMP_NUM_THREADS=1)")
    ap.add_argument("--skip-offline", action="store_true", help="leave out goal 5 (bench/generate.py)")
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
    text_replica, image = TextReplica(ckpt, "cpu"), ImageReplica(ckpt, "cpu")
    text = text_replica.engine

    def in_process() -> float:
        t = time.perf_counter()
        r = text.continue_batch(dream_requests([body["prompt"]], seed=1))[0]
        image.decode_batch([DreamConditions(r.cond, r.uncond, 1, args.steps, 3.0)])
        return time.perf_counter() - t

    in_process()  # warm-up
    base = [in_process() for _ in range(8)]

    # 3. Decoder batching (the replica's own denoiser, stepped here by hand).
    r = text.continue_batch(dream_requests(["a blue square"]))[0]
    batched, unbatched = decoder_batching(image, [DreamConditions(r.cond, r.uncond, s, args.steps, 3.0)
                                                  for s in range(8)])
    # 4. Prefix reuse.
    reuse = prefix_reuse(text_replica, image, "a red circle sits on a white page", args.steps)

    # 2. The Serve path over loopback HTTP.
    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = load_serve_config(None, ["llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0",
                                   "decoder.autoscaling.max_replicas=1", "llm.autoscaling.max_replicas=1",
                                   "ingress.max_queued_requests=1000", "decoder.max_queued_requests=1000",
                                   "decoder.max_ongoing_requests=16", "decoder.max_batch_size=16"],
                            checkpoint=ckpt, port=8765)
    url = start_local(config=cfg)
    try:
        for _ in range(3):
            post(url, body)  # warm-up
        rows = []
        for c in (1, 4, 16):
            n = max(c, args.requests if c > 1 else 16)
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(lambda _: post(url, body), range(n)))
            wall = time.perf_counter() - t
            rows.append((c, statistics.median(lat), pct(lat, 0.95), n / wall))
    finally:
        shutdown()
        ray.shutdown()

    offline = None if args.skip_offline else offline_ratio(ckpt, 2)

    print(f"\nserving benchmark: tiny debug checkpoint, {args.steps} denoising steps, 1 image per request, "
          f"{os.cpu_count()} CPUs, one replica per deployment")
    print(f"{'clients':>8} {'p50 s':>8} {'p95 s':>8} {'req/s':>8}")
    for c, p50, p95, thr in rows:
        print(f"{c:>8} {p50:>8.3f} {p95:>8.3f} {thr:>8.2f}")
    base_p50 = statistics.median(base)
    print(f"in-process baseline (same engines, no Ray/HTTP, {args.threads} torch thread(s)): p50 {base_p50:.3f} s")
    print(f"decoder: 8 images together {batched:.1f} images/s, one at a time {unbatched:.1f} images/s")
    print(f"prefix reuse: a document of {reuse['length']} tokens with {reuse['images']} images: "
          f"{reuse['stateful_tokens']} tokens prefilled + decoded with sessions ({reuse['stateful_s']:.3f} s of text "
          f"rounds) vs {reuse['stateless_tokens']} stateless ({reuse['stateless_s']:.3f} s)")
    goals = [
        ("1 Serve p50 / in-process p50 (1 client)", rows[0][1] / base_p50, "<= 1.10", rows[0][1] / base_p50 <= 1.10),
        ("2 throughput 16 clients / 1 client", rows[2][3] / rows[0][3], ">= 4.00", rows[2][3] / rows[0][3] >= 4),
        ("3 decoder 8 together / one at a time", batched / unbatched, ">= 3.00", batched / unbatched >= 3),
        ("4 tokens with sessions / document length", reuse["stateful_tokens"] / reuse["length"], "= 1.00",
         reuse["stateful_tokens"] == reuse["length"]),
        ("4 text latency sessions / stateless", reuse["stateful_s"] / reuse["stateless_s"], "(report)", True),
    ]
    if offline is not None:
        ratio = offline.get("steady_ratio_per_core", offline["sizes"][-1]["ratio_per_core"])
        goals.append(("5 offline / in-process docs/s per core (steady)", ratio, ">= 0.90", ratio >= 0.9))
        goals.append(("5 offline / in-process, end to end at 96 prompts", offline["sizes"][-1]["ratio_per_core"],
                      "(report)", True))
    print(f"\n{'goal':<52} {'measured':>9} {'target':>9}  met")
    for name, value, target, met in goals:
        print(f"{name:<52} {value:>8.2f}x {target:>9}  {'yes' if met else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
