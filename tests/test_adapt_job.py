"""The whole job on the tiny Foggy-Shapes world, killed during distillation and resumed.

Each test runs ``jobs/adapt.py`` as a real subprocess (its own local Ray instance) against
the project's detector server on 127.0.0.1. The whole job with every path on S3, submitted
with ``ray job submit`` to a ``ray start --head`` cluster, is in test_entry_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coin_ray.serve import Knobs, checkpoint_model_name, start_server
from coin_ray.world.cloud_standin import StandInCloudDetector

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Short schedules: these tests check plumbing, not quality.
FAST = ["train.disseminate.steps=3", "train.distill.steps=4", "train.disseminate.batch_size=2", "train.distill.batch_size=2",
        "train.disseminate.checkpoint_every=2", "train.distill.checkpoint_every=2", "ray.num_workers=0",
        "cloud.requests_per_second=50", "cloud.num_actors=1"]


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture
def cloud(world):
    server = start_server(StandInCloudDetector.load(world.cloud_detector), Knobs(),
                          model_name=checkpoint_model_name(str(world.cloud_detector)))
    yield server
    server.stop()


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # "python" in a job's entrypoint must be this environment's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT), PATH=path, **extra)
    return env


def adapt_args(world, url: str, storage_uri: str, *extra: str, **paths: str) -> list[str]:
    args = [f"storage={storage_uri}", "run_id=t", f"cloud.url={url}",
            f"data.target_images={paths.get('target', world.target_train_images)}",
            f"data.val_images={paths.get('val', world.target_val_images)}",
            f"data.val_annotations={paths.get('ann', world.target_val_json)}",
            f"clip.model={paths.get('clip', world.clip_dir)}", *FAST, *extra]
    return [PY, "jobs/adapt.py", "--num-cpus", "4", *args]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before distillation started:\n"
                                     + log.read_text(errors="replace")[-3000:])
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_killed_during_distillation_resumes_without_recollecting(world, cloud, tmp_path):
    runs = tmp_path / "runs"
    args = adapt_args(world, cloud.url, str(runs), "train.distill.steps=400")
    log = tmp_path / "killed-run.log"
    with log.open("wb") as out:  # the run's own words, should it end before it is killed
        proc = subprocess.Popen(args, cwd=ROOT, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for(runs / "t" / "distill" / "metrics.jsonl", proc, 600, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    manifest = json.loads((runs / "t" / "manifest.json").read_text())
    assert "distill" not in manifest["stages"] and "clip_det" in manifest["stages"]
    calls_before = cloud.stats()["detect_requests"]
    assert calls_before > 0
    proc = subprocess.run(adapt_args(world, cloud.url, str(runs), "train.distill.steps=6"), cwd=ROOT,
                          env=job_env(), capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cloud.stats()["detect_requests"] == calls_before  # nothing re-collected
    manifest = json.loads((runs / "t" / "manifest.json").read_text())
    assert {"distill", "evaluate", "export"} <= set(manifest["stages"])
    assert "stage collect" not in proc.stdout
