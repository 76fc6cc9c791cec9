"""The exported detector on a real Ray Serve deployment (127.0.0.1): the same detections as
``predict`` over both protocols, a collection against it, the token, every bad input."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from coin_ray import storage
from coin_ray.cloud.dds import DdsBackend
from coin_ray.cloud.errors import Secret
from coin_ray.cloud.http_backend import HttpBackend, request_to_json
from coin_ray.cloud.imageio import encode_png
from coin_ray.config import from_dict
from coin_ray.data.images import load_image
from coin_ray.deploy import ServeSettings, token_digest
from coin_ray.export import export_detector, pair_detections
from coin_ray.models.build import save_detector
from coin_ray.ray.collect import CollectionStopped, run_collection
from coin_ray.ray.predict import ExportedPredictor
from coin_ray.run import RunDir
from coin_ray.schema import table_to_records
from coin_ray.serve import free_port
from tiny_detector import detector_with_wide_gap_threshold

pytest.importorskip("onnxruntime")
serve = pytest.importorskip("ray.serve")

TOKEN = "tok-serve-model-5d2e81c0a7"
BODY_CAP = 96 * 1024  # bytes; the tiny world's JPEGs are ~10 KB
PIXEL_CAP = 256 * 160 * 2  # twice the tiny world's images


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A tiny run folder: a detector on the tiny world's CLIP stand-in exported to <run>/export,
    and a report/metrics.json; returns (world, run root)."""
    from coin_ray.world.build import build_world

    world = build_world("tiny")
    root = tmp_path_factory.mktemp("runs") / "tiny-run"
    val = storage.list_files(str(world.target_val_images), (".jpg", ".png"))
    model = detector_with_wide_gap_threshold(str(world.clip_dir), list(world.categories), val)
    save_detector(model, str(root / "distill" / "model.pt"))
    export_detector(str(root / "distill" / "model.pt"), str(root / "export"), example_uri=val[0],
                    batch_sizes=(1, 2), check_uris=val[:2])
    (root / "report").mkdir()
    (root / "report" / "metrics.json").write_text(json.dumps({"table1": {"COIN": {"map50": 12.5}}}))
    return world, root


@pytest.fixture(scope="module")
def served(local_ray, run_export):
    """One Serve instance for the module: the tiny export, dds on, a token, small caps."""
    from coin_ray.ray.serve_model import serve_detector

    _, root = run_export
    settings = ServeSettings(max_batch_size=4, batch_wait_s=0.02, cpus_per_replica=0.5, dds=True,
                             token_sha256=token_digest(TOKEN), max_request_bytes=BODY_CAP, max_pixels=PIXEL_CAP)
    url = serve_detector(str(root / "export"), settings, port=free_port())
    yield url
    serve.shutdown()


