"""`dreamcore submit`: argument handling (fast), and real jobs on a real Ray head (e2e).

The e2e tests start their own head with `ray start --head` on 127.0.0.1, on free ports and a
private temp dir, and talk to it only over HTTP through the real CLI in subprocesses: the pytest
process stays disconnected from it (the session's `ray_session` fixture is a separate, in-process
Ray). Teardown stops exactly that head's process tree, never `ray stop` (which is machine-wide).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import submit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The curation tests' loopback image server (tests/_curate_helpers.py) serves the crawled images.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamcore submit")
    submit.add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Fast: command line -> job


def test_submit_options_are_taken_from_anywhere_and_the_rest_goes_to_the_stage():
    args = parse(["curate", "in.jsonl", "--output", "s3://b/data", "--address", "http://h:8265",
                  "--env", "A=1", "--set", "crawl.threads=4", "--no-wait", "--pip", "x==1"])
    stage_args = submit.split_rest(args)
    assert stage_args == ["in.jsonl", "--output", "s3://b/data", "--set", "crawl.threads=4"]
    assert args.address == "http://h:8265" and args.no_wait and args.env == ["A=1"]
    spec = submit.build_spec(args, stage_args)
    assert spec.entrypoint == "python -m dreamcore.cli curate in.jsonl --output s3://b/data --set crawl.threads=4"
    env = spec.runtime_env()
    assert env["working_dir"] == str(REPO)
    assert {".venv", "runs", "demo-output"} <= set(env["excludes"])
    assert env["env_vars"]["A"] == "1" and env["pip"] == ["x==1"]


def test_arguments_after_double_dash_reach_the_stage_verbatim():
    # `train` has its own --address (a Ray address); after `--` it is the stage's, not submit's.
    args = parse(["train", "--address", "http://h:8265", "--", "--data", "d", "--address", "auto"])
    assert submit.split_rest(args) == ["--data", "d", "--address", "auto"]
    assert args.address == "http://h:8265"


def test_entrypoint_quotes_arguments_with_spaces():
    args = parse(["curate", "my docs/a b.jsonl", "--output", "o"])
    spec = submit.build_spec(args, submit.split_rest(args))
    assert "'my docs/a b.jsonl'" in spec.entrypoint


def test_image_and_no_working_dir():
    args = parse(["serve", "--no-working-dir", "--image", "reg/dreamcore:1", "--checkpoint", "/m"])
    spec = submit.build_spec(args, submit.split_rest(args))
    env = spec.runtime_env()
    assert "working_dir" not in env and env["image_uri"] == "reg/dreamcore:1"
    assert spec.stage_args == ["--checkpoint", "/m"]


def test_an_installed_package_is_not_uploaded_as_working_dir(monkeypatch, tmp_path):
    fake = tmp_path / "site-packages" / "pipelines" / "submit.py"
    fake.parent.mkdir(parents=True)
    (tmp_path / "site-packages" / "dreamcore").mkdir()
    (tmp_path / "site-packages" / "dreamcore" / "cli.py").write_text("")
    monkeypatch.setattr(submit, "__file__", str(fake))
    with pytest.raises(submit.SubmitError, match="--no-working-dir"):
        submit.project_root()


@pytest.mark.parametrize("address,fix", [
    (None, "--address http://HEAD:8265"),
    ("ray://h:10001", "not a dashboard URL"),
    ("h:6379", "not a dashboard URL"),
])
def test_bad_addresses_get_one_clear_message(monkeypatch, address, fix):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(submit.SubmitError, match=re.escape(fix)):
        submit.resolve_address(address)


def test_bad_env_and_working_dir_are_named(tmp_path):
    with pytest.raises(submit.SubmitError, match="--env 'NOVALUE' is not KEY=VALUE"):
        submit.parse_env(["NOVALUE"])
    args = parse(["train", "--working-dir", str(tmp_path / "missing")])
    with pytest.raises(submit.SubmitError, match="is not a directory"):
        submit.build_spec(args, submit.split_rest(args))


def test_unreachable_head_is_a_clear_error_not_a_traceback(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = submit.main(parse(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the Ray Jobs API" in err and "Traceback" not in err


def test_actions_need_exactly_one_job_id(capsys):
    assert submit.main(parse(["logs", "--address", "http://127.0.0.1:1"])) == 2
    assert "takes one JOB_ID" in capsys.readouterr().err


def test_bad_stage_flags_fail_before_anything_is_uploaded(capsys):
    # No head listens on port 1: a stage-argument error must come first, as one line.
    rc = submit.main(parse(["train", "--data", "d", "--output", "o", "--preset", "tiny",
                            "--address", "http://127.0.0.1:1"]))
    err = capsys.readouterr().err
    assert rc == 2 and "dreamcore train: unrecognized arguments: --preset tiny" in err
    assert err.count("\n") == 1 and "cannot reach" not in err
    with pytest.raises(submit.SubmitError, match="--profile"):
        submit.check_stage_args("curate", ["in.jsonl", "--output", "o", "--profile", "public"])
    with pytest.raises(submit.SubmitError, match="--workers"):
        submit.check_stage_args("train", ["--data", "d", "--output", "o", "--workers", "many"])
    submit.check_stage_args("curate", ["in.jsonl", "--output", "o", "--profile", "embedded", "--model", "tiny"])
    submit.check_stage_args("train", ["--data", "d", "--output", "o", "--model", "dreamllm-7b", "--gpu"])
    submit.check_stage_args("serve", ["--checkpoint", "/m", "--port", "8001", "--set", "host=0.0.0.0"])
    submit.check_stage_args("train", ["--help"])  # the job prints the cluster's help


def test_stage_flags_are_not_checked_against_other_code(capsys):
    # With --no-working-dir the image's dreamcore runs the stage: its flags may differ from ours.
    rc = submit.main(parse(["train", "--future-flag", "--no-working-dir", "--address", "http://127.0.0.1:1"]))
    assert rc == 2 and "cannot reach the Ray Jobs API" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A real head


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu",
               NO_ALBUMENTATIONS_UPDATE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_DATA_DISABLE_PROGRESS_BARS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _process_tree(pgid: int):
    """Every process of the head: its process group (ray start's daemons) and all their descendants
    (workers and job drivers get their own groups)."""
    import psutil

    roots = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                roots.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    tree = set(roots)
    for p in roots:
        try:
            tree |= set(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return tree


def _stop_head(pgid: int) -> None:
    import psutil

    tree = _process_tree(pgid)
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)  # some daemons ignore SIGTERM: kill after 5 s
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def local_head(**env: str) -> Iterator[str]:
    """A Ray head of its own (dashboard = Jobs API on 127.0.0.1); yields the dashboard URL."""
    # Short: Unix socket paths are capped at 107 bytes. Private: `ray start` writes the head's address
    # file (ray_current_cluster) there, not in /tmp/ray, so no other process's `ray.init()` attaches
    # to this head; free ports keep it off the other engineers' and the session's Ray.
    temp = tempfile.mkdtemp(prefix="dch", dir="/tmp")
    (gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr) = _free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--include-dashboard=true", "--dashboard-port", str(dash),
        "--num-cpus", "2", "--temp-dir", temp, "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--disable-usage-stats",
    ]
    # start_new_session: the head's daemons share this group, so teardown finds them all.
    proc = subprocess.Popen(cmd, env={**_env(), **env}, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pgid = proc.pid
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")
        url = f"http://127.0.0.1:{dash}"
        _wait_for_jobs_api(url)
        yield url
    finally:
        _stop_head(pgid)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    with local_head() as url:
        yield url


def _wait_for_jobs_api(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # up, and asking for a token
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the Jobs API at {url} did not come up in {timeout} s")
        time.sleep(1)


def dreamcore(*argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    return subprocess.run([str(BIN / "dreamcore"), *argv], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted job (\S+)", proc.stdout)
    assert m, f"no job id printed:\n{proc.stdout}\n{proc.stderr}"
    return m.group(1)


@pytest.mark.e2e
def test_failed_job_exits_nonzero_with_the_stage_error(ray_head):
    proc = dreamcore("submit", "train", "--data", "/nonexistent/data", "--output", "/tmp/never",
                     "--address", ray_head)
    job = job_id_of(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"job {job} FAILED" in proc.stderr
    assert "/nonexistent/data" in proc.stdout  # the stage's own message, streamed from the cluster
    status = dreamcore("submit", "status", job, "--address", ray_head)
    assert status.returncode == 0 and f"{job} FAILED" in status.stdout


@pytest.mark.e2e
def test_unknown_job_id_is_a_clear_error(ray_head):
    proc = dreamcore("submit", "logs", "raysubmit_doesnotexist", "--address", ray_head)
    assert proc.returncode == 2
    assert "no job 'raysubmit_doesnotexist'" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Real stages: curate a small corpus whose images a loopback server serves, then train on it.


@pytest.fixture(scope="module")
def image_server():
    from _curate_helpers import CaseServer, image_bytes

    images = {f"{i}.png": image_bytes("PNG", (32, 32), seed=i) for i in range(12)}
    with CaseServer(images) as server:
        yield server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, image_server) -> Path:
    from _curate_helpers import mmc4_doc, write_jsonl

    docs = [mmc4_doc(f"https://example.com/{d}", [f"{image_server.base}/img/{(2 * d + k) % 12}.png"
                                                   for k in range(2)], n_sent=3, offset=d)
            for d in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs)


RUNBOOK = REPO / "docs" / "operations.md"


def runbook_commands() -> list[str]:
    """The `dreamcore submit` lines of the runbook block in docs/operations.md, as written there."""
    text = RUNBOOK.read_text()
    block = text.split("<!-- runbook: tests/test_submit.py reads this block -->", 1)[1]
    block = block.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("dreamcore submit ")]


def debug_substitutions(paths: dict[str, str], head: str, port: int) -> list[tuple[str, str]]:
    """What changes between the runbook and this machine: inputs and storage are local folders, the
    7B preset is the debug one with its weights by path, one CPU worker for two steps per stage,
    the loopback image server needs the embedded curation profile, the head and port are ours."""
    weights = paths["weights"]
    curate_tok = f"--set model_overrides.tokenizer.name_or_path={weights['tokenizer']}"
    train_weights = " ".join(f"--set model.{k}.name_or_path={v}" for k, v in weights.items())
    steps = "--set grad_accum=1 --set max_steps=2 --set micro_batch_size=1 --set checkpoint.every_steps=2"
    return [
        ("s3://acme-ml/raw/laion-pairs/", paths["pairs"]),
        ("s3://acme-ml/raw/mmc4/*.jsonl.gz", paths["mmc4"]),
        ("s3://acme-ml/raw/llava/llava_instruct_150k.json", paths["llava"]),
        ("s3://acme-ml/raw/coco/train2017", paths["coco"]),
        ("/mnt/dreamcore", paths["root"]),
        ("dreamcore submit curate", "dreamcore submit curate --profile embedded"),
        ("--model dreamllm-7b --set tokenize", f"--model dreamllm-debug {curate_tok} --set tokenize"),
        ("--model dreamllm-7b --address", "--model dreamllm-debug " + curate_tok + " --address"),
        ("--model dreamllm-7b --set image_root", f"--model dreamllm-debug {curate_tok} --set image_root"),
        ("--model dreamllm-7b --stage", f"--model dreamllm-debug {train_weights} --stage"),
        ("--workers 8 --gpu", "--workers 1"),
        ("--set grad_accum=16", steps), ("--set grad_accum=2", steps),
        ("--port 8000", f"--port {port} --no-wait"),
        ("http://127.0.0.1:8265", head),
    ]


@pytest.mark.e2e
def test_the_runbook_end_to_end(ray_head, corpus, tmp_path):
    """docs/operations.md's recipe, line by line through `dreamcore submit` on a real head: curate
    pairs (img2dataset output), documents and conversations for the debug preset (the 7B code path,
    weights loaded from library folders); train stage I -> II (a mixture) -> SFT, each from the
    last one's export; serve the SFT model as a job and chat with it through the `openai` client."""
    import base64
    import io

    import httpx
    import openai
    from _pretrained_helpers import write_debug_weights
    from PIL import Image
    from test_stage_data import _img2dataset_output, _llava

    from dreamcore.checkpoint import from_pretrained

    paths = {"weights": write_debug_weights(tmp_path / "weights"), "root": str(tmp_path / "mnt"),
             "pairs": str(_img2dataset_output(tmp_path / "pairs", "parquet")), "mmc4": str(corpus),
             "llava": str(_llava(tmp_path / "llava")), "coco": str(tmp_path / "llava")}
    (port,) = _free_ports(1)
    commands = runbook_commands()
    assert [c.split()[2] for c in commands] == ["curate"] * 3 + ["train"] * 3 + ["serve"]
    jobs = []
    for line in commands:
        for old, new in debug_substitutions(paths, ray_head, port):
            line = line.replace(old, new)
        assert "s3://" not in line and "dreamllm-7b" not in line, line
        proc = dreamcore(*line.split()[1:])
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
        jobs.append(job_id_of(proc))
        if " train " in line:
            assert "trained 2 steps" in proc.stdout

    mnt = Path(paths["root"])
    for name in ("pairs-v1", "mmc4-v1", "sft-v1"):
        assert json.loads((mnt / "data" / name / "manifest.json").read_text())["outputs"]["samples"] > 0, name
    model, _ = from_pretrained(mnt / "runs" / "sft-r1" / "model")
    assert model.cfg.stage == "SFT" and model.decoder.vae_scale == 8  # the 7B code path, SFT-trained
    assert f"{jobs[3]} SUCCEEDED" in dreamcore("submit", "status", jobs[3], "--address", ray_head).stdout
    assert "trained 2 steps" in dreamcore("submit", "logs", jobs[5], "--address", ray_head).stdout

    serve_job = jobs[-1]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 300
        while True:
            try:
                (card,) = client.models.list().data
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                status = dreamcore("submit", "status", serve_job, "--address", ray_head).stdout
                assert "RUNNING" in status or "PENDING" in status, status
                assert time.monotonic() < deadline, "the served SFT model never answered"
                time.sleep(2)
        assert card.model_extra["config"]["stage"] == "SFT"  # so chat requests get its template
        reply = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": "What shape is this?"}], max_tokens=4, seed=1)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 20
        # The decoder path of the export (SD-layout UNet + 8x VAE), and a document that reads an image.
        side = card.model_extra["config"]["decoder"]["resolution"]
        drawn = client.images.generate(model=card.id, prompt="a red circle", size=f"{side}x{side}",
                                       response_format="b64_json", extra_body={"seed": 3})
        png = base64.b64decode(drawn.data[0].b64_json)
        assert Image.open(io.BytesIO(png)).size == (side, side)
        doc = client.post("/generate", cast_to=httpx.Response, body={
            "input": [{"type": "text", "text": "Look:"}, {"type": "image", "image": drawn.data[0].b64_json},
                      {"type": "text", "text": "It is"}], "max_new_tokens": 6, "max_images": 1, "seed": 5}).json()
        assert doc["finish_reason"] in ("eos", "length") and doc["usage"]["prompt_tokens"] > 16  # the image block was read
    finally:
        stop = dreamcore("submit", "stop", serve_job, "--address", ray_head)
    assert stop.returncode == 2 and f"job {serve_job} STOPPED" in stop.stderr, stop.stderr


@pytest.mark.e2e
def test_stop_a_running_job(ray_head, tmp_path):
    # A curation job that waits on an image the server sends only after minutes: stop it meanwhile.
    from _curate_helpers import CaseServer, mmc4_doc, write_jsonl

    with CaseServer(slow_s=300) as slow:
        corpus = write_jsonl(tmp_path / "slow.jsonl", [mmc4_doc("https://example.com/s", [f"{slow.base}/slow"])])
        sub = dreamcore("submit", "curate", str(corpus), "--output", str(tmp_path / "data"), "--profile",
                        "embedded", "--set", "crawl.timeout_s=600", "--set", "crawl.retries=0",
                        "--no-wait", "--address", ray_head)
        assert sub.returncode == 0, sub.stderr
        job = job_id_of(sub)
        deadline = time.monotonic() + 120
        while "RUNNING" not in dreamcore("submit", "status", job, "--address", ray_head).stdout:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(1)
        stop = dreamcore("submit", "stop", job, "--address", ray_head)
        assert stop.returncode == 2 and f"job {job} STOPPED" in stop.stderr, stop.stderr
        assert f"{job} STOPPED" in dreamcore("submit", "status", job, "--address", ray_head).stdout
        assert not (tmp_path / "data" / "manifest.json").exists()  # it never finished


@pytest.mark.e2e
def test_token_authentication_is_required_and_named():
    """A head with token auth (the cluster default we document) refuses a client without the token
    with a message naming the fix, and accepts one with it."""
    import secrets

    token = secrets.token_hex(16)
    with local_head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as url:
        no_token = dreamcore("submit", "train", "--help", "--address", url)
        assert no_token.returncode == 2, no_token.stdout + no_token.stderr
        assert "RAY_AUTH_TOKEN" in no_token.stderr and "Traceback" not in no_token.stderr
        assert "submitted job" not in no_token.stdout

        env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        ok = subprocess.run([str(BIN / "dreamcore"), "submit", "train", "--help", "--address", url],
                            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "--data" in ok.stdout  # train's own help text, printed on the cluster
