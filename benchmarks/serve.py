"""Online serving: the exported detector on Ray Serve, batched and unbatched, against the
stand-in cloud it replaces, all through the same ``http`` client on 127.0.0.1.

    .venv/bin/python benchmarks/serve.py --world demo           # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/serve.py --world tiny --requests 20

For each server and each number of concurrent clients (1, 8, 32): throughput (answered
requests per second of wall time) and p50 / p99 latency of a request, as the client sees
it (JSON + base64 encoding, HTTP on loopback, decoding, detection, answer). Servers:

- batched: ``coin-ray serve``'s deployment (``coin_ray.ray.serve_model``), one replica on
  one core with one intra-op thread, ``@serve.batch`` up to 8 requests, 10 ms wait;
- unbatched: the same with a batch size of 1;
- cloud: the Foggy-Shapes stand-in cloud detector served by ``python -m coin_ray.serve``
  (own process, one torch thread) with the demo's 50 ms of added network latency.

The detector: without ``--model``, a fresh target of the demo's architecture
(``model.target_backbone=mobilenet_v3``, the demo script's choice) on the world's CLIP
stand-in, exported at the world's image size. Latency depends on the architecture and the
input size, and on the weights only through the candidates the final NMS sees: an untrained
head's flat probabilities make every proposal a candidate of every class (the per-image cap
is reached), which a batch pays for together; measure a run's detector with ``--model``.
Every client sends the world's target val images in turn;
each measurement is bounded in requests (``--requests`` per client count, at least 6 per
client) and in time (``--max-seconds``). Writes benchmarks/results/serve-<world>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve

from coin_ray import storage
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.config import ModelConfig
from coin_ray.data.images import load_image
from coin_ray.deploy import ServeSettings
from coin_ray.export import export_detector
from coin_ray.models.build import save_detector
from coin_ray.models.light_rcnn import LightRCNN
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.ray.serve_model import serve_detector
from coin_ray.serve import free_port, spawn_server
from coin_ray.world.build import build_world

CLIENTS = (1, 8, 32)
CLOUD_LATENCY_MS = 50.0  # the demo's stand-in cloud (coin_ray.demo.DEMO_CLOUD_LATENCY_S)
RESULTS = Path(__file__).parent / "results"


def export_demo_detector(world, out: str, model_uri: str = "") -> str:
    """Export ``model_uri`` (default: a fresh mobilenet_v3 target on the world's CLIP) to ``out``."""
    uris = storage.list_files(str(world.target_val_images), (".jpg", ".png"))
    if not model_uri:
        teacher = OpenVocabularyRCNN.from_clip(str(world.clip_dir), list(world.categories))
        model_uri = f"{out}/model.pt"
        save_detector(LightRCNN.from_teacher(teacher, ModelConfig(target_backbone="mobilenet_v3"), seed=0), model_uri)
    meta = export_detector(model_uri, f"{out}/export", example_uri=uris[0], batch_sizes=(1, 8), check_uris=uris[:4])
    print(f"exported {meta['input_size']} ({'ONNX' if 'file' in meta['onnx'] else 'TorchScript only'})", flush=True)
    return f"{out}/export"


def measure(url: str, items: list[tuple[bytes, np.ndarray]], categories: list[str], clients: int,
            requests: int, max_seconds: float) -> dict:
    """``clients`` threads calling ``url`` until ``requests`` answers or ``max_seconds``;
    throughput (req/s) and latency percentiles (ms)."""
    backend = HttpBackend(url, threshold=0.25, timeout_s=60.0)
    latencies: list[float] = []
    errors: list[str] = []
    lock, count = threading.Lock(), iter(range(10**9))
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            i = next(count)
            if i >= requests:
                return
            data, image = items[i % len(items)]
            start = time.perf_counter()
            try:
                backend.detect(data, image, categories)
            except Exception as err:  # noqa: BLE001 (counted and reported, never hidden)
                with lock:
                    errors.append(type(err).__name__)
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(wall, 2),
            "throughput": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def sweep(name: str, url: str, items, categories, args) -> list[dict]:
    """One server at every client count (after a warm-up round), printed as it goes."""
    measure(url, items, categories, 4, 8, args.max_seconds)
    rows = []
    for clients in CLIENTS:
        row = {"server": name, **measure(url, items, categories, clients, max(args.requests, 6 * clients),
                                         args.max_seconds)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | throughput (req/s) | p50 (ms) | p99 (ms) | requests | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['server']} | {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['requests']} | {r['errors']} |" for r in rows]
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    """The issue's goals at 8 clients: batching >= 1.5x unbatched throughput; p99 <= 3x p50."""
    at8 = {r["server"]: r for r in rows if r["clients"] == 8}
    speedup = at8["batched"]["throughput"] / at8["unbatched"]["throughput"]
    out = {"batched_over_unbatched_at_8": round(speedup, 2), "goal_speedup_met": speedup >= 1.5}
    for name in ("batched", "unbatched"):
        tail = at8[name]["p99_ms"] / at8[name]["p50_ms"]
        out[f"{name}_p99_over_p50_at_8"] = round(tail, 2)
        out[f"{name}_goal_tail_met"] = tail <= 3.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--model", default="", help="a model.pt (default: fresh mobilenet_v3 target)")
    parser.add_argument("--requests", type=int, default=48, help="answered requests per measurement (min)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per measurement")
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    world = build_world(args.world)
    uris = storage.list_files(str(world.target_val_images), (".jpg", ".png"))[:32]
    items = [(storage.read_bytes(u), load_image(u)) for u in uris]
    categories = list(world.categories)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        export = export_demo_detector(world, tmp, args.model)
        # address="local": a fresh instance of our own, never a cluster already running here.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        try:
            for name, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
                settings = ServeSettings(max_batch_size=batch, batch_wait_s=0.01)
                url = serve_detector(export, settings, port=port, name=name, route_prefix=f"/{name}")
                rows += sweep(name, url, items, categories, args)
                serve.delete(name)  # one replica at a time: each has the cores to itself
        finally:
            serve.shutdown()
            ray.shutdown()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc, url = spawn_server(["--backend", "foggy-shapes", "--checkpoint", str(world.cloud_detector),
                              "--latency-ms", str(CLOUD_LATENCY_MS)], timeout_s=120.0, env=env)
    try:
        rows += sweep(f"cloud stand-in (+{CLOUD_LATENCY_MS:g} ms)", url, items, categories, args)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    summary = {"world": args.world, "images": len(items), "rows": rows, "goals": goals(rows)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serve-{args.world}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(rows))
    print(json.dumps(summary["goals"]))


if __name__ == "__main__":
    main()
