"""`dreamcore demo`: every stage on a local Ray with the embedded default, ending in an HTML report.

No GPU, no network: a synthetic corpus of coloured-shape documents whose images a loopback HTTP
server renders; curation crawls that server (Ray Data), training runs the `tiny` preset on Ray
Train + DeepSpeed (CPU workers), the exported checkpoint is scored on held-out prompts and images,
then served on Ray Serve and asked for interleaved documents over HTTP. A real run changes only
configuration (real shards, weights by path, a cluster address); the code path is the same.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipelines.recipe import Recipe, shapes_tiny
from pipelines.train.config import MixtureEntry

log = logging.getLogger("dreamcore.demo")

DEMO_PROMPTS = [
    "A short story about shapes. First, a large red circle in the center.",
    "Here is a small blue square on the left.",
    "Let me draw a green triangle.",
    "Picture this: a large yellow circle at the top.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo-output", help="folder for data, run, report (default: demo-output)")
    p.add_argument("--docs", type=int, default=None,
                   help="synthetic documents to curate (default: the recipe's corpus size)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers (default: the recipe's, at most one per core)")
    p.add_argument("--train-minutes", type=float, default=0.0,
                   help="optional wall-clock cap on training (default: none; the recipe is a number of steps)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few documents and steps (what the end-to-end test runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training config overrides, e.g. --set max_steps=500")


def _cores() -> int:
    """The cores this process may run on (`taskset -c 0 make demo` gives 1), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_ray() -> None:
    """A local Ray on this process's cores, with the dashboard on 127.0.0.1 (unless Ray is running).

    The dashboard serves Ray's State API, which Ray Train V2's placement-group cleaner (a detached
    actor) asks once a second whether the train controller is alive; without it every ask fails and
    logs "Failed to query Ray Train Controller actor state", hundreds of times a run. 127.0.0.1 only:
    a dashboard reachable from other machines lets them run code (CVE-2023-48022).
    """
    import ray

    if not ray.is_initialized():
        # address="local": a new Ray even where /tmp/ray/ray_current_cluster names another (a
        # `ray start` cluster, or a stale file), which ray.init() would join and then refuse num_cpus.
        ray.init(address="local", num_cpus=_cores(), include_dashboard=True, dashboard_host="127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(n: int, title: str) -> float:
    print(f"\n== {n}. {title}", flush=True)
    return time.perf_counter()


QUICK_DOCS = 60


def demo_recipe(workers: int | None = None, docs: int | None = None, quick: bool = False,
                train_minutes: float = 0.0, overrides: list[str] | None = None) -> Recipe:
    """`pipelines.recipe.shapes_tiny` with the demo's flags applied (the one place they apply).

    `docs` scales every dataset of the mixture to that many documents in all, in proportion.
    """
    from dreamcore.config import load_config

    cores = _cores()
    recipe = shapes_tiny(workers or min(2, cores))
    total = sum(d.corpus.num_docs for d in recipe.datasets)
    if quick:  # 60 documents: a few packed rows of each dataset per worker
        docs = min(docs or total, QUICK_DOCS)
    if docs:
        recipe.datasets = [dataclasses.replace(d, corpus=dataclasses.replace(
            d.corpus, num_docs=max(1, round(docs * d.corpus.num_docs / total)))) for d in recipe.datasets]
    train = recipe.train
    # The cores are shared out as torch threads (Ray would give a 0.5-CPU worker one thread; PNG
    # decode for ingest is cheap next to the step, and the decoded corpus is cached after epoch 1).
    train.scaling.torch_threads = max(1, cores // train.scaling.workers)
    train.max_minutes = train_minutes
    if quick:
        train.max_steps, train.micro_batch_size, train.log_every = 20, 2, 5
        train.checkpoint.every_steps = 10
    evals = (dataclasses.replace(recipe.eval, num_prompts=12, num_images=12, num_stories=2, num_free_stories=2)
             if quick else recipe.eval)
    train = load_config(train, None, overrides or []).validate()
    return dataclasses.replace(recipe, train=train, eval=evals)


def run_demo(output: str | Path, recipe: Recipe | None = None, seed: int = 0,
             prompts: list[str] | None = None) -> Path:
    """Run every stage of `recipe` (default: `demo_recipe()`), then serve `prompts` (default:
    DEMO_PROMPTS); returns the path of report.html."""
    from dreamcore import synthetic
    from dreamcore.checkpoint import from_pretrained
    from dreamcore.config import to_dict
    from pipelines.curate.job import curate
    from pipelines.serve.app import shutdown, start_local
    from pipelines.train.job import train

    recipe = recipe or demo_recipe()
    prompts = DEMO_PROMPTS if prompts is None else prompts
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    workers = recipe.train.scaling.workers
    manifests: dict[str, dict[str, Any]] = {}
    mixture: list[MixtureEntry] = []

    with synthetic.ImageServer() as server:
        # 1. The corpora: MMC4-format JSONL whose image URLs point at the loopback image server.
        t0 = _step(1, "synthetic corpora (MMC4-format documents, images at " + server.base_url + "): " + ", ".join(
            f"{d.name} {d.corpus.num_docs}" for d in recipe.datasets))
        raw = out / "raw"
        raw.mkdir(exist_ok=True)
        shards = {}
        for d in recipe.datasets:
            corpus = synthetic.make_corpus(d.corpus.num_docs, seed=seed + d.corpus.seed, image_base_url=server.base_url,
                                           single_image_fraction=d.corpus.single_image_fraction,
                                           story_fraction=d.corpus.story_fraction)
            shards[d.name] = raw / f"{d.name}-000.jsonl"
            shards[d.name].write_text("".join(json.dumps(doc) + "\n" for doc in corpus))
        timings["corpus_s"] = time.perf_counter() - t0

        start_ray()

        # 2. Curate each dataset on Ray Data: crawl the loopback server, filter, tokenize, write
        # Parquet. The first trains the tokenizer; the others are tokenized with it.
        t0 = _step(2, "curate (Ray Data): crawl -> filter -> tokenize -> Parquet, one folder per dataset")
        tokenizer_dir: Path | None = None
        for d in recipe.datasets:
            cfg = copy.deepcopy(d.curate)
            if tokenizer_dir is not None:
                cfg.model_overrides = {**cfg.model_overrides, "tokenizer": {"name_or_path": str(tokenizer_dir)}}
            folder = out / "data" / d.name
            manifests[d.name] = curate([str(shards[d.name])], folder, cfg)
            tokenizer_dir = tokenizer_dir or folder / "tokenizer"
            mixture.append(MixtureEntry(path=str(folder), weight=d.weight, name=d.name))
            print(f"   {d.name}: {manifests[d.name]['outputs']['samples']} samples "
                  f"({d.curate.tokenize.pair_layout}, {d.curate.tokenize.packing})")
        timings["curate_s"] = time.perf_counter() - t0

    # 3. Train the tiny preset on Ray Train + DeepSpeed (CPU workers), export the model.
    t0 = _step(3, f"train (Ray Train + DeepSpeed, {workers} CPU worker(s), {recipe.train.max_steps} steps, mixture "
                  + " + ".join(f"{e.name} {e.weight:g}" for e in mixture) + ")")
    run_dir = out / "run"
    train_cfg = copy.deepcopy(recipe.train)
    train_cfg.data.mixture = mixture
    result = train(train_cfg, None, run_dir)
    timings["train_s"] = time.perf_counter() - t0

    # 4. Score the exported model on held-out prompts and images, through the serving engine.
    t0 = _step(4, "quality on held-out prompts and images")
    model, tokenizer = from_pretrained(result.export_dir)
    e = recipe.eval
    scores = synthetic.evaluate(model, tokenizer, **e.evaluate_kwargs(seed))
    del model
    timings["quality_s"] = time.perf_counter() - t0
    for line in scores.lines():
        print(f"   {line}")
    stopped_early = result.steps < recipe.train.max_steps
    if stopped_early:
        print(f"\n   WARNING: training stopped at step {result.steps} of the recipe's {recipe.train.max_steps} "
              f"(--train-minutes={recipe.train.max_minutes}); these figures are below the recipe's.\n", flush=True)

    # 5. Serve on Ray Serve and ask for interleaved documents over HTTP.
    t0 = _step(5, "serve (Ray Serve: LLMServer + ImageDecoder + Ingress) and request documents")
    from dreamcore import client

    documents: list[dict[str, Any]] = []
    url = start_local(checkpoint=str(result.export_dir), host="127.0.0.1", port=_free_port(),
                      overrides=["llm.num_cpus=0", "decoder.num_cpus=0", "ingress.num_cpus=0"])
    try:
        for i, prompt in enumerate(prompts):
            reply = client.generate(url, prompt, max_new_tokens=48, max_images=2, seed=seed + i,
                                    temperature=0.7, top_p=0.9)
            documents.append({"prompt": prompt, "parts": reply["parts"], "finish_reason": reply.get("finish_reason")})
            kinds = [p["type"] for p in reply["parts"]]
            print(f"   prompt {i + 1}: {len(kinds)} parts ({kinds.count('image')} image(s))")
    finally:
        shutdown()
    timings["serve_s"] = time.perf_counter() - t0

    # 6. The report.
    summary = {"recipe": {"datasets": [dataclasses.asdict(d) for d in recipe.datasets],
                          "eval": dataclasses.asdict(recipe.eval), "train": to_dict(train_cfg)},
               "training": {"steps": result.steps, "recipe_steps": recipe.train.max_steps,
                            "stopped_early": stopped_early, "final": result.metrics},
               "curation": {name: {"samples": m["outputs"]["samples"], "stages": m["stages"]}
                            for name, m in manifests.items()},
               "quality": scores.to_dict(), "timings_s": timings,
               "served": [{"prompt": d["prompt"], "finish_reason": d["finish_reason"],
                           "images": sum(p["type"] == "image" for p in d["parts"])} for d in documents]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report = write_report(out / "report.html", documents, manifests, run_dir, scores, timings, url, stopped_early)
    print(f"\nreport: {report}")
    return report


def _training_curve(run_dir: Path) -> bytes | None:
    from dreamcore.report import plot_png

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        return None
    series = {}
    for key in ("loss", "lm_loss", "vm_loss"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            series[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return plot_png(series, title="training loss", xlabel="step", ylabel="loss")


def _manifest_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage, s in manifest.get("stages", {}).items():
        dropped = s.get("dropped", {})
        reasons = ", ".join(f"{k}: {v}" for kind in ("documents", "images")
                            for k, v in sorted(dropped.get(kind, {}).items()))
        rows.append({
            "stage": stage,
            "documents in": s["in"]["documents"], "documents out": s["out"]["documents"],
            "images in": s["in"]["images"], "images out": s["out"]["images"],
            "dropped (reason: n)": reasons or "-",
        })
    return rows


def _quality_rows(scores: Any) -> list[dict[str, Any]]:
    from dreamcore.synthetic import FIGURE_LABELS

    return [{"measure": FIGURE_LABELS[name], "value": f"{f.value:.1%}", "95% interval": f"{f.low:.1%} - {f.high:.1%}",
             "cases": f"{f.hits}/{f.n}", "chance": "-" if f.chance is None else f"{f.chance:.1%}"}
            for name, f in scores.figures.items()]


def _confusion_html(scores: Any, task: str = "image") -> str:
    from dreamcore.report import table_html

    out = []
    for attribute, table in scores.confusion.get(task, {}).items():
        rows = [{"true \\ read": true, **{r: n for r, n in reads.items() if r != "none" or n}}
                for true, reads in table.items()]
        out.append(table_html(rows, caption=f"{task}: {attribute}"))
    return "\n".join(out)


def _examples_html(scores: Any) -> str:
    from dreamcore.report import document_html, img_tag

    out = ['<div class="grid">']
    for ex in scores.examples:
        task = ex["task"]
        if task == "text_to_image":
            out.append(document_html([{"type": "image", "image": ex["png"]}], prompt=ex["prompt"],
                                     meta=f"read: {ex['read']}"))
        elif task == "caption":
            out.append(f'<section class="doc">{img_tag(ex["png"], "held-out image")}'
                       f'<div class="text">{html.escape(ex["caption"])}</div>'
                       f'<div class="meta">truth: {html.escape(str(ex["truth"]))}</div></section>')
        elif task == "story":
            parts = [p for s, png in zip(ex["sentences"], ex["pngs"]) for p in (s, {"type": "image", "image": png})]
            out.append(document_html(parts, title="held-out story (change sentences given)",
                                     meta=f"captions written: {ex['captions']}"))
        elif task == "free_story":
            parts = [p["text"] if "text" in p else {"type": "image", "image": p["png"]} for p in ex["parts"]]
            out.append(document_html(parts, title="story the model wrote", prompt=ex["prompt"],
                                     meta=f"finish: {ex['finish_reason']}"))
    out.append("</div>")
    return "\n".join(out)


def write_report(path: Path, documents: list[dict[str, Any]], manifests: dict[str, dict[str, Any]], run_dir: Path,
                 scores: Any, timings: dict[str, float], url: str, stopped_early: bool = False) -> Path:
    from dreamcore.report import document_html, figure_html, page_html, table_html

    sections = ["<p class='meta'>Embedded default: synthetic shapes corpus, tiny preset, local Ray. "
                f"Served at {url} during the run. Every figure is also in summary.json.</p>"]
    if stopped_early:
        sections.append("<p><b>Training stopped before the recipe's last step (a time cap): the figures below "
                        "are below the recipe's.</b></p>")
    sections.append("<h2>Generated interleaved documents (served over HTTP)</h2>")
    for d in documents:
        sections.append(document_html(d["parts"], prompt=d["prompt"]))
    sections.append("<h2>Quality on held-out cases (95% Wilson intervals; generated by the serving engine)</h2>")
    sections.append(table_html(_quality_rows(scores)))
    sections.append("<h2>Held-out examples</h2>")
    sections.append(_examples_html(scores))
    sections.append("<h2>Attribute confusion (text->image: true attribute vs what the scorer read)</h2>")
    sections.append(_confusion_html(scores))
    for name, manifest in manifests.items():
        sections.append(f"<h2>Curation manifest: {html.escape(name)}</h2>")
        sections.append(table_html(_manifest_rows(manifest)))
        sections.append(table_html({"samples": manifest["outputs"]["samples"],
                                    "files": len(manifest["outputs"]["files"])}))
    curve = _training_curve(run_dir)
    sections.append("<h2>Training</h2>")
    if curve:
        sections.append(figure_html(curve, "training loss"))
    sections.append(table_html({k: round(v, 1) for k, v in timings.items()}, caption="stage durations (s)"))
    path.write_text(page_html("dreamcore demo report", sections))
    return path


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = demo_recipe(args.workers, args.docs, args.quick, args.train_minutes, args.overrides)
    run_demo(args.output, recipe, seed=args.seed, prompts=DEMO_PROMPTS[:2] if args.quick else DEMO_PROMPTS)
    return 0
