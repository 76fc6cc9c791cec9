"""dds against a loopback fake of the V2 API, rekognition via botocore's Stubber, replay files."""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import numpy as np
import pytest
from botocore.stub import ANY, Stubber
from PIL import Image

from cloud_world import CATEGORIES, draw, png_bytes
from coin_ray import storage
from coin_ray.cloud.dds import DdsBackend
from coin_ray.cloud.errors import AuthError, PermanentError, Secret, TransientError
from coin_ray.cloud.export_coco import export_coco
from coin_ray.cloud.mapping import CategoryMap, answer_to_detections
from coin_ray.cloud.rekognition import RekognitionBackend
from coin_ray.cloud.replay import ReplayBackend
from coin_ray.schema import SOURCE_CLOUD, Detections, records_to_table

TOKEN = "dds-tok-0b1c2d3e4f"


class FakeDds(ThreadingHTTPServer):
    """Speaks the documented V2 shapes; finds red/blue blobs in the image it is sent."""

    daemon_threads = True

    def __init__(self, mode: str = "ok") -> None:
        super().__init__(("127.0.0.1", 0), _DdsHandler)
        self.mode = mode
        self.tasks: dict[str, dict] = {}
        self.sizes: list[tuple[int, int]] = []
        self.bodies: list[dict] = []


