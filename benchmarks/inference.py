"""Latency and throughput of the exported target detector on CPU against the cloud's round trip.

The paper's motivation: the adapted detector is small and local, the cloud detector is
slow per call. This measures both sides on this machine:

- the target detector: eager ``OpenVocabularyRCNN.detect``, the TorchScript export
  (``coin_ray.export``) and the ONNX export in onnxruntime (``.[onnx]`` extra; one
  intra-op thread like torch) at batch 1 and batched, on the world's target val images;
- the cloud: the Foggy-Shapes stand-in served by ``python -m coin_ray.serve`` (a separate
  process, HTTP on 127.0.0.1), called through the project's ``http`` backend client, once
  with no added latency (its compute + HTTP + JPEG transfer) and once with the demo's
  added network latency.

    .venv/bin/python benchmarks/inference.py --world tiny --repeats 10
    .venv/bin/python benchmarks/inference.py --model runs/<id>/distill/model.pt

Without ``--model`` a fresh detector is built on the world's CLIP stand-in with the default
ModelConfig: latency depends on the architecture and the input size, not on the weights.
Prints medians of wall time and of process CPU time (steadier on a shared machine); for
the cloud, the server process's CPU time per call is added from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from coin_ray import storage
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.data.images import load_image
from coin_ray.export import export_detector, image_tensor, load_exported
from coin_ray.models.build import load_detector, save_detector
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.serve import spawn_server
from coin_ray.world.build import build_world

DEMO_LATENCY_MS = 50.0  # what coin_ray.ray.pipeline adds for the demo's stand-in cloud


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall ms, process-CPU ms) of ``repeats`` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def process_cpu_ms(pid: int) -> float:
    """User + system CPU time of another process (Linux /proc), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def cloud_round_trip(world, uris: list[str], latency_ms: float, repeats: int, port: int
                     ) -> tuple[tuple[float, float], float]:
    """((median wall ms, median client CPU ms), mean server CPU ms) per call."""
    # The stand-in cloud in its own process, so that its CPU time can be read apart.
    proc, url = spawn_server(["--backend", "foggy-shapes", "--checkpoint", str(world.cloud_detector),
                              "--latency-ms", str(latency_ms)], port=port, timeout_s=120.0)
    try:
        client = HttpBackend(url)
        items = [(storage.read_bytes(u), load_image(u)) for u in uris]
        calls = iter(range(10**9))

        def one() -> None:
            data, image = items[next(calls) % len(items)]
            client.detect(data, image, list(world.categories))

        one()
        server_before = process_cpu_ms(proc.pid)
        result = timed(one, repeats)
        # timed() makes repeats + 1 calls (one warm-up).
        return result, (process_cpu_ms(proc.pid) - server_before) / (repeats + 1)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="tiny", choices=["tiny", "demo", "bench"])
    parser.add_argument("--model", default="", help="a model.pt (default: fresh detector on the world's CLIP)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core)")
    parser.add_argument("--port", type=int, default=8591)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = build_world(args.world)
    uris = storage.list_files(str(world.target_val_images), (".jpg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = args.model
        if not model_uri:
            model_uri = f"{tmp}/model.pt"
            save_detector(OpenVocabularyRCNN.from_clip(str(world.clip_dir), list(world.categories)), model_uri)
        meta = export_detector(model_uri, f"{tmp}/export", example_uri=uris[0], batch_sizes=(1, args.batch))
        model, exported = load_detector(model_uri).eval(), load_exported(f"{tmp}/export")
        onnx = load_exported(f"{tmp}/export", runtime="onnx", num_threads=args.threads) if "file" in meta["onnx"] else None
        images = [image_tensor(load_image(u)) for u in uris]
        batch = (images * args.batch)[: args.batch]
        rows = {
            "eager, batch 1": (timed(lambda: model.detect(images[:1]), args.repeats), 1),
            "TorchScript, batch 1": (timed(lambda: exported.detect(images[:1]), args.repeats), 1),
            f"eager, batch {args.batch}": (timed(lambda: model.detect(batch), args.repeats), args.batch),
            f"TorchScript, batch {args.batch}": (timed(lambda: exported.detect(batch), args.repeats), args.batch),
        }
        if onnx is not None:
            rows["ONNX (onnxruntime), batch 1"] = (timed(lambda: onnx.detect(images[:1]), args.repeats), 1)
            onnx.batch_size = args.batch
            rows[f"ONNX (onnxruntime), batch {args.batch}"] = (timed(lambda: onnx.detect(batch), args.repeats),
                                                               args.batch)
        server_cpu = {}
        for name, latency, port in (("cloud stand-in over HTTP, no added latency", 0.0, args.port),
                                    (f"cloud stand-in over HTTP, +{DEMO_LATENCY_MS:.0f} ms network",
                                     DEMO_LATENCY_MS, args.port + 1)):
            times, server_cpu[name] = cloud_round_trip(world, uris, latency, args.repeats, port)
            rows[name] = (times, 1)
    size = tuple(meta["input_size"])
    print(f"world {args.world}, images {size[1]}x{size[0]}, torch threads {args.threads}, "
          f"repeats {args.repeats}, export check {json.dumps(meta['check'])}, "
          f"onnx check {json.dumps(meta['onnx'].get('check', meta['onnx']))}")
    print("| path | wall ms / call | wall ms / image | images / s | CPU ms / call (client + server) |")
    print("|---|---|---|---|---|")
    for name, ((wall, cpu), n) in rows.items():
        extra = f" + {server_cpu[name]:.1f}" if name in server_cpu else ""
        print(f"| {name} | {wall:.1f} | {wall / n:.1f} | {1000 * n / wall:.1f} | {cpu:.1f}{extra} |")
    ts_cpu = rows[f"TorchScript, batch {args.batch}"][0][1] / args.batch
    for name, cpu in server_cpu.items():
        (wall, client), _ = rows[name]
        print(f"per image vs {name}: CPU {ts_cpu:.1f} ms (TorchScript batched) vs {client + cpu:.1f} ms; "
              f"wall {rows['TorchScript, batch 1'][0][0]:.1f} ms (TorchScript batch 1) vs {wall:.1f} ms")


if __name__ == "__main__":
    main()
