"""The cluster configurations are checked offline, as strictly as a real cluster would check them.

No Kubernetes API server or cloud account is reachable here, so:
- KubeRay manifests are validated against the CRDs' openAPIV3Schema (../shared/kuberay-crds) with
  unknown fields as errors, like `kubectl --validate=strict` (the CRDs alone would prune them silently);
- the RayService's serveConfigV2 is parsed with Ray Serve's own schema and compared with
  cluster/serve.yaml (one application, two launchers), then built with the app builder;
- RayJob runtimeEnvYAML is parsed with Ray's RuntimeEnv;
- cluster/aws.yaml goes through the autoscaler's own `prepare_config` + `validate_config`.
"""

from __future__ import annotations

import copy
import functools
import re
import string
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-curate.yaml": "RayJob",
    "rayjob-train.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
STORAGE = "/mnt/dreamcore"  # the shared claim `dreamcore-storage` (storage.yaml), in every pod
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}

# The parameters users set before `envsubst` (docs/operations.md lists the same names).
EXAMPLE_PARAMS = {
    "DREAMCORE_IMAGE": "registry.example.com/dreamcore:0.1.0-gpu",
    "DREAMCORE_STORAGE_CLASS": "efs-sc",
    "DREAMCORE_INPUT": "s3://example-bucket/raw/mmc4/docs_shard_0.jsonl.gz",
    "DREAMCORE_STORAGE": "s3://example-bucket/dreamcore",
    "DREAMCORE_DATASET": "mmc4-v1",
    "DREAMCORE_RUN": "stage2-r1",
}

# metadata is `type: object` in every CRD (the API server checks it as ObjectMeta); these are the
# ObjectMeta fields a manifest may set.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
}


# ----------------------------------------------------------------------------------------------
# Helpers


def render(text: str, params: dict[str, str] = EXAMPLE_PARAMS) -> str:
    """What `envsubst` does with these parameters; a placeholder left unset is an error here."""
    return string.Template(text).substitute(params)


def load_manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load(render((KUBERAY / name).read_text()))


