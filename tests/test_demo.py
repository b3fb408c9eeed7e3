"""The embedded default end to end: corpus -> curate -> train -> quality -> serve -> report.html."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


@pytest.mark.e2e
def test_demo_quick_runs_every_stage_and_writes_the_report(ray_session, tmp_path):
    from pipelines.demo import DEMO_PROMPTS, demo_recipe, run_demo

    recipe = demo_recipe(quick=True)
    assert recipe.train.max_steps == 20 and recipe.train.max_minutes == 0
    assert sum(d.corpus.num_docs for d in recipe.datasets) == 60 and len(recipe.datasets) == 2
    report = run_demo(tmp_path / "demo", recipe, seed=0, prompts=DEMO_PROMPTS[:2])

    html = report.read_text()
    # Served documents made it into the report, with at least one embedded generated image.
    assert "Generated interleaved documents" in html
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{40,}"', html)
    # Each dataset's curation manifest is accounted for; the later ones use the first's tokenizer,
    # and training mixed them by their weights.
    hashes = set()
    for d in recipe.datasets:
        manifest = json.loads((tmp_path / "demo" / "data" / d.name / "manifest.json").read_text())
        for stage in manifest["stages"].values():
            for kind in ("documents", "images"):
                assert stage["in"][kind] == stage["out"][kind] + sum(stage["dropped"][kind].values())
        assert manifest["outputs"]["samples"] > 0
        hashes.add(manifest["tokenizer_hash"])
    assert len(hashes) == 1
    # Training ran through the Ray Train job and exported a loadable model; its curve is plotted.
    assert (tmp_path / "demo" / "run" / "model" / "config.json").is_file()
    assert "training loss" in html
    assert "text-&gt;image colour" in html or "text->image colour" in html
    # Every figure is machine-readable too, with its interval and case count.
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    colour = summary["quality"]["figures"]["image_colour"]
    assert colour["n"] == 12 and colour["low"] <= colour["value"] <= colour["high"]
    assert summary["training"]["steps"] == summary["training"]["recipe_steps"] == 20
    assert not summary["training"]["stopped_early"] and "story_all" in summary["quality"]["figures"]
    final = summary["training"]["final"]
    assert {f"rows_{d.name}" for d in recipe.datasets} <= set(final)


@pytest.mark.e2e
def test_demo_ray_serves_the_state_api_ray_train_polls():
    """Ray Train V2's placement-group cleaner polls the State API every second; without it the demo's
    log carries a "Failed to query Ray Train Controller actor state" warning per poll."""
    code = ("import ray; from ray.util.state import list_actors; from pipelines.demo import start_ray; "
            "start_ray(); list_actors(address=ray.get_runtime_context().gcs_address); print('state api ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "state api ok" in run.stdout, run.stderr[-2000:]
