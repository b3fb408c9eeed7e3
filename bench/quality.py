"""Does the tiny preset learn? Train it in-process on the shapes world, then score held-out cases.

The experiment loop behind `dreamcore.synthetic.TINY_RECIPE`: the same data path as curation
(MMC4 corpus -> tokenizer.interleave -> encode_document -> pack -> PNG rows -> batch.decode_batch),
plain PyTorch AdamW with warmup + cosine, a wall-clock and a step budget, then
`dreamcore.synthetic.evaluate` (held-out prompts -> images -> scorer; held-out images -> captions).
Every figure is printed beside its chance level (the named baseline), plus steps/s so a run on a
busy machine can be converted to the quiet-machine budget.

    .venv/bin/python bench/quality.py                       # the recipe: up to 10 min of training
    .venv/bin/python bench/quality.py --steps 300 --set decoder.resolution=32 --lr 2e-3
    .venv/bin/python bench/quality.py --speed-only          # steps/s of the recipe, no training run

No Ray here: this measures the model and the recipe, not the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamcore.batch import decode_batch, to_torch, trim_padding  # noqa: E402, trim_padding
from dreamcore.config import ModelConfig, load_config, tiny, to_dict  # noqa: E402
from dreamcore.model import DreamLLM  # noqa: E402
from dreamcore.synthetic import TINY_RECIPE, TinyRecipe, evaluate, make_corpus, render_png  # noqa: E402
from dreamcore.tokenizer import DreamTokenizer, interleave  # noqa: E402


def build_rows(cfg: ModelConfig, docs: list[dict], tokenizer: DreamTokenizer, packing: bool = True,
               pair_mode: str = "interleaved") -> dict[str, np.ndarray]:
    """The whole corpus as one decoded batch dict (N rows), exactly as curation + decode_batch make it.

    pair_mode (layout of one-image documents, DreamLLM's pair data): "interleaved" (as MMC4);
    "text-to-image": a creation pair (describing sentence as context, then the dream block; the
    caption left out); "both": that creation pair AND a comprehension pair (image, then its caption
    as target: "image-to-text"), two training sequences per one-image document.
    """
    encoded, owners = [], []

    def add(d: int, doc: dict, parts: list, mode: str) -> None:
        enc = tokenizer.encode_document(parts, max_len=cfg.max_seq_len, max_images=cfg.images_per_sample,
                                        mode=mode)
        if enc.dropped_images:  # a synthetic doc should fit; say so instead of training on less
            print(f"note: {doc['url']} lost images {enc.dropped_images} to truncation", file=sys.stderr)
        encoded.append(enc)
        owners.append(d)

    for d, doc in enumerate(docs):
        parts, problems = interleave(doc["text_list"], [i["matched_text_index"] for i in doc["image_info"]])
        if problems:
            raise ValueError(f"synthetic document {doc['url']}: {problems}")
        if pair_mode == "interleaved" or len(doc["image_info"]) != 1:
            add(d, doc, parts, "interleaved")
            continue
        m = doc["image_info"][0]["matched_text_index"]
        add(d, doc, [doc["text_list"][m], 0], "text-to-image")
        if pair_mode == "both":  # the sentence after the image is its caption (synthetic.make_document)
            add(d, doc, [0, doc["text_list"][m + 1]], "image-to-text")
    rows = tokenizer.pack(encoded, cfg.max_seq_len, cfg.images_per_sample, packing=packing)
    res = cfg.image_resolution
    samples = []
    for r, row in enumerate(rows):
        pngs = [render_png(docs[owners[pos]]["image_info"][img]["image_name"][:-4], res) for pos, img in row.images]
        samples.append(row.to_sample(f"row{r}", pngs))
    columns = {k: [s[k] for s in samples] for k in samples[0]}
    return decode_batch(columns, cfg)


def lr_at(step: int, recipe: TinyRecipe, total: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at `total` steps."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps))
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + 0.5 * (recipe.lr - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def probe(model: DreamLLM, batch: dict, repeats: int = 4, seed: int = 0) -> dict:
    """Does the decoder use its condition? Denoising MSE with the right conditions vs the same
    conditions shuffled across images (same noise and timesteps), and how much the conditions vary
    across images relative to their overall spread."""
    captured = {}
    real_loss = model.decoder.loss

    def capture(images, cond):
        captured["x"], captured["c"] = images, cond
        return cond.sum() * 0.0

    was_training = model.training
    model.eval()
    model.decoder.loss = capture
    try:
        model(batch)
    finally:
        model.decoder.loss = real_loss
    x, c = captured["x"], captured["c"]
    k = x.shape[0]
    perm = torch.roll(torch.arange(k), 1)
    g = torch.Generator().manual_seed(seed)
    dec, right, wrong = model.decoder, 0.0, 0.0
    for _ in range(repeats):
        x0 = dec.to_model_space(x)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, dec.train_scheduler.config.num_train_timesteps, (k,), generator=g)
        xt = dec.train_scheduler.add_noise(x0, noise, t)
        target = noise if dec.prediction_type == "epsilon" else dec.train_scheduler.get_velocity(x0, noise, t)
        for cond, acc in ((c, "r"), (c[perm], "w")):
            pred = dec.unet(xt, t, encoder_hidden_states=cond).sample
            mse = float(torch.nn.functional.mse_loss(pred, target))
            if acc == "r":
                right += mse / repeats
            else:
                wrong += mse / repeats
    flat = c.reshape(k, -1)
    spread = float(flat.std(0).mean() / flat.std())
    model.train(was_training)
    return {"mse_right": round(right, 5), "mse_shuffled": round(wrong, 5),
            "gap": round(wrong - right, 5), "spread": round(spread, 3)}


def train(cfg: ModelConfig, recipe: TinyRecipe, log_every: int = 50, seed: int = 0, packing: bool = True,
          pair_mode: str = "interleaved", creation_lr_mult: float = 1.0, probe_every: int = 0,
          trim: bool = True, ema_decays: tuple[float, ...] = ()) -> tuple[DreamLLM, DreamTokenizer, dict]:
    """Train the model in-process until max_steps or max_minutes, whichever comes first.

    creation_lr_mult: lr multiplier for dream_queries and cond_proj (a second AdamW group).
    ema_decays: keep an exponential moving average of the trained weights per decay; returned in
    stats["ema"] as {decay: state_dict} for evaluation."""
    torch.manual_seed(seed)
    t0 = time.time()
    docs = make_corpus(recipe.num_docs, recipe.corpus_seed, "http://127.0.0.1:1", recipe.single_image_fraction)
    tokenizer = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                                     corpus_texts=[t for d in docs for t in d["text_list"]])
    data = build_rows(cfg, docs, tokenizer, packing=packing, pair_mode=pair_mode)
    n_rows = data["input_ids"].shape[0]
    n_images = int((data["dream_slots"] >= 0).sum())
    print(f"data: {len(docs)} docs -> {n_rows} rows of {cfg.max_seq_len} tokens, {n_images} images "
          f"({time.time() - t0:.1f}s)", flush=True)

    model = DreamLLM(cfg, tokenizer)
    model.train()
    params = model.trainable_parameters()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable); "
          f"decoder {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M", flush=True)
    special = {id(model.dream_queries), *(id(p) for p in model.cond_proj.parameters())}
    groups = [{"params": [p for p in params if id(p) not in special], "lr_mult": 1.0},
              {"params": [p for p in params if id(p) in special], "lr_mult": creation_lr_mult}]
    emas = {d: [p.detach().clone() for p in params] for d in ema_decays}
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, recipe.beta2), weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(seed)
    probe_batch = to_torch({k: v[:16] for k, v in data.items()})
    order = rng.permutation(n_rows)
    cursor, step, history = 0, 0, []
    start, cpu_start = time.time(), time.process_time()
    deadline = start + recipe.max_minutes * 60
    while step < recipe.max_steps and time.time() < deadline:
        if cursor + recipe.batch_size > n_rows:
            order, cursor = rng.permutation(n_rows), 0
        idx = order[cursor:cursor + recipe.batch_size]
        cursor += recipe.batch_size
        batch = {k: v[idx] for k, v in data.items()}
        if trim:  # drop the all-padding tail (causal attention: the result is the same, only faster)
            batch = trim_padding(batch)
        batch = to_torch(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe, recipe.max_steps) * group["lr_mult"]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        with torch.no_grad():
            for d, shadow in emas.items():
                torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - d)
        step += 1
        history.append((float(out["lm_loss"]), float(out["vm_loss"])))
        if step % log_every == 0 or step == 1:
            lm, vm = np.mean(history[-log_every:], axis=0)
            cpu_per_step = (time.process_time() - cpu_start) / step
            print(f"step {step:5d}  lm {lm:.3f}  vm {vm:.4f}  {step / (time.time() - start):.2f} steps/s  "
                  f"{cpu_per_step:.2f} cpu-s/step", flush=True)
        if probe_every and step % probe_every == 0:
            print(f"probe {step}: {probe(model, probe_batch)}", flush=True)
    elapsed, cpu = time.time() - start, time.process_time() - cpu_start
    # CPU seconds per step do not depend on how busy the shared machine is: with T threads a
    # quiet machine runs about cpu_s_per_step / T seconds per step (an upper bound: contention
    # only adds cache misses and spinning).
    stats = {"steps": step, "train_seconds": round(elapsed, 1), "steps_per_s": round(step / elapsed, 3),
             "cpu_s_per_step": round(cpu / max(step, 1), 3),
             "rows": n_rows, "images": n_images,
             "final_lm_loss": round(float(np.mean([h[0] for h in history[-50:]])), 4),
             "final_vm_loss": round(float(np.mean([h[1] for h in history[-50:]])), 5),
             "probe": probe(model, probe_batch)}
    if emas:
        stats["ema"] = {d: shadow for d, shadow in emas.items()}
    return model, tokenizer, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override on the tiny preset, e.g. decoder.resolution=32")
    p.add_argument("--steps", type=int, help=f"step budget (recipe: {TINY_RECIPE.max_steps})")
    p.add_argument("--minutes", type=float, help=f"training wall-clock budget (recipe: {TINY_RECIPE.max_minutes})")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch", type=int, help="packed rows per step")
    p.add_argument("--docs", type=int, help="corpus size")
    p.add_argument("--pairs", type=float, help="share of one-image documents in the corpus")
    p.add_argument("--guidance", type=float, help="guidance scale at evaluation (default: the model's decoder.guidance_scale)")
    p.add_argument("--packing", choices=["on", "off"],
                   help=f"several documents per row (on) or one (off) (recipe: {TINY_RECIPE.packing})")
    p.add_argument("--no-packing", dest="packing", action="store_const", const="off", help="= --packing off")
    p.add_argument("--pair-mode", choices=["interleaved", "text-to-image", "both"],
                   help=f"layout of one-image documents; see build_rows (recipe: {TINY_RECIPE.pair_layout})")
    p.add_argument("--creation-lr-mult", type=float, default=1.0, help="lr multiplier: dream_queries, cond_proj")
    p.add_argument("--probe-every", type=int, default=0, help="print the condition probe every N steps")
    p.add_argument("--eval-images", type=int, help="held-out images to caption (default --eval-n; 0 skips)")
    p.add_argument("--eval-n", type=int, default=72, help="held-out prompts and images to score")
    p.add_argument("--ema", type=float, action="append", default=[], metavar="DECAY",
                   help="also evaluate an EMA of the weights with this decay (repeatable)")
    p.add_argument("--eval-steps", type=int, help="denoising steps at evaluation (recipe: eval_inference_steps)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--speed-only", action="store_true", help="time 25 steps and stop (no evaluation)")
    p.add_argument("--save", type=Path, help="save the trained model here (checkpoint.save_pretrained)")
    p.add_argument("--load", type=Path, help="skip training: evaluate a saved model (e.g. other --guidance)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    cfg = load_config(tiny(), None, args.overrides)
    changes = {"max_steps": args.steps, "max_minutes": args.minutes, "lr": args.lr,
               "batch_size": args.batch, "num_docs": args.docs,
               "single_image_fraction": args.pairs, "pair_layout": args.pair_mode,
               "packing": None if args.packing is None else args.packing == "on"}
    recipe = dataclasses.replace(TINY_RECIPE, **{k: v for k, v in changes.items() if v is not None})
    if args.speed_only:
        recipe = dataclasses.replace(recipe, max_steps=25, max_minutes=10, num_docs=min(recipe.num_docs, 200))
    print(f"recipe: {dataclasses.asdict(recipe)}")
    print(f"overrides: {args.overrides or 'none'} (threads {args.threads})", flush=True)

    if args.load:
        from dreamcore.checkpoint import from_pretrained

        model, tokenizer = from_pretrained(args.load)
        stats, emas = {"loaded": str(args.load)}, {}
    else:
        model, tokenizer, stats = train(cfg, recipe, log_every=5 if args.speed_only else 50, seed=args.seed,
                                        packing=recipe.packing, pair_mode=recipe.pair_layout,
                                        creation_lr_mult=args.creation_lr_mult, probe_every=args.probe_every,
                                        ema_decays=tuple(args.ema))
        emas = stats.pop("ema", {})
        print(f"trained: {stats}", flush=True)
    if args.save:
        from dreamcore.checkpoint import save_pretrained

        save_pretrained(model, tokenizer, args.save)
    if args.speed_only:
        return 0
    t = time.time()
    guidance = args.guidance if args.guidance is not None else model.cfg.decoder.guidance_scale
    n_images = args.eval_n if args.eval_images is None else args.eval_images
    report = evaluate(model, tokenizer, args.eval_n, n_images, seed=args.seed, guidance_scale=guidance,
                      num_inference_steps=args.eval_steps or recipe.eval_inference_steps)
    print(f"evaluated in {time.time() - t:.1f}s (guidance {guidance}):")
    for line in report.lines():
        print("  " + line)
    for s in report.samples or []:
        print("  example:", s)
    ema_reports = {}
    for decay, shadow in emas.items():  # the EMA weights, evaluated the same way
        live = [p.detach().clone() for p in model.trainable_parameters()]
        with torch.no_grad():
            for p, e in zip(model.trainable_parameters(), shadow):
                p.copy_(e)
        ema_reports[decay] = evaluate(model, tokenizer, args.eval_n, n_images, seed=args.seed,
                                      guidance_scale=guidance,
                                      num_inference_steps=args.eval_steps or recipe.eval_inference_steps)
        print(f"EMA {decay}:")
        for line in ema_reports[decay].lines():
            print("  " + line)
        with torch.no_grad():
            for p, e in zip(model.trainable_parameters(), live):
                p.copy_(e)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                         "recipe": dataclasses.asdict(recipe), "overrides": args.overrides,
                                         "model": to_dict(model.cfg), "train": stats,
                                         "eval": dataclasses.asdict(report),
                                         "eval_ema": {str(d): dataclasses.asdict(r) for d, r in ema_reports.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