def strict(schema: Any) -> Any:
    """A copy of an openAPIV3Schema in which every object with `properties` refuses unknown keys.

    Kubernetes quirks kept as they mean: `x-kubernetes-preserve-unknown-fields` objects stay open,
    maps (`additionalProperties` given) stay maps, int-or-string (`anyOf` integer|string) is left
    to jsonschema's anyOf, and a bare `type: object` without properties (opaque, e.g. pod
    `metadata` inside templates is typed, but some leaves are not) is left open.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _load_crd(path: Path) -> dict[str, Any]:
    # The CRDs are ~1 MB each: parse once per session, with libyaml when present.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


def crd_schema(shared_dir: Path, kind: str) -> dict[str, Any]:
    path = shared_dir / "kuberay-crds" / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"{path} is not there")
    crd = _load_crd(path)
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)  # the operator writes status, never a manifest
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": f"ray.io/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    return schema


def schema_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    )


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups]


# ----------------------------------------------------------------------------------------------
# KubeRay manifests


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_strictly_against_kuberay_crd(shared_dir, name):
    doc = load_manifest(name)
    assert doc["kind"] == MANIFESTS[name]
    errors = schema_errors(doc, crd_schema(shared_dir, MANIFESTS[name]))
    assert not errors, f"{name} does not validate:\n" + "\n".join(errors)


def test_strict_validation_catches_a_misspelled_field(shared_dir):
    # The check must be able to fail: a typo deep in a pod template and one in the Ray spec.
    schema = crd_schema(shared_dir, "RayCluster")
    doc = load_manifest("raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    doc["spec"]["enableInTreeAutoscalling"] = True
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    errors = "\n".join(schema_errors(doc, schema))
    assert "'resource' was unexpected" in errors
    assert "'enableInTreeAutoscalling' was unexpected" in errors
    assert "containerPort" in errors


def test_int_or_string_quantities_accept_both_forms(shared_dir):
    schema = crd_schema(shared_dir, "RayCluster")
    doc = load_manifest("raycluster.yaml")
    res = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    res["requests"]["cpu"] = 8  # integer form of a Quantity
    assert not schema_errors(doc, schema)
    res["requests"]["cpu"] = ["8"]
    assert schema_errors(doc, schema)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_pod_mounts_the_shared_storage(name):
    # Stages write local paths and Ray Train's storage_path must be shared by every node.
    for template in pod_templates(load_manifest(name)):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v]
        assert claims == ["dreamcore-storage"]
        mounts = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] == "storage"]
        assert mounts, f"{name}: a pod without the storage mount"
        if MANIFESTS[name] != "RayService":
            assert {m["mountPath"] for m in mounts} == {STORAGE}


def test_rayservice_mounts_the_checkpoint_where_serve_yaml_expects_it():
    in_service, _ = _serve_configs()
    ckpt = in_service["applications"][0]["args"]["checkpoint"]
    for template in pod_templates(load_manifest("rayservice.yaml")):
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts[ckpt]["subPath"] == f"runs/{EXAMPLE_PARAMS['DREAMCORE_RUN']}/model"
        assert mounts[ckpt]["readOnly"] is True


def test_storage_claim_is_shared_read_write():
    pvc = yaml.safe_load(render((KUBERAY / "storage.yaml").read_text()))
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "dreamcore-storage"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == EXAMPLE_PARAMS["DREAMCORE_STORAGE_CLASS"]
    assert set(pvc["spec"]) == {"accessModes", "storageClassName", "resources"}


@pytest.mark.parametrize("name", [*sorted(MANIFESTS), "storage.yaml"])
def test_every_placeholder_is_a_documented_parameter(name):
    text = (KUBERAY / name).read_text()
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    # envsubst replaces every $NAME, so a manifest may hold no other `$` (e.g. in shell snippets).
    assert used <= set(EXAMPLE_PARAMS), f"{name} uses undocumented variables {used - set(EXAMPLE_PARAMS)}"
    ops = (REPO / "docs" / "operations.md").read_text()
    for param in used:
        assert param in ops, f"{param} is not documented in docs/operations.md"
    assert "$" not in render(text)


def test_autoscaling_and_worker_groups():
    cluster = load_manifest("raycluster.yaml")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["cpu"]["maxReplicas"] > groups["cpu"]["minReplicas"]
    assert groups["gpu"]["maxReplicas"] > groups["gpu"]["minReplicas"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"])


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_no_ray_port_is_exposed_and_token_auth_is_on(name):
    doc = load_manifest(name)
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    # ShadowRay (CVE-2023-48022): the dashboard/Jobs (8265), client (10001) and GCS (6379) ports
    # run arbitrary code for whoever reaches them; they stay on the cluster network.
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "dreamcore-ray-token"}
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            assert c["image"] == EXAMPLE_PARAMS["DREAMCORE_IMAGE"]
            for port in c.get("ports", []):
                assert "hostPort" not in port, f"{name}: {c['name']} binds a host port"


# ----------------------------------------------------------------------------------------------
# RayJobs


def _ray_job(name: str) -> dict[str, Any]:
    return load_manifest(name)["spec"]


@pytest.mark.parametrize("name,stage", [("rayjob-curate.yaml", "curate"), ("rayjob-train.yaml", "train")])
def test_rayjob_runs_the_project_cli_with_a_valid_runtime_env(name, stage):
    from ray.runtime_env import RuntimeEnv

    spec = _ray_job(name)
    argv = spec["entrypoint"].split()
    assert argv[:4] == ["python", "-m", "dreamcore.cli", stage]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    RuntimeEnv(**runtime_env)  # raises on unknown or malformed runtime_env fields
    assert spec["shutdownAfterJobFinishes"] is True  # the job's cluster goes away with the job
    # Output goes to the object store, under the documented layout.
    assert f"{EXAMPLE_PARAMS['DREAMCORE_STORAGE']}/data/{EXAMPLE_PARAMS['DREAMCORE_DATASET']}" in spec["entrypoint"]


def test_rayjob_arguments_parse_with_the_stage_verbs():
    """The entrypoints' flags are the verbs' real flags."""
    import argparse
    import importlib

    from dreamcore.cli import VERBS

    for name, stage in (("rayjob-curate.yaml", "curate"), ("rayjob-train.yaml", "train")):
        module = importlib.import_module(VERBS[stage][0])
        parser = argparse.ArgumentParser(prog=f"dreamcore {stage}")
        module.add_arguments(parser)
        argv = _ray_job(name)["entrypoint"].split()[4:]
        parser.parse_args(argv)  # SystemExit (a test failure) on an unknown flag


def test_training_job_requests_what_it_trains_on():
    spec = _ray_job("rayjob-train.yaml")
    argv = spec["entrypoint"].split()
    workers = int(argv[argv.index("--workers") + 1])
    gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert len(gpu_groups) == 1 and "--gpu" in argv
    group = gpu_groups[0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    # Ray Train needs every worker at once: the group must be able to hold all of them.
    assert group["maxReplicas"] * gpus >= workers
    assert f"{EXAMPLE_PARAMS['DREAMCORE_STORAGE']}/runs/{EXAMPLE_PARAMS['DREAMCORE_RUN']}" in spec["entrypoint"]


# ----------------------------------------------------------------------------------------------
# RayService: the same Serve application as cluster/serve.yaml


def _serve_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    path = REPO / "cluster" / "serve.yaml"
    service = load_manifest("rayservice.yaml")["spec"]
    return yaml.safe_load(service["serveConfigV2"]), yaml.safe_load(path.read_text())


def test_rayservice_serves_the_same_application_as_serve_yaml():
    in_service, for_serve_run = _serve_configs()
    # Whole-config equality: applications (import path, args, deployments), HTTP options, proxies.
    assert in_service == for_serve_run
    names = [d["name"] for d in in_service["applications"][0]["deployments"]]
    assert {"LLMServer", "ImageDecoder"} <= set(names)


def test_rayservice_serve_config_passes_serve_schema_and_builds(tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from dreamcore.config import tiny, to_dict

    config, _ = _serve_configs()
    ServeDeploySchema.model_validate(config)  # Serve's own schema (it ignores unknown keys: below)
    for dep in config["applications"][0]["deployments"]:
        autoscaling = dep["autoscaling_config"]
        # The two model deployments scale independently, each within its own bounds.
        assert 0 < autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    llm, dec = (next(d for d in config["applications"][0]["deployments"] if d["name"] == n)
                for n in ("LLMServer", "ImageDecoder"))
    assert llm["autoscaling_config"] != dec["autoscaling_config"]

    # Build it the way Serve does: import_path -> builder, args validated by its typed model.
    app_cfg = config["applications"][0]
    module_name, attr = app_cfg["import_path"].split(":")
    builder = getattr(__import__(module_name, fromlist=[attr]), attr)
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(__import__("json").dumps(to_dict(tiny())))
    args = copy.deepcopy(app_cfg["args"])
    args["checkpoint"] = str(ckpt)  # the pod's /mnt/checkpoints path does not exist here
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    built = {app._bound_deployment.name}
    stack = list(app._bound_deployment.init_args)
    while stack:
        item = stack.pop()
        if hasattr(item, "_bound_deployment"):
            built.add(item._bound_deployment.name)
            stack.extend(item._bound_deployment.init_args)
    assert built == {d["name"] for d in app_cfg["deployments"]}


# ----------------------------------------------------------------------------------------------
# `ray up`


def test_ray_up_config_passes_the_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert {"head", "cpu", "gpu"} <= set(types)
    assert types["head"]["resources"].get("CPU") == 0  # no work on the head
    assert types["gpu"]["resources"].get("GPU", 0) >= 1
    assert types["gpu"]["max_workers"] > types["gpu"]["min_workers"]
    # The autoscaler would reject a typo too (its schema is strict): keep the check able to fail.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_ray_up_config_keeps_ray_ports_private():
    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    text = yaml.safe_dump(raw)
    for port in ("8265", "10001", "6379"):
        assert f"FromPort: {port}" not in text and f"ToPort: {port}" not in text
    assert "RAY_AUTH_MODE=token" in text



# ----------------------------------------------------------------------------------------------
# The README's "Running on a cluster" block (kept in docs/operations.md)


def _readme_block() -> dict[str, list[str]]:
    """Stage title -> its command lines, from the first bash block under the README heading."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## README block: Running on a cluster", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    stages: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        if re.match(r"# \d\. ", line):
            current = line[2:]
            stages[current] = []
        elif line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line.split("  #", 1)[0].strip())
    return stages


