"""How fast does collection call a rate-limited, slow cloud detector? (run by hand)

    .venv/bin/python benchmarks/collect_rate.py [--images 500] [--seq-images 40]

A detector server (``python -m coin_ray.serve``, a subprocess) replays stored answers with
250 ms added latency and a 50 requests/s limit (429 above it). The same images are then
labelled twice: by a sequential one-request-at-a-time client (how the reference code and
autodistill label) on the first ``--seq-images`` images, and by ``run_collection`` on Ray
with the cluster-wide limiter set just under the server's limit. Prints the achieved
request rates (overall, and steady state between the first and last request the server
saw), the share of requests answered 429, and the speed-up over the sequential client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from coin_ray import storage
from coin_ray.cloud.errors import Secret
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.config import from_dict
from coin_ray.data.images import decode_image
from coin_ray.ray.collect import run_collection
from coin_ray.run import RunDir
from coin_ray.schema import SOURCE_CLOUD, Detections, records_to_table
from coin_ray.serve import spawn_server

CATEGORIES = ["car", "bus", "person"]


def make_world(root: Path, n: int, seed: int = 0) -> list[str]:
    """n small PNG images plus answers.parquet holding 1-4 random boxes per image."""
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True)
    uris, records = [], []
    for i in range(n):
        image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        path = root / "imgs" / f"im_{i:04d}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        k = int(rng.integers(1, 5))
        xy = rng.uniform(0, 30, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 18, (k, 2))], 1).astype(np.float32)
        records.append(Detections.from_class_only(path.stem, str(path), 64, 48, boxes,
                                                  rng.integers(0, 3, k), rng.uniform(0.3, 1, k),
                                                  len(CATEGORIES), SOURCE_CLOUD))
        uris.append(str(path))
    storage.write_parquet(records_to_table(records), str(root / "answers.parquet"))
    return uris


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/stats?arrivals=1", timeout=10).read())


def sequential_rate(url: str, uris: list[str]) -> float:
    """Requests/s of one client sending one request at a time (no retries needed: < limit)."""
    backend = HttpBackend(url, token=Secret(""))
    start = time.monotonic()
    for uri in uris:
        data = storage.read_bytes(uri)
        backend.detect(data, decode_image(data), CATEGORIES)
    return len(uris) / (time.monotonic() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--seq-images", type=int, default=40)
    p.add_argument("--latency-ms", type=float, default=250.0)
    p.add_argument("--server-rps", type=float, default=50.0)
    p.add_argument("--client-rps", type=float, default=48.0)
    p.add_argument("--in-flight", type=int, default=20)
    p.add_argument("--actors", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="coin-bench-"))
    uris = make_world(root, args.images)
    # The server in its own process, as a user's detector runs: its threads stay off this interpreter.
    proc, url = spawn_server(["--backend", "replay", "--url", str(root / "answers.parquet"),
                              "--categories", ",".join(CATEGORIES), "--latency-ms", str(args.latency_ms),
                              "--rps", str(args.server_rps)], timeout_s=30.0)
    try:
        seq = sequential_rate(url, uris[:args.seq_images])
        before = stats(url)
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        cfg = from_dict({"run_id": "bench", "storage": str(root / "runs"),
                         "data": {"categories": CATEGORIES, "target_images": str(root / "imgs")},
                         "cloud": {"backend": "http", "url": url, "requests_per_second": args.client_rps,
                                   "max_in_flight": args.in_flight, "num_actors": args.actors,
                                   "timeout_s": 10.0}})
        t_start = time.time()
        summary = run_collection(cfg, uris, RunDir(str(root)), with_clip=False)
        after = stats(url)
    finally:
        proc.terminate()
        ray.shutdown()
    requests = after["detect_requests"] - before["detect_requests"]
    n429 = after["status"].get("429", 0) - before["status"].get("429", 0)
    arrivals = after["arrivals"][before["detect_requests"]:]
    steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    lo, hi = len(arrivals) // 10, len(arrivals) * 9 // 10  # the middle 80%: no ramp-up or tail
    middle = (hi - lo) / (arrivals[hi] - arrivals[lo])
    gaps = np.diff(arrivals) * 1000.0
    overall = summary["calls"] / summary["seconds"]
    print(json.dumps({
        "images": args.images, "server": {"latency_ms": args.latency_ms, "rps_limit": args.server_rps},
        "client": {"rps": args.client_rps, "in_flight": args.in_flight, "actors": args.actors},
        "sequential_req_per_s": round(seq, 2),
        "collection_req_per_s_overall": round(overall, 2),
        "collection_req_per_s_steady": round(steady, 2),
        "collection_req_per_s_middle_80pct": round(middle, 2),
        "gap_ms_p50_p90_p99_max": [round(float(np.percentile(gaps, q)), 1) for q in (50, 90, 99, 100)],
        "startup_s": round(arrivals[0] - t_start, 2),
        "requests_each_second": np.bincount((np.asarray(arrivals) - arrivals[0]).astype(int)).tolist(),
        "server_requests": requests, "answered_429": n429,
        "pct_429": round(100.0 * n429 / max(requests, 1), 2),
        "errors": summary["errors"], "seconds": summary["seconds"],
        "slots_given_back_late": summary["limiter_grants"] - summary["calls"],
        "speedup_steady_vs_sequential": round(steady / seq, 1),
        "speedup_overall_vs_sequential": round(overall / seq, 1)}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main()
