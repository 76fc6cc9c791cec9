"""The whole job on the tiny Foggy-Shapes world: s3:// everywhere, kill + resume.

Each test runs ``jobs/adapt.py`` as a real subprocess (its own local Ray instance) against
the project's detector server on 127.0.0.1. ``ray job submit`` against a ``ray start --head``
cluster (``start_head`` here) is tested in test_entry_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from coin_ray import storage
from coin_ray.serve import Knobs, checkpoint_model_name, start_server
from coin_ray.world.cloud_standin import StandInCloudDetector


ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Short schedules: these tests check plumbing, not quality.
FAST = ["train.disseminate.steps=3", "train.distill.steps=4", "train.disseminate.batch_size=2", "train.distill.batch_size=2",
        "train.disseminate.checkpoint_every=2", "train.distill.checkpoint_every=2", "ray.num_workers=0",
        "cloud.requests_per_second=50", "cloud.num_actors=1"]
ARTEFACTS = ["manifest.json", "config.yaml", "collect/cloud.parquet", "collect/clip.parquet",
             "collect/summary.json", "disseminate/model.pt", "clip_det/detections.parquet",
             "distill/model.pt", "eval/coin.parquet", "report/table1.md", "report/metrics.json",
             "report/ap_per_class.png", "report/detections.png", "export/export.json"]


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