def call(url: str, body: bytes | None = None, token: str = TOKEN, method: str = "") -> tuple[int, dict]:
    """(status, parsed JSON body) of one request."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}", "Token": token}
    req = urllib.request.Request(url, data=body, headers=headers, method=method or ("POST" if body else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def replica_requests(url: str) -> dict:
    return call(url + "/v1/model")[1]["replica_requests"]


@pytest.mark.timeout(300)
def test_both_protocols_answer_with_the_detections_of_predict(served, run_export):
    world, root = run_export
    categories = list(world.categories)
    uris = storage.list_files(str(world.target_val_images), (".jpg", ".png"))
    # predict's own per-batch code (the Ray Data map_batches class), on one batch of them all.
    batch = {"uri": np.asarray(uris), "image_id": np.asarray([Path(u).stem for u in uris])}
    predicted = table_to_records(ExportedPredictor(str(root / "export"), runtime="onnx")(batch))
    http = HttpBackend(served, threshold=0.0, token=Secret(TOKEN), categories=categories)
    dds = DdsBackend(token=Secret(TOKEN), endpoint=served, threshold=0.0, poll_interval_s=0.05)
    counts = []
    for rec in predicted:
        data, image = storage.read_bytes(rec.uri), load_image(rec.uri)
        expected = {"boxes": torch.from_numpy(rec.boxes), "labels": torch.from_numpy(rec.labels.astype(np.int64)),
                    "scores": torch.from_numpy(rec.scores)}
        for client in (http, dds):
            answer = client.detect(data, image, categories)
            got = {"boxes": torch.from_numpy(answer.boxes),
                   "labels": torch.tensor([categories.index(p) for p in answer.phrases], dtype=torch.int64),
                   "scores": torch.from_numpy(np.asarray(answer.scores))}
            pairs, unpaired = pair_detections(expected, got)
            assert unpaired == 0 and len(pairs) == len(rec.boxes) == len(answer.boxes)
            for a, b in pairs:
                assert float((expected["boxes"][a] - got["boxes"][b]).abs().max()) <= 1e-3
        counts.append(len(rec.boxes))
    assert sum(counts) > 0 and len(set(counts)) > 1
    # Asking for one category answers with that category's detections only.
    rec = next(r for r in predicted if len(r.labels))
    one = categories[int(rec.labels[0])]
    answer = http.detect(storage.read_bytes(rec.uri), load_image(rec.uri), [one])
    assert set(answer.phrases) == {one} and len(answer.boxes) == int((rec.labels == rec.labels[0]).sum())


@pytest.mark.timeout(300)
def test_health_and_model_routes_describe_the_run(served, run_export):
    world, root = run_export
    status, health = call(served + "/v1/health", token="")
    assert status == 200 and health["run_id"] == "tiny-run" and health["val_map50"] == 12.5
    assert health["categories"] == list(world.categories) and health["runtime"] == "onnx"
    assert len(health["export_sha256"]) == 64 and health["model"] == f"coin-tiny-run-{health['export_sha256'][:12]}"
    assert HttpBackend(served).server_model() == health["model"]
    status, model = call(served + "/v1/model")
    assert status == 200 and model["settings"]["max_batch_size"] == 4 and "token_sha256" not in model["settings"]
    assert call(served + "/v1/model", token="nope")[0] == 401


@pytest.mark.timeout(300)
def test_a_collection_against_it_completes_and_a_refused_token_costs_one_request(
        served, run_export, tmp_path, monkeypatch, capfd):
    world, _ = run_export
    uris = storage.list_files(str(world.target_train_images), (".jpg", ".png"))

    def cfg(run_id: str):
        return from_dict({"run_id": run_id, "storage": str(tmp_path / "runs"),
                          "data": {"categories": list(world.categories), "target_images": str(world.target_train_images)},
                          "cloud": {"backend": "http", "url": served, "token_env": "COIN_SERVE_TEST_TOKEN",
                                    "cache": str(tmp_path / run_id / "cache"),  # the refused run may not hit the cache
                                    "threshold": 0.0, "requests_per_second": 50.0, "max_in_flight": 4,
                                    "num_actors": 1, "timeout_s": 30.0, "max_retries": 2}})

    monkeypatch.setenv("COIN_SERVE_TEST_TOKEN", TOKEN)
    summary = run_collection(cfg("ok"), uris, RunDir(str(tmp_path / "ok")), with_clip=False)
    assert summary["calls"] == len(uris) and summary["errors"] == 0 and summary["boxes"] > 0

    before = replica_requests(served).get("detect 401", 0)
    monkeypatch.setenv("COIN_SERVE_TEST_TOKEN", "wrong-" + TOKEN)
    with pytest.raises(CollectionStopped):
        run_collection(cfg("refused"), uris, RunDir(str(tmp_path / "refused")), with_clip=False)
    assert replica_requests(served).get("detect 401", 0) == before + 1
    time.sleep(1.0)  # let replicas flush their logs
    out, err = capfd.readouterr()
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    texts = [out, err] + [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
    assert not any(TOKEN in t for t in texts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.timeout(300)
def test_each_bad_input_gets_its_4xx_and_the_next_good_request_works(served, run_export):
    world, _ = run_export
    uri = storage.list_files(str(world.target_val_images), (".jpg", ".png"))[0]
    good = json.dumps(request_to_json(storage.read_bytes(uri), list(world.categories), 0.0)).encode()
    big = encode_png(np.zeros((400, 400, 3), np.uint8))  # 160000 pixels, a small file
    bad = {
        "malformed JSON": (b'{"image": "abc", "prompts": [', 400, "malformed JSON"),
        "not an object": (b'[1, 2]', 400, "malformed JSON"),
        "bad base64": (json.dumps({"image": "@@not base64@@", "prompts": ["car"]}).encode(), 400, "base64"),
        "not an image": (json.dumps({"image": _b64(b"GIF89a garbage"), "prompts": ["car"]}).encode(), 400,
                         "undecodable image"),
        "truncated image": (json.dumps({"image": _b64(storage.read_bytes(uri)[:300]), "prompts": ["car"]}).encode(),
                            400, "undecodable image"),
        "unknown categories": (json.dumps({"image": _b64(storage.read_bytes(uri)),
                                           "prompts": ["car", "unicorn", "spaceship"]}).encode(), 400,
                               "unknown categories: 'unicorn', 'spaceship'"),
        "too many pixels": (json.dumps({"image": _b64(big), "prompts": ["car"]}).encode(), 413, "over the cap"),
        "too many bytes": (json.dumps({"image": "A" * BODY_CAP, "prompts": ["car"]}).encode(), 413, "over the cap"),
    }
    for name, (body, status, says) in bad.items():
        got, reply = call(served + "/v1/detect", body)
        assert (got, says in reply.get("error", "")) == (status, True), (name, reply)
        assert "\n" not in reply["error"]
        assert call(served + "/v1/detect", good)[0] == 200, name
    dds_bad = json.dumps({"image": "data:image/jpeg;base64,%%%", "prompt": {"type": "text", "text": "car"}}).encode()
    got, reply = call(served + "/v2/task/grounding_dino/detection", dds_bad)
    assert got == 400 and reply["code"] == 400 and "bad task request" in reply["msg"]
    assert call(served + "/v2/task_status/0123abcd")[0] == 404
    assert call(served + "/v1/nowhere")[0] == 404 and call(served + "/v1/detect")[0] == 405
    assert call(served + "/v1/detect", good)[0] == 200


@pytest.mark.timeout(300)
def test_a_retried_task_creation_gets_its_task_back(served, run_export):
    world, _ = run_export
    uri = storage.list_files(str(world.target_val_images), (".jpg", ".png"))[0]
    body = json.dumps({"image": "data:image/jpeg;base64," + _b64(storage.read_bytes(uri)),
                       "prompt": {"type": "text", "text": ".".join(world.categories)}}).encode()
    ids = []
    for _ in range(2):
        req = urllib.request.Request(served + "/v2/task/grounding_dino/detection", data=body, method="POST",
                                     headers={"Token": TOKEN, "Idempotency-Key": "retry-7"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            ids.append(json.loads(resp.read())["data"]["task_uuid"])
    assert ids[0] == ids[1]
    status, reply = call(served + f"/v2/task_status/{ids[0]}")
    assert status == 200 and reply["data"]["status"] == "success" and "objects" in reply["data"]["result"]
