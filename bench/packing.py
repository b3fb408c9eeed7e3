"""Document-masked packing: what the per-document attention mask costs, per attention kernel.

Packed rows carry `position_ids` that restart at each document (dreamcore.batch.decode_batch, from
the `doc_lengths` column); DreamLLM.forward passes them with no 2D mask, and transformers builds the
block-diagonal causal mask for the configured kernel (`llm.attn_implementation`). This bench times
one training step (forward + backward) of the tiny preset on the same batch of packed rows
(default 8 rows x 256 tokens, 3-5 interleaved/text documents each) under:

- `baseline`: sdpa with positions 0..T-1 on every row, i.e. one causal sequence per row. This is the
  old cross-document behaviour (documents attend to earlier documents of their row), and it is the
  cheapest possible attention: no mask is built and sdpa runs with is_causal.
- `sdpa`, `eager`, `flex_attention`: the per-document mask, each kernel.

Printed per variant: median ms (CPU time on CPU, wall on CUDA) per full DreamLLM step and per LLM-only step (LlamaForCausalLM
forward + backward on the same ids and positions: where the attention cost shows undiluted by CLIP
and the UNet), each as a ratio against the baseline measured in the same run, and the max abs
difference of the logits against masked sdpa (eval mode; the baseline's difference is what the mask
changes). Variants run round-robin, so load on a shared machine spreads over all of them.

flex_attention on CPU: PyTorch 2.13 compiles the forward (inductor, ~100 s cold on 2 cores) and has
no backward on CPU, so the step is reported as skipped with the reason; `--flex-forward` also
compiles the forward to compare its logits. On CUDA it is timed like the others.

  python bench/packing.py [--rows 8] [--seq 256] [--steps 6] [--warmup 2] [--threads N]
                          [--device cpu|cuda] [--flex-forward]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from model import rows_to_batch  # noqa: E402  (bench/model.py, beside this script)

from dreamcore.config import preset  # noqa: E402
from dreamcore.model import DreamLLM  # noqa: E402
from dreamcore.tokenizer import DreamTokenizer  # noqa: E402

SENTENCES = [
    "here is a small red circle on a white page", "the circle is red and round",
    "a blue square sits in the middle", "its sides are straight and blue",
    "look at this green triangle", "three corners, all green", "a yellow star shines",
    "it has five yellow points", "two shapes share the picture", "the background stays white",
]
BASELINE = "baseline"
KERNELS = ("sdpa", "eager", "flex_attention")


def make_rows(cfg, tok, n_rows: int, seed: int = 0):
    """`n_rows` packed rows of 3-5 documents: (text, image, text), text-only and two-image documents."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_rows * 6):
        kind = rng.choice(["one", "one", "text", "two"])
        words = [rng.choice(SENTENCES) for _ in range(rng.randint(3, 8))]
        a, b = " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])
        parts = {"one": [a, 0, b], "text": [a, b], "two": [a, 0, b, 1]}[kind]
        docs.append(tok.encode_document(parts, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample))
    rows = tok.pack(docs, cfg.max_seq_len, cfg.images_per_sample, packing=True)
    chosen = [r for r in rows if 3 <= len(r.doc_ids) <= 5][:n_rows]
    if len(chosen) < n_rows:
        raise SystemExit(f"only {len(chosen)} rows of 3-5 documents at seq {cfg.max_seq_len}; use --seq 256")
    return chosen, rows_to_batch(chosen, cfg, seed)


