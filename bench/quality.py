"""Does the tiny preset learn? Train it in-process on the shapes world, then score held-out cases.

The experiment loop behind `pipelines.recipe.shapes_tiny` (the recipe the demo trains): the data
laid out by curation's own Ray-free code (readers.mmc4_record -> tokenize.encode_doc ->
tokenize.pack_docs -> batch.decode_batch, with rendered PNGs in place of the crawl), plain PyTorch
AdamW with the training job's schedule (pipelines/train/schedule.py) for the recipe's steps, then `dreamcore.synthetic.evaluate`
(held-out prompts -> images -> scorer; held-out images -> captions, through the serving engine).
Every figure is printed beside its chance level (the named baseline), plus steps/s so a run on a
busy machine can be converted to the quiet-machine budget.

    .venv/bin/python bench/quality.py                       # the recipe (1200 steps)
    .venv/bin/python bench/quality.py --steps 300 --set model.decoder.resolution=32 --lr 2e-3
    .venv/bin/python bench/quality.py --weight stories=0      # pairs only (stage II without documents)
    .venv/bin/python bench/quality.py --speed-only          # steps/s of the recipe, no training run

No Ray here: this measures the model and the recipe, not the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamcore.batch import decode_batch, to_torch, trim_padding  # noqa: E402, trim_padding
from dreamcore.config import ModelConfig, load_config, to_dict  # noqa: E402
from dreamcore.model import DreamLLM  # noqa: E402
from dreamcore.synthetic import evaluate, make_corpus, render_png  # noqa: E402
from dreamcore.tokenizer import DreamTokenizer  # noqa: E402
from pipelines.curate.readers import mmc4_record  # noqa: E402
from pipelines.curate.tokenize import encode_doc, pack_docs  # noqa: E402
from pipelines.recipe import Recipe, shapes_tiny  # noqa: E402
from pipelines.train.data import mix_counts  # noqa: E402
from pipelines.train.loop import optimizer_groups  # noqa: E402
from pipelines.train.schedule import group_lr  # noqa: E402


def build_rows(cfg: ModelConfig, docs: list[dict], tokenizer: DreamTokenizer, packing: str = "truncate",
               pair_layout: str = "pairs") -> dict[str, np.ndarray]:
    """The whole corpus as one decoded batch dict (N rows), laid out by curation's tokenize stage.

    packing / pair_layout: curation's `tokenize.packing` ("pack" | "truncate") and
    `tokenize.pair_layout` ("interleaved" | "pairs").
    """
    res = cfg.image_resolution
    rows = []
    for d, doc in enumerate(docs):
        row = mmc4_record(doc, f"doc{d}", "bench")
        for img, info in zip(row["images"], doc["image_info"]):
            img["data"] = render_png(info["image_name"][:-4], res)  # what the crawl would have stored
        rows.append(encode_doc(tokenizer, row, cfg))
    lost = [(r["url"], i["reason"]) for r in rows for i in r["images"] if i["drop_stage"]]
    if lost or any(r["drop_stage"] for r in rows):  # a synthetic doc should fit; say so instead of training on less
        print(f"note: {len(lost)} images dropped by the layout, e.g. {lost[:3]}", file=sys.stderr)
    samples = pack_docs(tokenizer, rows, cfg, packing=packing == "pack", pair_layout=pair_layout)
    columns = {k: [s[k] for s in samples] for k in samples[0]}
    return decode_batch(columns, cfg)


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
            pred = dec.denoise(xt, t, cond)
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


def read_rows(cfg: ModelConfig, folder: Path) -> dict[str, np.ndarray]:
    """A curated folder's rows (what the training job reads: crawled, resized images and the
    folder's own tokenizer), decoded as one batch dict, so the in-process run can train on the
    demo's data and separate the data from the DeepSpeed job."""
    import pyarrow.parquet as pq

    files = sorted((folder / "samples").glob("*.parquet"))
    if not files:
        raise SystemExit(f"--curated {folder}: no samples/*.parquet; give a folder `dreamcore curate` wrote")
    return decode_batch(pq.read_table(files).to_pydict(), cfg)


