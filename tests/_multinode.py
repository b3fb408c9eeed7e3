"""Multi-node fault scenarios on one machine, run by tests/test_multinode.py in a child process.

Each scenario starts its own Ray cluster of several nodes on loopback (`ray.cluster_utils.Cluster`:
a head and worker nodes, each a raylet with its own resources and ports), runs a dreamcore job on
it, kills one node by the PID of its raylet (SIGKILL: a machine that vanished, no goodbye) and
writes what happened as JSON. A child process, because a driver can join only one Ray at a time
and the test session already runs its own. One child runs every scenario named, one after another
(each on its own cluster, the S3 server shared): the imports and the S3 server are paid once.

    python tests/_multinode.py OUT.json train    # 2 workers on 2 nodes, checkpoints in S3 (moto)
    python tests/_multinode.py OUT.json curate   # crawl tasks on 3 nodes, a worker node dies
    python tests/_multinode.py OUT.json serve    # LLM and decoder on different nodes; the decoder's dies
    python tests/_multinode.py OUT.json train curate serve

OUT.json maps each scenario to its result, or to {"error": traceback} when it raised.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _train_helpers import TRAIN_MODEL_OVERRIDES, make_data_folder, small_model_config  # noqa: E402

# As tests/conftest.py: a cold Serve proxy on 2 busy cores can take over Serve's 5 s readiness check.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ENV_KEYS = ("RAY_AUTH_MODE", "NO_ALBUMENTATIONS_UPDATE", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM",
            "HF_HUB_OFFLINE", "RAY_DATA_DISABLE_PROGRESS_BARS")


def log(line: str) -> None:
    sys.stderr.write(f"[multinode {time.strftime('%H:%M:%S')}] {line}\n")
    sys.stderr.flush()


_MOTO: dict[str, Any] = {}


def start_moto() -> tuple[Any, str]:
    """moto's S3 server on a free loopback port (one per process, shared by the scenarios), and
    the AWS environment pointing at it."""
    if _MOTO:
        return _MOTO["server"], _MOTO["endpoint"]
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    _MOTO.update(server=server, endpoint=endpoint)
    return server, endpoint


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def kill_node(cluster: Any, node: Any) -> int:
    """SIGKILL the node's raylet and every process it started (its workers: replicas, training
    workers, tasks), by PID and at once, as when a machine vanishes; then reap what is left."""
    import psutil

    pid = raylet_pid(node)
    raylet = psutil.Process(pid)
    for proc in [*raylet.children(recursive=True), raylet]:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return pid


MAX_STEPS, CHECKPOINT_EVERY, KILL_AFTER_STEPS = 10, 4, 2


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a metrics.jsonl being written (a last line still being written is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def kill_after_first_checkpoint(cluster: Any, nodes: list[Any], run: str, runner: threading.Thread,
                                t_start: float) -> dict[str, Any]:
    """Once `run` is KILL_AFTER_STEPS past its first checkpoint, kill the second training node,
    then add a replacement node. The metrics rows rank 0 had written by then are kept for the
    test: the steps after the checkpoint run again after the restart and must give the same losses.

    Past, not at: a checkpoint folder shows up in the bucket with its first uploaded file, before
    Ray Train has registered it; a node killed then loses that checkpoint, and the run rightly
    starts over."""
    from pipelines.train.job import local_run_dir

    metrics = local_run_dir(run) / "metrics.jsonl"  # rank 0's, on this machine (read for the record)
    while runner.is_alive() and time.time() - t_start < 300:
        rows = read_rows(metrics)
        if max((r["step"] for r in rows), default=0) >= CHECKPOINT_EVERY + KILL_AFTER_STEPS:
            fault = {"step_at_kill": rows[-1]["step"], "rows_before_kill": rows,
                     "t_kill_s": round(time.time() - t_start, 2), "raylet_pid": kill_node(cluster, nodes[1])}
            log(f"killed a training node (raylet pid {fault['raylet_pid']}) at step {fault['step_at_kill']}")
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
            fault["t_new_node_s"] = round(time.time() - t_start, 2)
            return fault
        time.sleep(0.2)
    raise RuntimeError(f"{run}: the run ended (or took 300 s) before step {CHECKPOINT_EVERY + KILL_AFTER_STEPS}; "
                       "nothing was killed")


# ----------------------------------------------------------------------------------------------
# Training: 2 workers on 2 nodes, checkpoints in the object store; one node dies mid-run


def train_scenario(work: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from dreamcore import storage

    _, endpoint = start_moto()
    bucket = make_bucket(endpoint)
    data = f"s3://{bucket}/corpus/shapes"
    storage.upload_dir(make_data_folder(work / "data", small_model_config(), num_docs=48, rows_per_shard=12), data)

    # The head runs the driver's side (Train controller, Ray Data); only nodes that advertise the
    # custom resource "trainer" take training workers, one each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        return _train_on(cluster, data, bucket)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_on(cluster: Any, data: str, bucket: str) -> dict[str, Any]:
    import ray

    from dreamcore import storage
    from dreamcore.config import load_config
    from pipelines.train.config import TrainConfig
    from pipelines.train.job import train

    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}})
    sets = ["micro_batch_size=4", "log_every=1", "optim.warmup_steps=1", "data.shuffle_buffer=16",
            "scaling.workers=2", "scaling.cpus_per_worker=0.5", "scaling.resources_per_worker={trainer: 1}",
            "scaling.max_failures=1", "scaling.torch_threads=1", f"max_steps={MAX_STEPS}",
            f"checkpoint.every_steps={CHECKPOINT_EVERY}",
            "checkpoint.keep=2", *[f"model.{s}" for s in TRAIN_MODEL_OVERRIDES]]
    cfg = load_config(TrainConfig(model=small_model_config()), None, sets).validate()

    # Once the run is past its first checkpoint, the second training node dies; no straight run is
    # needed to compare with: the steps between that checkpoint and the kill run twice, and the
    # second time must give the first time's losses (same weights, batches and RNG from the bucket).
    # a new node joins (as a cluster autoscaler would add one) and Ray Train restarts the group.
    # The run goes in a thread: starting a node installs signal handlers, so it is the main thread's.
    faulted = f"s3://{bucket}/runs/faulted"
    done: dict[str, Any] = {}

    def faulted_run() -> None:
        try:
            done["result"] = train(cfg, data, faulted, address=cluster.address)
        except BaseException as e:  # reported below, by the main thread
            done["error"] = e

    t_start = time.time()
    runner = threading.Thread(target=faulted_run, daemon=True)
    runner.start()
    fault = kill_after_first_checkpoint(cluster, nodes, faulted, runner, t_start)
    runner.join(timeout=600)
    faulted_s = time.time() - t_start
    if "error" in done or runner.is_alive():
        raise RuntimeError(f"the faulted run did not finish: {done.get('error', 'still running after 600 s')}")
    result = done["result"]
    log(f"faulted run: {faulted_s:.1f}s, {fault}")

    def metrics(run_uri: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in storage.read_text(f"{run_uri}/metrics.jsonl").splitlines()]

    out = {"faulted": metrics(faulted), "fault": fault, "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY,
           "final_step": result.steps, "faulted_s": round(faulted_s, 1),
           "faulted_checkpoints": sorted(d for d in storage.list_dirs(faulted) if d.startswith("checkpoint_")),
           "faulted_model": sorted(storage.list_files(f"{faulted}/model")),
           "run_files": sorted(storage.list_files(faulted, recursive=False)),
           "config_has_secret": "testing-secret" in storage.read_text(f"{faulted}/train_config.yaml"),
           "metrics_csv_rows": storage.read_text(f"{faulted}/metrics.csv").count("\n") - 1}
    from dreamcore.checkpoint import from_pretrained

    model, tokenizer = from_pretrained(storage.cached_copy(f"{faulted}/model"))  # the export loads
    out["export_loads"] = model.cfg.max_seq_len == 64 and tokenizer.vocab_size == model.llm.config.vocab_size
    return out


# ----------------------------------------------------------------------------------------------
# Curation: crawl tasks on three nodes; one worker node dies mid-crawl


CURATE_DOCS, CURATE_SHARDS, KILL_AFTER_REQUESTS = 96, 4, 60


def curate_scenario(work: Path) -> dict[str, Any]:
    """A run that loses a worker node once the image server has answered KILL_AFTER_REQUESTS of its
    requests; if the job fails, the same command runs again and resumes (what a user would do).
    No straight run is needed to compare with: every document of this corpus is kept, so the output
    must hold each of them in exactly one row, with all of their images."""
    import ray
    from ray.cluster_utils import Cluster

    from dreamcore import synthetic
    from pipelines.curate.config import embedded
    from pipelines.curate.job import curate

    server = synthetic.ImageServer(delay_s=0.05).start()
    docs = synthetic.make_corpus(CURATE_DOCS, seed=5, image_base_url=server.base_url, single_image_fraction=0.5)
    shards = []
    for i in range(CURATE_SHARDS):
        shards.append(work / f"shard-{i}.jsonl")
        shards[-1].write_text("".join(json.dumps(d) + "\n" for d in docs[i::CURATE_SHARDS]))
    cfg = embedded()
    cfg.progress = False
    cfg.crawl.batch_size = 8  # small blocks: tasks on every node, several per node
    cfg.shards_per_commit = 2  # two shard groups: one may be published before the kill

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}})
    try:
        faulted_dir = work / "faulted"
        done: dict[str, Any] = {}

        def faulted_run() -> None:
            try:
                done["manifest"] = curate([str(s) for s in shards], faulted_dir, cfg)
            except BaseException as e:  # the main thread reruns, as a user would
                done["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

        first = server.requests
        t_start = time.time()
        runner = threading.Thread(target=faulted_run, daemon=True)
        runner.start()
        while runner.is_alive() and server.requests - first < KILL_AFTER_REQUESTS:
            time.sleep(0.05)
        fault = {"requests_at_kill": server.requests - first, "t_kill_s": round(time.time() - t_start, 2),
                 "raylet_pid": kill_node(cluster, nodes[1]), "finished_before_kill": not runner.is_alive()}
        groups_at_kill = json.loads((faulted_dir / "manifest.json").read_text())["groups"] \
            if (faulted_dir / "manifest.json").exists() else []
        fault["groups_published_at_kill"] = len(groups_at_kill)
        log(f"killed a worker node (raylet pid {fault['raylet_pid']}) after {fault['requests_at_kill']} image requests")
        cluster.add_node(num_cpus=1)
        runner.join(timeout=600)
        if runner.is_alive():
            raise RuntimeError("the faulted curation still runs after 600 s")
        fault["first_run_error"] = done.get("error")
        if "error" in done:  # the job failed: the same command resumes from the published groups
            log(f"faulted run failed ({done['error']}); rerunning")
            done["manifest"] = curate([str(s) for s in shards], faulted_dir, cfg)
        faulted_s = time.time() - t_start
        log(f"faulted curation: {faulted_s:.1f}s, {fault}")
        return {"faulted": _curation_summary(faulted_dir, done["manifest"]), "fault": fault,
                "documents": CURATE_DOCS, "images": sum(len(d["image_info"]) for d in docs),
                "doc_urls": sorted(d["url"] for d in docs), "shards": CURATE_SHARDS, "faulted_s": round(faulted_s, 1)}
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()


def _curation_summary(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the output holds: the manifest's counts and every (document, rows) and image it wrote."""
    import pyarrow.parquet as pq

    from pipelines.curate import manifest as mf

    rows = pq.read_table([folder / f for f in manifest["outputs"]["files"]], columns=["doc_ids", "image_slots"])
    doc_rows: dict[str, int] = {}
    for ids in rows.column("doc_ids").to_pylist():
        for d in ids:
            doc_rows[d] = doc_rows.get(d, 0) + 1
    return {"samples": manifest["outputs"]["samples"], "stages": manifest["stages"],
            "shards_done": manifest["shards"]["done"], "groups": len(manifest["groups"]),
            "doc_rows": doc_rows, "images_in_rows": sum(len(x) for x in rows.column("image_slots").to_pylist()),
            "invariant_problems": mf.check_invariant(manifest),
            "leftovers": sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))}


