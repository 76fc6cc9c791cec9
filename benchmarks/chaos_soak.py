"""Chaos soak: is every image accounted for, and is no task paid twice? (run by hand)

    .venv/bin/python benchmarks/chaos_soak.py [--images 2000] [--kill-at 0.5]

A detector server (``python -m coin_ray.serve --protocol dds``, a subprocess) speaks the
DDS V2 task + poll API over stored answers, with every fault at once: 429s (Retry-After
as seconds and as an HTTP date), 500s, hangs past the client's timeout (after the task
was created: the reply is lost), malformed bodies, failed tasks, and tasks that take
longer than the client's poll deadline. The collection driver (``run_collection`` on its
own local Ray, a child process) is SIGKILLed, with its whole process group, once the
server has created tasks for ``--kill-at`` of the images; then the same command runs
again (the resume), and again while tasks are left pending (at most ``--max-resumes``).

Prints images accounted for (a record, answered or with an error reason, in the final
cloud.parquet), duplicate paid creations (tasks created for an image beyond the first, as
the server counts them), spend (tasks created x price; and creation requests sent, from
the spend ledger), and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from collect_rate import CATEGORIES, make_world
from coin_ray import storage
from coin_ray.run import RunDir
from coin_ray.schema import table_to_records
from coin_ray.serve import spawn_server

TOKEN_ENV = "COIN_SOAK_TOKEN"
PRICE = 0.01


def server_argv(answers: Path, args: argparse.Namespace) -> list[str]:
    return ["--backend", "replay", "--url", str(answers), "--categories", ",".join(CATEGORIES),
            "--protocol", "dds", "--require-token-env", TOKEN_ENV, "--rps", str(args.server_rps),
            "--task-ms", str(args.task_ms), "--fail-task", "0.03", "--fail-500", "0.05",
            "--fail-429", "0.05", "--retry-after-s", "0.5", "--retry-after-date", "0.5",
            "--fail-hang", "0.02", "--hang-s", "3", "--fail-malformed", "0.02", "--seed", "7"]


def collection_config(root: Path, url: str, args: argparse.Namespace) -> dict:
    # poll_deadline_s sits inside the task-time range (task_ms x U(0.5, 1.5)): some tasks
    # outlast a poll and are polled again, by a retry or by the next run.
    return {"run_id": "soak", "storage": str(root / "runs"),
            "data": {"categories": CATEGORIES, "target_images": str(root / "imgs")},
            "cloud": {"backend": "dds", "url": url, "token_env": TOKEN_ENV,
                      "requests_per_second": args.client_rps, "max_in_flight": args.in_flight,
                      "num_actors": 2, "timeout_s": 1.0, "max_retries": 4,
                      "poll_deadline_s": args.task_ms / 1000.0 * 0.8, "max_retry_after_s": 5.0,
                      "price_per_call": PRICE, "max_calls": 10 ** 9}}


def child(cfg_path: str, uris_path: str, out: str) -> None:
    """One collection run into the run folder ``out`` on a fresh local Ray (the process the soak kills)."""
    import ray

    from coin_ray.config import from_dict
    from coin_ray.ray.collect import run_collection

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    cfg = from_dict(json.loads(Path(cfg_path).read_text()))
    summary = run_collection(cfg, json.loads(Path(uris_path).read_text()), RunDir(out), with_clip=False)
    Path(out, "pass_summary.json").write_text(json.dumps(summary))
    ray.shutdown()


def server_tasks(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/stats", timeout=10).read())["tasks"]


def run_pass(root: Path, url: str, n: int, kill_at: float | None) -> dict:
    """Run the driver; SIGKILL its process group once ``kill_at`` of the images have tasks."""
    env = {**os.environ, TOKEN_ENV: "soak-token", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(root / "cfg.json"),
                             str(root / "uris.json"), str(root)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(root / "driver.log", "ab"))
    killed = False
    while proc.poll() is None:
        if kill_at is not None and server_tasks(url)["images_created"] >= kill_at * n:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
            killed = True
            break
        time.sleep(0.2)
    rc = proc.wait()
    if not killed and rc != 0:
        raise RuntimeError(f"collection exited with {rc}; see {root / 'driver.log'}")
    time.sleep(2.0 if killed else 0.0)  # let the killed Ray processes go
    return {"killed": killed, "seconds": round(time.monotonic() - start, 1),
            "tasks_created_so_far": server_tasks(url)["creations"]}


def account(root: Path, uris: list[str]) -> dict:
    records = table_to_records(storage.read_parquet(RunDir(str(root)).cloud_detections))
    seen = Counter(r.uri for r in records)
    reasons = Counter(r.error.split(":", 1)[0] for r in records if r.error)
    return {"accounted_for": sum(1 for u in uris if seen[u] == 1), "records": len(records),
            "answered": sum(1 for r in records if not r.error), "errors_by_reason": dict(reasons),
            "pending_left": sum(1 for r in records if "polled again" in r.error)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--kill-at", type=float, default=0.5)
    p.add_argument("--task-ms", type=float, default=600.0)
    p.add_argument("--server-rps", type=float, default=60.0)
    p.add_argument("--client-rps", type=float, default=50.0)
    p.add_argument("--in-flight", type=int, default=24)
    p.add_argument("--max-resumes", type=int, default=3)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="coin-soak-"))
    uris = make_world(root, args.images)
    (root / "uris.json").write_text(json.dumps(uris))
    proc, url = spawn_server(server_argv(root / "answers.parquet", args), timeout_s=60.0,
                             env={**os.environ, TOKEN_ENV: "soak-token"})
    (root / "cfg.json").write_text(json.dumps(collection_config(root, url, args)))
    start = time.monotonic()
    try:
        passes = [run_pass(root, url, args.images, args.kill_at)]
        while len(passes) < 1 + args.max_resumes:
            passes.append(run_pass(root, url, args.images, None))
            if account(root, uris)["pending_left"] == 0:
                break
        tasks = server_tasks(url)
    finally:
        proc.terminate()
    wall = time.monotonic() - start
    ledger = json.loads(storage.read_text(RunDir(str(root)).collect_spend))["calls"]
    print(json.dumps({
        "images": args.images, "passes": passes, **account(root, uris),
        "duplicate_paid_creations": tasks["duplicate_creations"],
        "tasks_created": tasks["creations"], "idempotent_replays": tasks["idempotent_replays"],
        "tasks_failed_by_server": tasks["tasks_failed"],
        "spend_tasks_created": round(tasks["creations"] * PRICE, 2),
        "creation_requests_sent": ledger, "spend_upper_bound_requests": round(ledger * PRICE, 2),
        "wall_s": round(wall, 1)}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