def one_sequence(batch: dict) -> dict:
    """The baseline's batch: positions 0..T-1 on every row (no document boundaries)."""
    B, T = batch["input_ids"].shape
    return dict(batch, position_ids=torch.arange(T, device=batch["input_ids"].device).expand(B, T).clone())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flex-forward", action="store_true",
                        help="on CPU, also compile flex_attention's forward to compare its logits (~100 s cold)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.max_seq_len = args.seq
    tok = DreamTokenizer(DreamTokenizer.train(SENTENCES * 20, cfg.tokenizer.vocab_size),
                         cfg.vision.num_tokens, cfg.dream.num_queries)
    rows, packed = make_rows(cfg, tok, args.rows)
    packed = {k: v.to(args.device) for k, v in packed.items()}
    batches = {BASELINE: one_sequence(packed), **{k: packed for k in KERNELS}}
    model = DreamLLM(cfg, tok).to(args.device)
    cuda = args.device.startswith("cuda")

    def use(variant: str) -> None:
        model.llm.set_attn_implementation("sdpa" if variant == BASELINE else variant)

    def timed(fn) -> tuple[float, float]:
        """(wall s, CPU s) of fn; CPU seconds are what other processes on a shared box do not inflate."""
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    def full_step(variant: str) -> tuple[float, float]:
        def run():
            model(batches[variant])["loss"].backward()
        return timed(run)

    def llm_step(variant: str) -> tuple[float, float]:
        b = batches[variant]

        def run():
            model.llm(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                      use_cache=False).loss.backward()
        return timed(run)

    # 1. Which variants can train here (flex_attention has no backward on CPU in PyTorch 2.13).
    skipped: dict[str, str] = {}
    variants = [BASELINE, *KERNELS]
    model.train()
    for v in list(variants):
        use(v)
        try:
            for _ in range(args.warmup):
                full_step(v)
                llm_step(v)
        except Exception as e:  # NotImplementedError on CPU, a missing compiler, ...: say why, go on
            skipped[v] = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0]}"
            variants.remove(v)
        model.zero_grad(set_to_none=True)

    # 2. Timing, round-robin over the variants.
    times: dict[str, dict[str, list[tuple[float, float]]]] = {v: {"full": [], "llm": []} for v in variants}
    for _ in range(args.steps):
        for v in variants:
            use(v)
            times[v]["full"].append(full_step(v))
            times[v]["llm"].append(llm_step(v))
            model.zero_grad(set_to_none=True)

    # 3. Logits against masked sdpa (eval: no condition drop).
    model.eval()
    logits: dict[str, torch.Tensor] = {}
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: logits.__setitem__("last", o))
    diffs: dict[str, float | str] = {}
    check = [BASELINE, *KERNELS] if (cuda or args.flex_forward) else [BASELINE, "sdpa", "eager"]
    with torch.no_grad():
        for v in ["sdpa", *[c for c in check if c != "sdpa"]]:
            use(v)
            try:
                model(batches[v])
            except Exception as e:
                diffs[v] = f"failed: {e.__class__.__name__}: {str(e).strip().splitlines()[0]}"
                continue
            if v == "sdpa":
                ref = logits["last"].float()
            else:
                diffs[v] = float((logits["last"].float() - ref).abs().max())
    hook.remove()
    if "flex_attention" not in check:
        diffs["flex_attention"] = "not run (CPU: --flex-forward compiles it, ~100 s cold)"

    # 4. Report.
    # Ratios use CPU time on CPU (robust to load; with 1 thread it is the idle-core wall time), wall on CUDA.
    med = {v: {f"{k}_{kind}": statistics.median(t[i] for t in ts) * 1000
               for k, ts in vts.items() for i, kind in enumerate(("wall", "cpu"))}
           for v, vts in times.items()}
    clock = "wall" if cuda else "cpu"
    base = med[BASELINE]
    n_docs = [len(r.doc_ids) for r in rows]
    real = int(packed["attention_mask"].sum())
    load = os.getloadavg()[0]
    print(f"tiny preset, {args.rows} rows x {args.seq} tokens, {sum(n_docs)} documents "
          f"({min(n_docs)}-{max(n_docs)} a row), {real} real tokens, "
          f"{int((packed['dream_slots'] >= 0).sum())} images; device {args.device}, "
          f"{torch.get_num_threads()} torch threads, median of {args.steps} steps after {args.warmup} warmup; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print("baseline = sdpa with positions 0..T-1 (no document mask: the old cross-document behaviour, "
          "is_causal fast path)")
    print(f"ms are {clock} ms per step ({'wall' if clock == 'cpu' else 'cpu'} in the JSON line); "
          "step = DreamLLM forward + backward, llm = the LLM alone on the same ids and positions")
    print(f"{'variant':16s} {'mask':8s} {'step ms':>9s} {'x base':>7s} {'llm ms':>8s} {'x base':>7s}  "
          f"max|logits - sdpa|")
    for v in [BASELINE, *KERNELS]:
        mask = "none" if v == BASELINE else "per-doc"
        diff = diffs.get(v, 0.0 if v == "sdpa" else "")
        diff_s = f"{diff:.2e}" if isinstance(diff, float) else diff
        if v in med:
            full, llm = med[v][f"full_{clock}"], med[v][f"llm_{clock}"]
            print(f"{v:16s} {mask:8s} {full:9.1f} {full / base[f'full_{clock}']:6.2f}x "
                  f"{llm:8.1f} {llm / base[f'llm_{clock}']:6.2f}x  {diff_s}")
        else:
            print(f"{v:16s} {mask:8s} {'skipped':>9s}: {skipped.get(v, '?')}; logits: {diff_s}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"bench": "packing", "load_average": load, "median_ms": med, "skipped": skipped,
                      "logit_max_abs_diff_vs_sdpa": diffs, "docs_per_row": n_docs, "real_tokens": real}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
