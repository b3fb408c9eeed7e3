"""`dreamcore submit`: run a stage on a Ray cluster as a job, through Ray's Job Submission SDK.

    dreamcore submit curate s3://raw/*.jsonl.gz --output /mnt/dreamcore/data/d1 --address http://HEAD:8265
    dreamcore submit train --data /mnt/dreamcore/data/d1 --output /mnt/dreamcore/runs/r1 --gpu --address ...
    dreamcore submit serve --checkpoint /mnt/dreamcore/runs/r1/model --no-wait --address ...
    dreamcore submit status|logs|stop JOB_ID --address ...

Why jobs and not `ray.init("ray://...")`: a job's driver runs on the cluster, so a laptop that goes
to sleep does not kill a day of curation, and only the dashboard port (8265, tunnelled, never
public) is needed. Paths are the cluster's (a volume every node mounts, docs/operations.md). The
entrypoint is the project's own CLI (`python -m dreamcore.cli STAGE ARGS`), so a stage behaves the
same on a laptop and on a cluster. Code travels as the runtime_env working_dir (this checkout,
minus virtualenvs and outputs) unless it is baked into the image (`--no-working-dir`).

Everything after the stage name that is not a submit option (below) is passed to the stage verbatim;
put `--` before stage arguments that would clash. When this checkout is the code that travels, the
stage arguments are first parsed with the stage's own parser, so a misspelled flag fails here, in
one line, before anything is uploaded.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("curate", "train", "serve")
ACTIONS = ("status", "logs", "stop")

# Never uploaded: virtualenvs, run outputs, caches. Ray also honours the checkout's .gitignore.
DEFAULT_EXCLUDES = [
    ".venv", "venv", "runs", "demo-output", ".git", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", "*.egg-info", "build", "dist",
]

# Set for every job: the same defaults the local CLI sets before importing anything. The stages call
# `ray.init(runtime_env={"env_vars": ...})` themselves; inside a job Ray refuses to merge that with
# the job's runtime_env when a key repeats, unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (then env_vars merge
# per key, the stage's value winning, and the job's working_dir is kept).
DEFAULT_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}


class SubmitError(RuntimeError):
    """A submission problem with a message that names the input and the fix."""


# ----------------------------------------------------------------------------------------------
# What to submit


@dataclass
class JobSpec:
    """One job: its entrypoint and runtime_env, built from the command line."""

    stage: str
    stage_args: list[str]
    working_dir: str | None
    excludes: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: float | None = None
    submission_id: str | None = None
    python: str = "python"

    @property
    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", "dreamcore.cli", self.stage, *self.stage_args])

    def runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {"env_vars": {**DEFAULT_ENV, **self.env}}
        if self.working_dir is not None:
            env["working_dir"] = self.working_dir
            env["excludes"] = [*DEFAULT_EXCLUDES, *self.excludes]
        if self.pip:
            env["pip"] = list(self.pip)
        if self.image:
            # Ray runs the job's worker processes in this container (needs podman on the nodes).
            env["image_uri"] = self.image
        return env


def project_root() -> Path:
    """The checkout that holds this package: the default working_dir."""
    root = Path(__file__).resolve().parents[1]
    # An installed package sits in site-packages: uploading that would ship the whole environment.
    if not ((root / "dreamcore" / "cli.py").exists() and (root / "pyproject.toml").exists()):
        raise SubmitError(
            f"{root} is not a dreamcore checkout; pass --working-dir PATH to a checkout, "
            "or --no-working-dir when the image already contains dreamcore"
        )
    return root


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} is not KEY=VALUE (example: --env DS_ACCELERATOR=cpu)")
        out[key] = value
    return out


def resolve_address(address: str | None) -> str:
    """The dashboard URL of the head (Jobs API). Ray client / GCS addresses are refused with the fix."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard, tunnelled: "
            "`kubectl port-forward svc/dreamcore-head-svc 8265` or `ray dashboard cluster/aws.yaml`) "
            "or set RAY_ADDRESS"
        )
    if address.startswith("ray://") or not address.startswith(("http://", "https://")):
        raise SubmitError(
            f"--address {address!r} is not a dashboard URL: jobs are submitted to the dashboard's "
            "HTTP port, e.g. --address http://127.0.0.1:8265 (not the ray:// client port 10001 or "
            "the GCS port 6379)"
        )
    return address.rstrip("/")