def test_readme_shows_the_runbook_block_verbatim():
    """The README's "Running on a cluster" commands are the runbook's, word for word."""

    def first_bash_block(text: str, heading: str) -> str:
        return text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]

    ops = first_bash_block((REPO / "docs" / "operations.md").read_text(), "## README block: Running on a cluster")
    readme = first_bash_block((REPO / "README.md").read_text(), "## Running on a cluster")
    assert readme == ops


def test_readme_block_has_at_most_three_commands_per_stage():
    stages = _readme_block()
    assert len(stages) == 4, list(stages)
    for title, commands in stages.items():
        assert 1 <= len(commands) <= 3, f"{title}: {len(commands)} commands"


def test_readme_submit_commands_parse_with_the_real_verbs():
    """Every `dreamcore submit STAGE ...` line is valid for submit and for the stage it runs."""
    import argparse
    import importlib
    import shlex

    from dreamcore.cli import VERBS
    from pipelines import submit

    commands = [c for cs in _readme_block().values() for c in cs if c.startswith("dreamcore submit")]
    assert {shlex.split(c)[2] for c in commands} == {"curate", "train"}
    for command in commands:
        argv = shlex.split(command)[2:]
        parser = argparse.ArgumentParser()
        submit.add_arguments(parser)
        args = parser.parse_args(argv)
        stage_args = submit.split_rest(args)
        assert args.address == "http://127.0.0.1:8265"
        module = importlib.import_module(VERBS[args.what][0])
        stage_parser = argparse.ArgumentParser(prog=f"dreamcore {args.what}")
        module.add_arguments(stage_parser)
        stage_parser.parse_args(stage_args)


def test_ray_versions_agree_with_the_client():
    """Image, manifests, `ray up` and the local client must run one Ray version (the Jobs API and
    the runtime_env protocol are not stable across versions)."""
    import ray

    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__
    assert (base.group(2), base.group(3)) == tuple(map(str, __import__("sys").version_info[:2]))
    for name in MANIFESTS:
        spec = load_manifest(name)["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert cluster["rayVersion"] == ray.__version__, name
    aws = (REPO / "cluster" / "aws.yaml").read_text()
    assert f"ray[default,data,train,serve]=={ray.__version__}" in aws