# ----------------------------------------------------------------------------------------------
# Serving: the LLM and the decoder on different nodes; the decoder's node dies


SERVE_OUTAGE_REQUESTS, SERVE_RECOVERY_S = 6, 180


def serve_scenario(work: Path) -> dict[str, Any]:
    """Ingress on the head, the LLM on one node, the decoder on another (custom resources pin
    them). After a served image, the decoder's node is killed; requests go on (a bounded number,
    each with a timeout) until a new decoder node has a replica again. Records every answer."""
    import ray
    from _serve_helpers import free_port, make_checkpoint, post_raw
    from ray import serve
    from ray.cluster_utils import Cluster

    from dreamcore import storage
    from pipelines.serve import load_serve_config, start_local

    # The checkpoint is in S3 (moto): every replica downloads it on its own node. The nodes' processes
    # inherit this process's environment (endpoint, credentials, cache folder), as on a real cluster.
    _, endpoint = start_moto()
    os.environ[storage.CACHE_ENV] = str(work / "cache")
    checkpoint = f"s3://{make_bucket(endpoint)}/runs/r1/model"
    storage.upload_dir(make_checkpoint(work / "ckpt"), checkpoint)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "resources": {"head_node": 1}})
    cluster.add_node(num_cpus=1, resources={"llm_node": 1})
    decoder_node = cluster.add_node(num_cpus=1, resources={"decoder_node": 1})
    ray.init(address=cluster.address, runtime_env={"env_vars": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}})
    port = free_port()
    # One HTTP proxy, on the head: the nodes share this machine's loopback, so per-node proxies
    # would contend for one port (on a real cluster each node has its own address).
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    overrides = ["llm.resources={llm_node: 1}", "decoder.resources={decoder_node: 1}",
                 "ingress.resources={head_node: 0.01}", "llm.autoscaling.max_replicas=1",
                 "decoder.autoscaling.max_replicas=1", "ingress.autoscaling.max_replicas=1"]
    cfg = load_serve_config(None, overrides, checkpoint=checkpoint, port=port)
    records: list[dict[str, Any]] = []
    try:
        url = start_local(config=cfg, timeout_s=240)
        body = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 1}

        def ask(phase: str) -> dict[str, Any]:
            t0 = time.time()
            try:
                status, headers, raw = post_raw(url, "/v1/images", body, None, timeout=30)
            except OSError as e:  # a timeout or a reset: a hang or a dropped connection
                status, headers, raw = -1, {}, str(e).encode()
            rec = {"phase": phase, "status": status, "retry_after": headers.get("retry-after"),
                   "latency_s": round(time.time() - t0, 2), "t_s": round(t0 - t_begin, 2)}
            if status != 200:
                try:
                    rec["error"] = json.loads(raw)["error"]
                except (ValueError, KeyError, TypeError):
                    rec["raw"] = raw[:300].decode(errors="replace")
            records.append(rec)
            log(f"{phase}: {status} in {rec['latency_s']} s")
            return rec

        t_begin = time.time()
        before = ask("before")
        pid = kill_node(cluster, decoder_node)
        t_kill = time.time() - t_begin
        log(f"killed the decoder's node (raylet pid {pid})")
        for _ in range(SERVE_OUTAGE_REQUESTS):  # the outage, before any replacement exists
            ask("outage")
            time.sleep(0.5)
        cluster.add_node(num_cpus=1, resources={"decoder_node": 1})
        t_new_node = time.time() - t_begin
        recovered_s = None
        while time.time() - t_begin < t_new_node + SERVE_RECOVERY_S:
            if ask("recovery")["status"] == 200:
                recovered_s = round(time.time() - t_begin - t_new_node, 2)
                break
            time.sleep(1.0)
        return {"before": before, "records": records, "checkpoint": checkpoint,
                "cached_copies": sorted(p.name for p in (work / "cache" / "objects").iterdir()), "t_kill_s": round(t_kill, 2), "raylet_pid": pid,
                "t_new_node_s": round(t_new_node, 2), "recovered_after_new_node_s": recovered_s,
                "recovery_bound_s": SERVE_RECOVERY_S}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"train": train_scenario, "curate": curate_scenario, "serve": serve_scenario}


def main(argv: list[str]) -> int:
    """Runs each named scenario; one that raises is recorded (traceback) and the next still runs."""
    import traceback

    out, names = Path(argv[0]), argv[1:]
    unknown = sorted(set(names) - set(SCENARIOS))
    if not names or unknown:
        sys.stderr.write(f"usage: _multinode.py OUT.json {{{'|'.join(SCENARIOS)}}}...; unknown: {unknown}\n")
        return 2
    results: dict[str, Any] = {}
    try:
        for name in names:
            work = out.parent / f"work-{name}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            try:
                results[name] = SCENARIOS[name](work)
            except Exception:
                results[name] = {"error": traceback.format_exc()[-6000:]}
            results[name]["scenario_s"] = round(time.time() - t0, 1)
            log(f"scenario {name}: {results[name]['scenario_s']} s{' (failed)' if 'error' in results[name] else ''}")
            out.write_text(json.dumps(results, indent=1))
    finally:
        if _MOTO:
            _MOTO["server"].stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
