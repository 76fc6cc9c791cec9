"""GPU clusters train on their GPUs: infra/'s run config asks for GPUs and the heads offer none.

What this proves without a GPU: the config the cluster files submit (infra/adapt.yaml)
turns into a Ray Train ScalingConfig and Ray Data actor resources that request GPUs; every
head in infra/ advertises 0 GPUs while every worker group offers what one worker asks
for, so Ray's scheduler cannot place a GPU-requesting worker on a head. Nothing here has
run on a physical GPU.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from coin_ray.config import load_config

INFRA = Path(__file__).resolve().parents[1] / "infra"


@pytest.fixture(scope="module")
def cfg():
    return load_config(str(INFRA / "adapt.yaml"))


def test_the_cluster_run_config_asks_for_gpus(cfg):
    from coin_ray.ray.detect import actor_resources
    from coin_ray.ray.train import scaling_config

    assert cfg.ray.use_gpu and cfg.ray.num_workers >= 1
    scaling = scaling_config(cfg)
    assert scaling.use_gpu and scaling.num_workers == cfg.ray.num_workers
    assert scaling.resources_per_worker["GPU"] >= 1
    assert scaling.total_resources["GPU"] == cfg.ray.num_workers * cfg.ray.gpus_per_worker
    assert actor_resources(cfg)["num_gpus"] >= 1


def test_a_cpu_config_asks_for_no_gpu():
    from coin_ray.ray.detect import actor_resources
    from coin_ray.ray.train import scaling_config

    plain = load_config(None, ["ray.cpus_per_worker=2"])
    assert "GPU" not in scaling_config(plain).resources_per_worker and not scaling_config(plain).use_gpu
    assert actor_resources(plain) == {"num_cpus": 2.0, "num_gpus": 0}


def _launcher_nodes() -> tuple[dict, list[dict], list[str]]:
    launcher = yaml.safe_load((INFRA / "aws-cluster.yaml").read_text())
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = [v for k, v in types.items() if k != launcher["head_node_type"]]
    return head, workers, launcher["head_start_ray_commands"]


def test_launcher_head_offers_no_gpu_and_workers_fit_a_training_worker(cfg):
    head, workers, head_start = _launcher_nodes()
    assert head["resources"].get("GPU") == 0
    start = [cmd for cmd in head_start if cmd.startswith("ray start")]
    assert start and "--num-gpus=0" in shlex.split(start[0])
    want = cfg.ray.worker_resources()
    gpu_workers = [w for w in workers if w["resources"].get("GPU", 0) >= want["GPU"]]
    assert gpu_workers and all(w["resources"]["CPU"] >= want["CPU"] for w in gpu_workers)
    assert sum(w["max_workers"] for w in gpu_workers) >= cfg.ray.num_workers


@pytest.mark.parametrize("name", ["kuberay-adapt.yaml", "kuberay-tune.yaml"])
def test_kuberay_head_offers_no_gpu_and_workers_fit_a_training_worker(cfg, name):
    spec = yaml.safe_load((INFRA / name).read_text())["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert not re.search(r"nvidia\.com/gpu", yaml.safe_dump(head["template"]))
    want = cfg.ray.worker_resources()
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(group["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"]) >= want["GPU"]
        assert float(limits["cpu"]) >= want["CPU"]
        assert group["maxReplicas"] >= cfg.ray.num_workers