# ----------------------------------------------------------------------------------------------
# Command line


def _submit_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options of `submit` itself; accepted before or after the stage name."""
    d = argparse.SUPPRESS if suppress else None

    def add(*names: str, **kw: Any) -> None:
        if suppress:
            kw["default"] = argparse.SUPPRESS
        parser.add_argument(*names, **kw)

    add("--address", default=d, help="head's dashboard URL, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS)")
    add("--working-dir", default=d, help="code to upload as the runtime_env working_dir "
        "(default: this checkout)")
    add("--no-working-dir", action="store_true", help="upload no code: the image already has dreamcore")
    add("--exclude", action="append", default=[] if not suppress else d, metavar="PATTERN",
        help="also leave out of the upload (repeatable; .venv, runs, demo-output always are)")
    add("--pip", action="append", default=[] if not suppress else d, metavar="SPEC",
        help="pip requirement installed for the job (repeatable)")
    add("--image", default=d, help="container image URI for the job's processes (runtime_env image_uri)")
    add("--env", action="append", default=[] if not suppress else d, metavar="KEY=VALUE",
        help="environment variable of the job (repeatable)")
    add("--entrypoint-num-cpus", type=float, default=d, help="CPUs reserved for the driver")
    add("--entrypoint-num-gpus", type=float, default=d, help="GPUs reserved for the driver")
    add("--submission-id", default=d, help="job id to use (default: Ray picks one)")
    add("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    add("--timeout", type=float, default=d, help="give up following after this many seconds "
        "(the job keeps running)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=[*STAGES, *ACTIONS], metavar="{curate,train,serve,status,logs,stop}",
                        help="stage to submit, or what to do with an existing job")
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="stage arguments (passed through), or JOB_ID for status/logs/stop")
    _submit_options(parser)
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def split_rest(args: argparse.Namespace) -> list[str]:
    """Pull submit options out of the remainder; everything else (and all after `--`) is the stage's."""
    rest = list(args.rest)
    tail: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, tail = rest[:i], rest[i + 1:]
    extractor = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _submit_options(extractor, suppress=True)
    found, stage_args = extractor.parse_known_args(rest)
    for key, value in vars(found).items():
        current = getattr(args, key, None)
        if isinstance(value, list):
            setattr(args, key, [*(current or []), *value])
        else:
            setattr(args, key, value)
    return [*stage_args, *tail]


class _StageParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise SubmitError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def check_stage_args(stage: str, stage_args: list[str]) -> None:
    """Parse the stage's arguments with the stage's own parser (the verb module `dreamcore.cli`
    routes to); SubmitError names the bad flag or value. `--help` is left to the job, which prints
    the cluster's help."""
    if "-h" in stage_args or "--help" in stage_args:
        return
    from dreamcore.cli import VERBS

    parser = _StageParser(prog=f"dreamcore {stage}")
    importlib.import_module(VERBS[stage][0]).add_arguments(parser)
    parser.parse_args(stage_args)


def build_spec(args: argparse.Namespace, stage_args: list[str]) -> JobSpec:
    if args.no_working_dir and args.working_dir:
        raise SubmitError("--working-dir and --no-working-dir contradict each other; pick one")
    working_dir: str | None
    if args.no_working_dir:
        working_dir = None
    elif args.working_dir:
        wd = Path(args.working_dir)
        if not wd.is_dir() and "://" not in args.working_dir:
            raise SubmitError(f"--working-dir {args.working_dir} is not a directory")
        working_dir = str(wd.resolve()) if wd.is_dir() else args.working_dir
    else:
        working_dir = str(project_root())
    return JobSpec(
        stage=args.what,
        stage_args=stage_args,
        working_dir=working_dir,
        excludes=list(args.exclude or []),
        pip=list(args.pip or []),
        image=args.image,
        env=parse_env(args.env or []),
        num_cpus=args.entrypoint_num_cpus,
        num_gpus=args.entrypoint_num_gpus,
        submission_id=args.submission_id,
    )


# ----------------------------------------------------------------------------------------------
# Talking to the cluster