class _DdsHandler(BaseHTTPRequestHandler):
    server: FakeDds

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Token") != TOKEN:
            return self._reply(401, {"code": 401, "msg": "bad token"})
        if self.path != "/v2/task/grounding_dino/detection" or not self.headers.get("Idempotency-Key"):
            return self._reply(400, {"code": 400, "msg": "bad path", "data": {"errors": []}})
        if self.server.mode == "retry":
            return self._reply(200, {"code": 202001, "msg": "busy"})
        self.server.bodies.append(body)
        data = base64.b64decode(body["image"].split(",", 1)[1])
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        self.server.sizes.append(image.shape[:2])
        objects = []
        for name, rgb in (("Car ", (255, 0, 0)), ("bus", (0, 0, 255))):
            ys, xs = np.nonzero(np.abs(image - rgb).sum(-1) < 90)
            if len(xs):
                objects.append({"bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                         int(ys.max()) + 1], "category": name, "score": 0.7})
        task = uuid.uuid4().hex
        self.server.tasks[task] = {"polls": 0, "objects": objects}
        self._reply(200, {"code": 0, "msg": "ok", "data": {"task_uuid": task}})

    def do_GET(self) -> None:
        task = self.server.tasks[self.path.rsplit("/", 1)[-1]]
        task["polls"] += 1
        done = task["polls"] >= 2 and self.server.mode != "never"
        data = {"status": "success", "result": {"objects": task["objects"]}} if done \
            else {"status": "running"}
        self._reply(200, {"code": 0, "msg": "ok", "data": data})


@pytest.fixture
def fake_dds(monkeypatch):
    servers = []

    def start(mode: str = "ok") -> FakeDds:
        server = FakeDds(mode)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("DDS_CLOUDAPI_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _big_image() -> np.ndarray:
    image = np.zeros((1000, 2000, 3), np.uint8)
    image[100:500, 200:800] = (255, 0, 0)
    image[600:900, 1200:1900] = (0, 0, 255)
    return image


def test_dds_shrinks_above_1536_and_scales_boxes_back(fake_dds):
    server = fake_dds()
    image = _big_image()
    backend = DdsBackend(token=Secret(TOKEN), poll_interval_s=0.01, endpoint="https://unused")
    answer = backend.detect(png_bytes(image), image, ["car", "bus"])
    assert server.sizes == [(768, 1536)]
    body = server.bodies[0]
    assert body["prompt"] == {"type": "text", "text": "car.bus"} and body["targets"] == ["bbox"]
    np.testing.assert_allclose(answer.boxes, [[200, 100, 800, 500], [1200, 600, 1900, 900]], atol=4)
    rec, dropped = answer_to_detections(answer, CategoryMap.build(CATEGORIES), "i", "i", 2000, 1000)
    assert rec.labels.tolist() == [0, 1] and not dropped  # "Car " normalises to car


def test_dds_small_image_sent_as_is(fake_dds):
    server = fake_dds()
    image, truth = draw(2)
    answer = DdsBackend(token=Secret(TOKEN), poll_interval_s=0.01).detect(png_bytes(image), image, ["car"])
    assert server.bodies[0]["image"].startswith("data:image/png;base64,")
    np.testing.assert_allclose(answer.boxes[0], truth["car"])


def test_dds_errors_are_classified(fake_dds):
    image, _ = draw(0)
    fake_dds()
    with pytest.raises(AuthError) as err:
        DdsBackend(token=Secret("wrong")).detect(png_bytes(image), image, ["car"])
    assert "wrong" not in str(err.value)
    fake_dds("retry")
    with pytest.raises(TransientError, match="dds retry"):
        DdsBackend(token=Secret(TOKEN)).detect(png_bytes(image), image, ["car"])
    fake_dds("never")
    with pytest.raises(TransientError, match="poll deadline"):
        DdsBackend(token=Secret(TOKEN), poll_deadline_s=0.2, poll_interval_s=0.05).detect(
            png_bytes(image), image, ["car"])


def _rekognition_reply() -> dict:
    return {"Labels": [
        {"Name": "Car", "Confidence": 97.0, "Instances": [
            {"BoundingBox": {"Left": 0.1, "Top": 0.2, "Width": 0.5, "Height": 0.25}, "Confidence": 95.0},
            {"BoundingBox": {"Left": 0.9, "Top": 0.9, "Width": 0.3, "Height": 0.3}, "Confidence": 60.0}]},
        {"Name": "Vehicle", "Confidence": 97.0, "Instances": [], "Parents": []},
        {"Name": "Tree", "Confidence": 80.0, "Instances": [
            {"BoundingBox": {"Left": 0.0, "Top": 0.0, "Width": 0.1, "Height": 0.1}, "Confidence": 80.0}]},
        {"Name": "Person", "Confidence": 90.0, "Instances": [
            {"BoundingBox": {"Left": 0.5, "Top": 0.5, "Width": 0.1, "Height": 0.2}, "Confidence": 90.0}]}]}


def test_rekognition_relative_boxes_to_pixels_and_label_map():
    client = boto3.client("rekognition", region_name="us-east-1", aws_access_key_id="a",
                          aws_secret_access_key="b")
    image = np.zeros((100, 200, 3), np.uint8)
    data = png_bytes(image)
    with Stubber(client) as stub:
        stub.add_response("detect_labels", _rekognition_reply(),
                          {"Image": {"Bytes": data}, "MaxLabels": 100, "MinConfidence": 50.0})
        stub.add_client_error("detect_labels", "ThrottlingException", http_status_code=400,
                              expected_params={"Image": ANY, "MaxLabels": ANY, "MinConfidence": ANY})
        stub.add_client_error("detect_labels", "AccessDeniedException", http_status_code=403)
        stub.add_client_error("detect_labels", "InvalidImageFormatException", http_status_code=400)
        backend = RekognitionBackend(client, threshold=0.5)
        answer = backend.detect(data, image, ["car", "pedestrian"])
        with pytest.raises(TransientError):
            backend.detect(data, image, ["car"])
        with pytest.raises(AuthError):
            backend.detect(data, image, ["car"])
        with pytest.raises(PermanentError):
            backend.detect(data, image, ["car"])
    np.testing.assert_allclose(answer.boxes[0], [20, 20, 120, 45])
    np.testing.assert_allclose(answer.boxes[1], [180, 90, 200, 100])  # outside 0..1: clipped
    np.testing.assert_allclose(answer.scores[:2], [0.95, 0.60])
    cmap = CategoryMap.build(["car", "person"], label_map={"Person": "person", "Human": "person"})
    rec, dropped = answer_to_detections(answer, cmap, "i", "i", 200, 100)
    assert rec.labels.tolist() == [0, 0, 1] and dropped == {"tree": 1}


def test_replay_round_trips_parquet_and_coco(tmp_path):
    records, images = [], []
    for i in range(3):
        image, truth = draw(10 + i, with_tree=False)
        path = tmp_path / "imgs" / f"im{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(image))
        images.append(image)
        boxes = np.asarray([truth[c] for c in CATEGORIES if c in truth], np.float32)
        labels = np.asarray([CATEGORIES.index(c) for c in CATEGORIES if c in truth])
        records.append(Detections.from_class_only(f"im{i}", str(path), 32, 24, boxes, labels,
                                                  np.full(len(labels), 0.6), 2, SOURCE_CLOUD))
    storage.write_parquet(records_to_table(records), str(tmp_path / "cloud.parquet"))
    export_coco(records, CATEGORIES, str(tmp_path / "labels.json"), root=str(tmp_path / "imgs"))
    cmap = CategoryMap.build(CATEGORIES)
    for backend in (ReplayBackend(str(tmp_path / "cloud.parquet"), categories=CATEGORIES),
                    ReplayBackend(str(tmp_path / "labels.json"), images_root=str(tmp_path / "imgs"))):
        for rec, image in zip(records, images):
            answer = backend.detect(png_bytes(image), image, CATEGORIES)
            again, _ = answer_to_detections(answer, cmap, rec.image_id, rec.uri, 32, 24)
            np.testing.assert_allclose(again.boxes, rec.boxes)
            np.testing.assert_array_equal(again.labels, rec.labels)
            np.testing.assert_allclose(again.probs, rec.probs, atol=1e-6)
    unknown = np.full((24, 32, 3), 9, np.uint8)
    assert len(backend.detect(png_bytes(unknown), unknown, CATEGORIES).boxes) == 0


def test_dds_without_token_fails_before_any_call(monkeypatch):
    from coin_ray.cloud.backends import build_backend
    from coin_ray.config import CloudConfig

    monkeypatch.delenv("COIN_DDS_TOKEN", raising=False)
    with pytest.raises(AuthError, match="COIN_DDS_TOKEN"):
        build_backend(CloudConfig(backend="dds", token_env="COIN_DDS_TOKEN"), CATEGORIES)
    monkeypatch.setenv("COIN_DDS_TOKEN", TOKEN)
    backend = build_backend(CloudConfig(backend="dds", token_env="COIN_DDS_TOKEN"), CATEGORIES)
    assert TOKEN not in repr(vars(backend))


def test_dds_exif_rotated_jpeg_boxes_land_on_the_right_pixels(fake_dds):
    from test_cloud_images import blocks, exif_jpeg

    from coin_ray.data.images import decode_image

    server = fake_dds()  # decodes uploads without EXIF: it answers in the uploaded frame
    data = exif_jpeg(blocks(), orientation=6)
    image = decode_image(data)  # the frame the pipeline (and its labels) use
    answer = DdsBackend(token=Secret(TOKEN), poll_interval_s=0.01).detect(data, image, ["car", "bus"])
    assert server.sizes == [(60, 90)]
    np.testing.assert_allclose(answer.boxes, [[10, 5, 40, 25], [60, 35, 85, 55]], atol=1)
