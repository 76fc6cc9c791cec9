"""The whole job on the tiny Foggy-Shapes world: s3:// everywhere, kill + resume, ray job submit.

Each test runs ``jobs/adapt.py`` as a real subprocess (its own local Ray instance, or a
cluster started with ``ray start``) against the project's detector server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from ray._common.utils import get_ray_address_file

from coin_ray import storage
from coin_ray.serve import Knobs, checkpoint_model_name, start_server
from coin_ray.world.build import build_world
from coin_ray.world.cloud_standin import StandInCloudDetector

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this interpreter's environment
# Short schedules: these tests check plumbing, not quality.
FAST = ["train.disseminate.steps=3", "train.distill.steps=4", "train.disseminate.batch_size=2", "train.distill.batch_size=2",
        "train.disseminate.checkpoint_every=2", "train.distill.checkpoint_every=2", "ray.num_workers=0",
        "cloud.requests_per_second=50", "cloud.num_actors=1"]
ARTEFACTS = ["manifest.json", "config.yaml", "collect/cloud.parquet", "collect/clip.parquet",
             "collect/summary.json", "disseminate/model.pt", "clip_det/detections.parquet",
             "distill/model.pt", "eval/coin.parquet", "report/table1.md", "report/metrics.json",
             "report/ap_per_class.png", "report/detections.png", "export/export.json"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world("tiny", cache_dir=tmp_path_factory.mktemp("world-cache"))


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


def upload(local: Path, bucket: str, prefix: str, endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(local).as_posix()}", Body=f.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.mark.timeout(900)
def test_whole_pipeline_with_every_path_on_s3(world, cloud, s3_bucket, s3_endpoint, tmp_path):
    target = upload(world.target_train_images, s3_bucket, "data/train", s3_endpoint)
    val = upload(world.target_val_images, s3_bucket, "data/val", s3_endpoint)
    clip = upload(world.clip_dir, s3_bucket, "models/clip", s3_endpoint)
    ann = f"s3://{s3_bucket}/data/val.json"
    storage.write_bytes(ann, world.target_val_json.read_bytes())
    runs = f"s3://{s3_bucket}/runs"
    answers = f"s3://{s3_bucket}/answers"  # a cluster's answer cache: an s3:// prefix
    proc = subprocess.run(adapt_args(world, cloud.url, runs, f"cloud.cache={answers}",
                                     target=target, val=val, ann=ann, clip=clip),
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| COIN |" in proc.stdout
    for rel in ARTEFACTS:
        assert storage.exists(f"{runs}/t/{rel}"), rel
    assert storage.list_files(answers), "the cloud answer cache is in the bucket too"
    manifest = json.loads(storage.read_text(f"{runs}/t/manifest.json"))
    assert list(manifest["stages"]) == ["collect", "disseminate", "clip_det", "distill", "evaluate", "export"]
    assert not any(Path(str(tmp_path)).iterdir())  # nothing written locally instead


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


@dataclass
class RayHead:
    """A ``ray start --head --block`` cluster of this test: its process, GCS port and dashboard."""

    process: subprocess.Popen
    port: int
    dashboard: int


def start_head(env: dict[str, str]) -> RayHead:
    """Start a 4-CPU head on free ports and wait until its dashboard answers."""
    port, dash = free_port(), free_port()
    # --block keeps the head in this process group, so stopping it cannot touch other Ray instances.
    # Every port free, so a Ray instance already on this machine cannot block the job agent.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port")]
    process = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=4", f"--port={port}", *ports,
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(process, port, dash)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", process, 180)
    except BaseException:
        stop_head(head)
        raise
    return head


def stop_head(head: RayHead) -> None:
    """Stop the head and forget the machine-wide record ``ray start`` left of it.

    ``ray start`` writes its address to /tmp/ray/ray_current_cluster and only ``ray stop``
    removes it; a head stopped by a signal leaves it pointing at a dead cluster, and every
    later Ray Train run on the machine then waits ~10 s per stage for its
    PlacementGroupCleaner to time out on that address. Only a record naming this head goes.
    """
    os.killpg(head.process.pid, signal.SIGTERM)
    try:
        head.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.process.pid, signal.SIGKILL)
    record = Path(get_ray_address_file(None))
    try:
        if record.read_text().strip().endswith(f":{head.port}"):
            record.unlink()
    except OSError:
        pass


def _wait_http(url: str, head: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(1)


@pytest.mark.timeout(900)
def test_ray_job_submit_on_a_local_cluster(world, cloud, tmp_path):
    env = job_env()
    head = start_head(env)
    try:
        args = [a for a in adapt_args(world, cloud.url, str(tmp_path / "runs"))[2:] if a not in ("--num-cpus", "4")]
        for _ in range(20):  # the dashboard answers before its job agent is up
            submit = subprocess.run([RAY, "job", "submit", f"--address=http://127.0.0.1:{head.dashboard}",
                                     "--working-dir", ".", "--", "python", "jobs/adapt.py", *args],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        assert "| COIN |" in submit.stdout
        assert (tmp_path / "runs" / "t" / "report" / "table1.md").exists()
    finally:
        stop_head(head)
