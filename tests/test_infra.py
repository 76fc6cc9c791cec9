"""infra/: the cluster files parse, validate against Ray's own schema and agree with each other.

Nothing here talks to AWS or Kubernetes; the checks are the ones that catch a config that
would fail at `ray up` / `kubectl apply` time: schema errors, entrypoints naming a script or
flag that does not exist, an image on another Ray version than the project pins, a bucket
in the IAM policy different from the one the jobs write to.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFESTS = {"kuberay-adapt.yaml": "jobs/adapt.py", "kuberay-tune.yaml": "jobs/tune.py"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> SpecifierSet:
    for dep in _pyproject()["project"]["dependencies"]:
        match = re.match(r"^ray(\[[^\]]*\])?(.*)$", dep)
        if match:
            return SpecifierSet(match.group(2))
    raise AssertionError("pyproject.toml does not depend on ray")


def _launcher() -> dict:
    return yaml.safe_load((INFRA / "aws-cluster.yaml").read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _rayjob(name: str) -> dict:
    docs = list(yaml.safe_load_all((INFRA / name).read_text()))
    assert len(docs) == 1
    return docs[0]


def _dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)


def _bucket() -> str:
    policy = json.loads((INFRA / "s3-policy.json").read_text())
    arns = [r for s in policy["Statement"] for r in [s["Resource"]] if not r.endswith("/*")]
    return arns[0].removeprefix("arn:aws:s3:::")


def test_launcher_yaml_validates_against_rays_schema():
    cfg = _launcher()
    jsonschema.validate(cfg, _ray_schema())
    # Ray's own path of `ray up` before it talks to AWS: fill defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_launcher_schema_check_is_not_vacuous():
    bad = _launcher()
    bad["available_node_types"]["gpu_worker"]["max_wrokers"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def test_launcher_has_gpu_workers_and_s3_by_instance_profile():
    cfg = _launcher()
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    gpu_types = [v for v in workers.values() if re.match(r"^(g|p)\d", v["node_config"]["InstanceType"])]
    assert gpu_types, "no GPU instance type among the workers"
    for node in cfg["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]
    text = (INFRA / "aws-cluster.yaml").read_text()
    assert not re.search(r"AKIA|aws_secret_access_key|aws_access_key_id", text, re.I)
    assert cfg["docker"]["image"].endswith(":" + _pyproject()["project"]["version"])


def test_dockerfile_is_on_the_pinned_ray_and_python():
    text = (INFRA / "Dockerfile").read_text()
    match = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu\s*$", text, re.M)
    assert match, "FROM must be a rayproject/ray:<version>-py<xy>-gpu image"
    ray_version, py = match.group(1), f"{match.group(2)}.{match.group(3)}"
    assert ray_version in _ray_pin()
    assert ray_version == ray.__version__
    assert Version(py) in SpecifierSet(_pyproject()["project"]["requires-python"])
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repo"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_rayjob_manifest_names_the_right_entrypoint(name):
    job = _rayjob(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    assert argv[1] == f"{_dockerfile_workdir()}/{MANIFESTS[name]}"
    assert "--config" in argv and argv[argv.index("--config") + 1].startswith(f"s3://{_bucket()}/")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {_launcher()["docker"]["image"]}
    assert all(isinstance(v, str) for g in groups for v in g["rayStartParams"].values())
    sa = yaml.safe_load((INFRA / "k8s-service-account.yaml").read_text())["metadata"]["name"]
    assert all(g["template"]["spec"]["serviceAccountName"] == sa for g in groups)
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert any(gpus)
    yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_rayjob_entrypoint_flags_exist(name):
    script = ROOT / MANIFESTS[name]
    if not script.exists():
        pytest.skip(f"{MANIFESTS[name]} not written yet")
    flags = [a for a in shlex.split(_rayjob(name)["spec"]["entrypoint"]) if a.startswith("--")]
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=100, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in flags:
        assert flag in out.stdout, f"{MANIFESTS[name]} has no {flag} option"


def test_runtime_env_is_accepted_by_ray_and_matches_pyproject():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)
    deps = [d for d in _pyproject()["project"]["dependencies"] if not re.match(r"^ray\b", d)]
    assert sorted(data["pip"]["packages"]) == sorted(deps)


def test_s3_policy_covers_what_storage_does():
    policy = json.loads((INFRA / "s3-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    resources = {s["Resource"] for s in policy["Statement"]}
    assert resources == {f"arn:aws:s3:::{_bucket()}", f"arn:aws:s3:::{_bucket()}/*"}