def train(recipe: Recipe, log_every: int = 50, seed: int = 0,
          probe_every: int = 0, trim: bool = True, ema_decays: tuple[float, ...] = (),
          curated: dict[str, Path] | None = None) -> tuple[DreamLLM, DreamTokenizer, dict]:
    """Train the recipe's model in-process for the recipe's steps, on one process's batches of
    the recipe's global batch size.

    The optimizer groups are the training job's (`optimizer_groups`: `optim.lr_mults` per component).
    ema_decays: keep an exponential moving average of the trained weights per decay; returned in
    stats["ema"] as {decay: state_dict} for evaluation. curated: {dataset: folder} to train on
    curated rows (and the first such folder's tokenizer) instead of rows built here."""
    torch.manual_seed(seed)
    t0 = time.time()
    cfg, optim = recipe.train.model, recipe.train.optim
    workers = max(1, recipe.train.scaling.workers)
    batch_size = recipe.train.global_batch_size(workers)
    if cfg.loss.vm_max_images:  # the cap is per worker: one process with the global batch takes all of theirs
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, vm_max_images=cfg.loss.vm_max_images * workers))
    corpora = [make_corpus(d.corpus.num_docs, d.corpus.seed, "http://127.0.0.1:1", d.corpus.single_image_fraction,
                           d.corpus.story_fraction) for d in recipe.datasets]
    # One tokenizer for the mixture, trained on the first dataset (as the demo's first curation does).
    curated = curated or {}
    if curated:
        tokenizer = DreamTokenizer.from_pretrained(str(next(iter(curated.values())) / "tokenizer"))
    else:
        tokenizer = DreamTokenizer.build(cfg.tokenizer, cfg.vision.num_tokens, cfg.dream.num_queries,
                                         corpus_texts=[t for d in corpora[0] for t in d["text_list"]])
    parts = [read_rows(cfg, curated[d.name]) if d.name in curated else
             build_rows(cfg, docs, tokenizer, d.curate.tokenize.packing, d.curate.tokenize.pair_layout)
             for d, docs in zip(recipe.datasets, corpora)]
    weights = [d.weight / sum(x.weight for x in recipe.datasets) for d in recipe.datasets]
    for d, docs, rows in zip(recipe.datasets, corpora, parts):
        print(f"data {d.name} (weight {d.weight:g}): {len(docs)} docs -> {rows['input_ids'].shape[0]} rows of "
              f"{cfg.max_seq_len} tokens, {int((rows['dream_slots'] >= 0).sum())} images", flush=True)
    print(f"data built in {time.time() - t0:.1f}s", flush=True)
    n_rows = sum(p["input_ids"].shape[0] for p in parts)
    n_images = sum(int((p["dream_slots"] >= 0).sum()) for p in parts)

    model = DreamLLM(cfg, tokenizer)
    model.train()
    params = model.trainable_parameters()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable); "
          f"decoder {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M", flush=True)
    groups = optimizer_groups(model, optim)
    emas = {d: [p.detach().clone() for p in params] for d in ema_decays}
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                            weight_decay=optim.weight_decay)
    rng = np.random.default_rng(seed)
    probe_batch = to_torch({k: v[:16] for k, v in parts[0].items()})
    orders = [rng.permutation(p["input_ids"].shape[0]) for p in parts]
    cursors, taken = [0] * len(parts), [0] * len(parts)
    step, history = 0, []
    start, cpu_start = time.time(), time.process_time()
    while step < recipe.train.max_steps:
        # Each dataset's share of the batch by the training job's own rule (pipelines.train.data.mix_counts).
        counts = mix_counts(weights, taken, batch_size)
        pieces = []
        for i, (n, p) in enumerate(zip(counts, parts)):
            taken[i] += n
            if cursors[i] + n > len(orders[i]):
                orders[i], cursors[i] = rng.permutation(len(orders[i])), 0
            idx = orders[i][cursors[i]:cursors[i] + n]
            cursors[i] += n
            pieces.append({k: v[idx] for k, v in p.items()})
        batch = {k: np.concatenate([q[k] for q in pieces]) for k in pieces[0]}
        if trim:  # drop the all-padding tail (causal attention: the result is the same, only faster)
            batch = trim_padding(batch)
        batch = to_torch(batch)
        for group in opt.param_groups:  # the training job's schedule, ramps included
            group["lr"] = group_lr(group, step, optim, recipe.train.max_steps)
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
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
    base = shapes_tiny(workers=1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override on the recipe, e.g. model.decoder.resolution=32 or optim.lr=3e-3")
    p.add_argument("--steps", type=int, help=f"= --set max_steps=N (recipe: {base.train.max_steps})")
    p.add_argument("--lr", type=float, help=f"= --set optim.lr=X (recipe: {base.train.optim.lr})")
    p.add_argument("--batch", type=int, help=f"rows per step (recipe: {base.train.micro_batch_size})")
    p.add_argument("--docs", action="append", default=[], metavar="DATASET=N",
                   help="documents of one dataset of the mixture (recipe: " +
                   ", ".join(f"{d.name}={d.corpus.num_docs}" for d in base.datasets) + ")")
    p.add_argument("--weight", action="append", default=[], metavar="DATASET=W",
                   help="share of one dataset (recipe: " + ", ".join(f"{d.name}={d.weight:g}" for d in base.datasets)
                   + "); 0 leaves it out")
    p.add_argument("--curated", action="append", default=[], metavar="DATASET=DIR",
                   help="train DATASET on a curated folder's rows (e.g. demo-output/data/stories)")
    p.add_argument("--guidance", type=float, help="guidance scale at evaluation (default: the model's decoder.guidance_scale)")
    p.add_argument("--probe-every", type=int, default=0, help="print the condition probe every N steps")
    p.add_argument("--eval-images", type=int, help="held-out images to caption (default --eval-n; 0 skips)")
    p.add_argument("--eval-n", type=int, default=base.eval.num_prompts, help="held-out prompts and images to score")
    p.add_argument("--ema", type=float, action="append", default=[], metavar="DECAY",
                   help="also evaluate an EMA of the weights with this decay (repeatable)")
    p.add_argument("--eval-steps", type=int, default=base.eval.num_inference_steps,
                   help=f"denoising steps at evaluation (recipe: {base.eval.num_inference_steps})")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--speed-only", action="store_true", help="time 25 steps and stop (no evaluation)")
    p.add_argument("--save", type=Path, help="save the trained model here (checkpoint.save_pretrained)")
    p.add_argument("--load", type=Path, help="skip training: evaluate a saved model (e.g. other --guidance)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    flags = {"max_steps": 25 if args.speed_only else args.steps, "optim.lr": args.lr, "micro_batch_size": args.batch}
    train_cfg = load_config(base.train, None, [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)])
    datasets = {d.name: d for d in base.datasets}
    for flag, field_ in (("docs", "num_docs"), ("weight", "weight")):
        for item in getattr(args, flag):
            name, _, value = item.partition("=")
            if name not in datasets or not value:
                p.error(f"--{flag} {item!r}: give DATASET=VALUE with DATASET one of {', '.join(datasets)}")
            d = datasets[name]
            if field_ == "weight":
                datasets[name] = dataclasses.replace(d, weight=float(value))
            else:
                n = min(int(value), 200) if args.speed_only else int(value)
                datasets[name] = dataclasses.replace(d, corpus=dataclasses.replace(d.corpus, num_docs=n))
    curated = {}
    for item in args.curated:
        name, _, folder = item.partition("=")
        if name not in datasets or not folder:
            p.error(f"--curated {item!r}: give DATASET=DIR with DATASET one of {', '.join(datasets)}")
        curated[name] = Path(folder)
    recipe = dataclasses.replace(base, datasets=[d for d in datasets.values() if d.weight > 0],
                                 train=train_cfg.validate())
    print(f"recipe: datasets {[dataclasses.asdict(d) for d in recipe.datasets]}, optim {dataclasses.asdict(recipe.train.optim)}, {recipe.train.max_steps} steps of "
          f"{recipe.train.micro_batch_size} rows (threads {args.threads})", flush=True)

    if args.load:
        from dreamcore.checkpoint import from_pretrained

        model, tokenizer = from_pretrained(args.load)
        stats, emas = {"loaded": str(args.load)}, {}
    else:
        model, tokenizer, stats = train(recipe, log_every=5 if args.speed_only else 50, seed=args.seed,
                                        probe_every=args.probe_every,
                                        ema_decays=tuple(args.ema), curated=curated)
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
    evals = dataclasses.replace(recipe.eval, num_prompts=args.eval_n, num_images=n_images,
                                num_stories=args.eval_n // 3, num_free_stories=args.eval_n // 6,
                                num_inference_steps=args.eval_steps)  # the recipe's at the defaults
    report = evaluate(model, tokenizer, guidance_scale=guidance, **evals.evaluate_kwargs(args.seed))
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
        ema_reports[decay] = evaluate(model, tokenizer, guidance_scale=guidance, **evals.evaluate_kwargs(args.seed))
        print(f"EMA {decay}:")
        for line in ema_reports[decay].lines():
            print("  " + line)
        with torch.no_grad():
            for p, e in zip(model.trainable_parameters(), live):
                p.copy_(e)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                         "recipe": {"datasets": [dataclasses.asdict(d) for d in recipe.datasets],
                                                    "train": to_dict(recipe.train)},
                                         "overrides": args.overrides,
                                         "model": to_dict(model.cfg), "train": stats,
                                         "eval": report.to_dict(),
                                         "eval_ema": {str(d): r.to_dict() for d, r in ema_reports.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