def connect(address: str):
    """A JobSubmissionClient, or one clear error (unreachable head, missing token)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise SubmitError(
            f"the cluster at {address} wants a token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            f"(or put it in ~/.ray/auth_token); see docs/operations.md#security ({e})"
        ) from None
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: is the head up and its dashboard port "
            f"forwarded to you (see docs/operations.md#jobs-submit-status-logs-stop)? ({e})"
        ) from None


def submit(client, spec: JobSpec) -> str:
    kwargs: dict[str, Any] = {"entrypoint": spec.entrypoint, "runtime_env": spec.runtime_env()}
    if spec.submission_id:
        kwargs["submission_id"] = spec.submission_id
    if spec.num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = spec.num_cpus
    if spec.num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = spec.num_gpus
    try:
        return client.submit_job(**kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        raise SubmitError(f"the cluster refused job {spec.entrypoint!r}: {e}") from None


async def _follow(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client, job_id: str, timeout: float | None = None, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status."""
    try:
        asyncio.run(asyncio.wait_for(_follow(client, job_id, out), timeout))
    except asyncio.TimeoutError:
        return str(status_of(client, job_id))
    except RuntimeError as e:  # the log stream broke (head restart, proxy): fall back to polling
        print(f"dreamcore: log stream of {job_id} ended early ({e}); polling its status", file=sys.stderr)
    return wait(client, job_id, timeout=None)


def status_of(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as e:
        raise SubmitError(f"no job {job_id!r} on this cluster ({e}); list them with `ray job list`") from None


def wait(client, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = status_of(client, job_id)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def report(client, job_id: str, status: str) -> int:
    info = client.get_job_info(job_id)
    # Ray appends the log tail to a failure message; the logs were already streamed: keep line one.
    message = f": {info.message.splitlines()[0]}" if info.message else ""
    print(f"dreamcore: job {job_id} {status}{message}", file=sys.stderr)
    return EXIT_CODES.get(status, 3)


# ----------------------------------------------------------------------------------------------
# Verb


def run_stage(args: argparse.Namespace, stage_args: list[str]) -> int:
    spec = build_spec(args, stage_args)
    if not (args.working_dir or args.no_working_dir):  # the code that runs is this checkout's
        check_stage_args(spec.stage, spec.stage_args)
    client = connect(resolve_address(args.address))
    job_id = submit(client, spec)
    print(f"dreamcore: submitted job {job_id}", flush=True)
    print(f"dreamcore: entrypoint {spec.entrypoint}", file=sys.stderr)
    address = resolve_address(args.address)
    if args.no_wait:
        print(f"dreamcore: follow with `dreamcore submit logs {job_id} --follow --address {address}`",
              file=sys.stderr)
        return 0
    try:
        status = follow(client, job_id, timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"\ndreamcore: stopped following; job {job_id} keeps running. Stop it with "
              f"`dreamcore submit stop {job_id} --address {address}`", file=sys.stderr)
        return 130
    if status not in TERMINAL:
        print(f"dreamcore: still {status} after {args.timeout} s; job {job_id} keeps running",
              file=sys.stderr)
        return 3
    return report(client, job_id, status)


def run_action(args: argparse.Namespace, rest: list[str]) -> int:
    follow_logs = "--follow" in rest or "-f" in rest
    ids = [r for r in rest if r not in ("--follow", "-f")]
    if len(ids) != 1 or ids[0].startswith("-"):
        raise SubmitError(f"`dreamcore submit {args.what}` takes one JOB_ID (the id `submit` printed); "
                          f"got {' '.join(rest) or 'none'}")
    job_id = ids[0]
    client = connect(resolve_address(args.address))
    if args.what == "status":
        status = status_of(client, job_id)
        info = client.get_job_info(job_id)
        print(f"{job_id} {status}" + (f": {info.message}" if info.message else ""))
        print(f"entrypoint: {info.entrypoint}")
        return 0
    if args.what == "logs":
        if follow_logs:
            return report(client, job_id, follow(client, job_id, timeout=args.timeout))
        status_of(client, job_id)  # a clear error for an unknown id
        sys.stdout.write(client.get_job_logs(job_id))
        return 0
    stopped = client.stop_job(job_id)
    if not stopped:
        print(f"dreamcore: job {job_id} had already ended ({status_of(client, job_id)})", file=sys.stderr)
        return 0
    return report(client, job_id, wait(client, job_id, timeout=args.timeout or 60))


def main(args: argparse.Namespace) -> int:
    try:
        rest = split_rest(args)
        if args.what in STAGES:
            return run_stage(args, rest)
        return run_action(args, rest)
    except SubmitError as e:
        print(f"dreamcore submit: {e}", file=sys.stderr)
        return 2

