"""Several Ray nodes on one machine (ray.cluster_utils.Cluster on loopback), one killed by PID mid-run.

The scenarios run in one child process (tests/_multinode.py), one after another, each starting and
shutting down its own cluster: a driver joins one Ray at a time, and this session already has one.
The child writes what happened as JSON; the assertions are here. Only the scenarios of the tests
selected run (`pytest -k curate` starts one cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_multinode.py")


# ray.cluster_utils.Cluster records its head in Ray's "current cluster" file, which a later ray.init()
# without an address would try to join; a clean shutdown removes it, a killed child would not.
CURRENT_CLUSTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def run_scenarios(names: list[str], tmp_path: Path, timeout_s: int = 1200) -> dict:
    out = tmp_path / "scenarios.json"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *names], env=env, timeout=timeout_s,
                              capture_output=True, text=True)
    finally:  # leave the machine's "current cluster" as it was
        now = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
        if now != before and before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        elif now != before:
            CURRENT_CLUSTER.write_text(before)
    stderr = "\n".join(line for line in proc.stderr.splitlines() if "HTTP/1.1" not in line)
    results = json.loads(out.read_text()) if out.exists() else {}
    return {name: results.get(name, {"error": f"no result (exit {proc.returncode}):\n{stderr[-6000:]}"})
            for name in names}


SCENARIO_OF = {  # test -> the scenario whose record it checks
    "test_training_node_killed_resumes_from_the_bucket_with_the_same_losses": "train",
    "test_curation_node_killed_mid_crawl_loses_and_duplicates_nothing": "curate",
    "test_decoder_node_killed_answers_503_until_a_replica_is_back": "serve",
}


@pytest.fixture(scope="module")
def scenarios(request, tmp_path_factory) -> dict:
    """The records of the scenarios this session's selected tests check, from one child process."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    names = [s for t, s in SCENARIO_OF.items() if t in selected]
    return run_scenarios(names, tmp_path_factory.mktemp("multinode"))


def record(scenarios: dict, name: str) -> dict:
    r = scenarios[name]
    if "error" in r:
        pytest.fail(f"scenario {name} failed:\n{r['error']}")
    return r


@pytest.mark.e2e
def test_training_node_killed_resumes_from_the_bucket_with_the_same_losses(scenarios):
    """2 workers on 2 nodes, checkpoints in S3 (moto): the node of one worker dies two steps after
    the first checkpoint; a new node joins; FailureConfig restarts the group from the checkpoint in
    the bucket, and the run ends at its last step with the metrics history whole."""
    r = record(scenarios, "train")
    fault, every = r["fault"], r["checkpoint_every"]
    assert every < fault["step_at_kill"] < r["max_steps"], fault  # killed mid-run, after a checkpoint
    assert r["final_step"] == r["max_steps"]
    # The attempt after the kill began at a checkpoint (not at step 0), at or before the kill.
    rows = r["faulted"]
    resumed = {m["resumed_from"] for m in rows} - {0}
    assert len(resumed) == 1, rows
    start = resumed.pop()
    assert start % every == 0 and every <= start <= fault["step_at_kill"], (start, fault["step_at_kill"])
    # The history in the bucket is whole: the rows up to the checkpoint (carried by it, whether or
    # not rank 0 lived to publish its own), then the new attempt's, to the last step.
    steps = [m["step"] for m in rows]
    assert steps[-(r["max_steps"] - start):] == list(range(start + 1, r["max_steps"] + 1)), steps
    assert sorted(set(steps)) == list(range(1, r["max_steps"] + 1)), steps
    rows = list({m["step"]: m for m in rows}.values())  # the last row of each step (read_metrics' rule)
    assert all(m["resumed_from"] == (0 if m["step"] <= start else start) for m in rows), rows
    # The steps between the checkpoint and the kill ran twice: the second time (weights, optimizer,
    # batches and RNG from the bucket) gives the losses of the first, read before the kill.
    before = {m["step"]: m for m in fault["rows_before_kill"]}
    replayed = [m for m in rows if start < m["step"] <= max(before)]
    assert replayed, (start, sorted(before))
    for m in [*replayed, *(m for m in rows if m["step"] <= start)]:
        for key in ("loss", "lm_loss", "vm_loss"):
            assert m[key] == pytest.approx(before[m["step"]][key], rel=1e-5, abs=1e-7), (m["step"], key)
    # The run folder in the bucket: configs (no credentials in them), metrics, and the export,
    # in the ecosystem's layout, loading with from_pretrained after download.
    assert {"config.json", "projectors.safetensors"} <= set(r["faulted_model"])
    assert {n.split("/")[0] for n in r["faulted_model"]} >= {"llm", "vision", "unet", "scheduler", "tokenizer"}
    assert {"train_config.yaml", "deepspeed_config.json", "metrics.jsonl", "metrics.csv"} <= set(r["run_files"])
    assert not r["config_has_secret"] and r["export_loads"]
    assert r["metrics_csv_rows"] == len(r["faulted"])


@pytest.mark.e2e
def test_curation_node_killed_mid_crawl_loses_and_duplicates_nothing(scenarios):
    """Crawl tasks on three nodes; a worker node dies mid-crawl. Ray retries the lost tasks (or the
    job fails and the same command resumes). Every document of the corpus is one a straight run
    keeps, so the output must hold each in exactly one row with all its images."""
    r = record(scenarios, "curate")
    fault, out = r["fault"], r["faulted"]
    assert not fault["finished_before_kill"], fault
    assert out["invariant_problems"] == [] and out["leftovers"] == []
    assert len(out["doc_rows"]) == r["documents"], (len(out["doc_rows"]), r["documents"])  # nothing lost
    assert set(out["doc_rows"].values()) == {1}, out["doc_rows"]  # nothing written twice
    assert out["images_in_rows"] == r["images"]
    stages = out["stages"]
    assert stages["read"]["in"] == stages["write"]["out"] == {"documents": r["documents"], "images": r["images"]}
    assert len(set(out["shards_done"])) == r["shards"]


@pytest.mark.e2e
def test_decoder_node_killed_answers_503_until_a_replica_is_back(scenarios):
    """The LLM and the decoder on different nodes; the decoder's node dies. Every request during
    the outage is answered promptly with 503 + Retry-After in the API's error shape (never a hang,
    never a 500); once a new node joins, Serve starts a decoder replica there and images come back."""
    r = record(scenarios, "serve")
    assert r["before"]["status"] == 200, r["before"]
    assert r["checkpoint"].startswith("s3://") and len(r["cached_copies"]) == 1  # replicas fetched it themselves
    outage = [x for x in r["records"] if x["phase"] == "outage"]
    assert outage and all(x["status"] == 503 for x in outage), outage
    for x in outage:
        assert x["retry_after"] and int(x["retry_after"]) >= 1, x
        assert x["latency_s"] < 15, x  # answered (6.2 s at most measured), not queued for a missing replica
        assert {"message", "type", "request_id"} <= set(x["error"]), x
    recovery = [x for x in r["records"] if x["phase"] == "recovery"]
    assert all(x["status"] in (200, 503) for x in recovery), recovery
    assert r["recovered_after_new_node_s"] is not None, recovery[-3:]
    assert recovery[-1]["status"] == 200
