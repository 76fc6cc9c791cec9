"""Online serving of the exported detector, the parts without Ray: settings, the model card,
and each request's checks, decoding and answer. The Ray Serve deployment that wires them
is ``coin_ray.ray.serve_model``; ``coin-ray serve --model <run>/export`` starts it.

Protocols (one schema each, written down once): the project's ``http`` protocol
(``coin_ray.cloud.http_backend``: request and answer JSON) and, with ``ServeSettings.dds``,
DeepDataSpace's V2 task + poll shapes (``coin_ray.cloud.dds_serve``). Routes:

    GET  /v1/health                  open (probes, clients' cache keys): ModelCard.to_json()
    GET  /v1/model                   the card plus the serving settings (token needed if set)
    POST /v1/detect                  http protocol
    POST /v2/task/<kind>/detection   dds only: runs the detector, returns a task id
    GET  /v2/task_status/<uuid>      dds only: "success" with the objects, or 404

Shapes: an image is (H, W, 3) uint8 RGB as decoded (EXIF orientation applied); the
detector's answer per image is {"boxes" (N,4) float32 xyxy pixels of that image, "labels"
(N,) int64 in [0,K), "scores" (N,), "probs" (N,K+1) background last}, as
``ExportedDetector.detect`` gives it.

What a client can get wrong is a ``RequestError``: one line and a 4xx status (400 bad
JSON, base64, image or unknown categories; 401 token; 404/405 route; 413 over a cap).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import shlex
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from coin_ray import storage
from coin_ray.cloud import dds_serve
from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.http_backend import request_from_json
from coin_ray.cloud.mapping import normalise
from coin_ray.data.images import ImageDecodeError, decode_image
from coin_ray.run import RunDir

RUNTIMES = ("auto", "onnx", "torchscript")
ROUTES = {("GET", "/v1/health"): "health", ("GET", "/v1/model"): "model", ("POST", "/v1/detect"): "detect"}
DDS_CREATE = re.compile(r"^/v2/task/[a-z_]+/detection$")
DDS_STATUS = re.compile(r"^/v2/task_status/([0-9a-f]{1,64})$")


@dataclass(frozen=True)
class ServeSettings:
    """How the detector is served. Replicas: a fixed count when min == max, else Ray Serve
    autoscaling between them on ``target_ongoing_requests`` per replica."""

    runtime: str = "auto"  # auto: model.onnx when the export has it and onnxruntime imports
    max_batch_size: int = 8  # requests one @serve.batch call detects together (1 = unbatched)
    batch_wait_s: float = 0.01  # how long a batch waits to fill after its first request
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    cpus_per_replica: float = 1.0
    threads_per_replica: int = 1  # intra-op threads of the runtime in each replica
    max_request_bytes: int = 16 * 2**20  # body cap (413 above it)
    max_pixels: int = 4096 * 4096  # image cap, width * height (413 above it)
    dds: bool = False  # also speak the DDS V2 task + poll shapes
    token_sha256: str = ""  # SHA-256 (hex) of the bearer token; "" = no token. Replicas
    # get only this digest, never the token, so it is in no actor's arguments or logs.

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r}: expected one of {', '.join(RUNTIMES)}")
        for name in ("max_batch_size", "min_replicas", "threads_per_replica", "max_request_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.batch_wait_s < 0 or self.cpus_per_replica < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("batch_wait_s and cpus_per_replica must be >= 0, target_ongoing_requests > 0")


def serve_command(run_root: str) -> str:
    """The one command that serves a run's exported detector (printed when a run ends)."""
    return f"coin-ray serve --run {shlex.quote(run_root)}"


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (checked before Serve's proxy tries to bind)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def token_digest(token: str) -> str:
    """SHA-256 hex of a token ("" for no token)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def authorised(given: str, digest: str) -> bool:
    """Whether a presented token matches ``digest`` (constant-time); always True without one."""
    if not digest:
        return True
    return hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), digest)


def presented_token(headers: Mapping[str, str], dds: bool) -> str:
    """The token a request carries: ``Authorization: Bearer <t>`` (http) or ``Token: <t>`` (dds).
    ``headers`` keys are lower-case (as ASGI gives them)."""
    if dds:
        return headers.get("token", "")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


@dataclass(frozen=True)
class ModelCard:
    """What the health and model routes report: which run's detector this is and how good."""

    run_id: str  # the run folder's name ("" when the export is not inside a run)
    categories: list[str]
    export_sha256: str  # of export.json and the model file(s) served
    val_map50: float | None  # COIN's mAP50 (%) on the run's labelled split, report/metrics.json
    runtime: str  # "onnx" or "torchscript"
    input_size: tuple[int, int]  # (H, W) the export runs at; other sizes are resized

    @property
    def model_name(self) -> str:
        """Names the weights (clients key their answer caches on it)."""
        return f"coin-{self.run_id or 'export'}-{self.export_sha256[:12]}"

    def to_json(self) -> dict:
        return {"status": "ok", "backend": "coin-ray", "model": self.model_name, **asdict(self)}


def choose_runtime(meta: dict, wanted: str) -> str:
    """"onnx" or "torchscript" for an export whose export.json is ``meta``.

    "auto" takes ONNX when the export has it and onnxruntime imports, else TorchScript.
    Raises ValueError when "onnx" is asked of an export without it.
    """
    has_onnx = "file" in meta.get("onnx", {})
    if wanted == "onnx" and not has_onnx:
        raise ValueError(f"the export has no ONNX model ({meta.get('onnx', {}).get('skipped', 'exported before ONNX')})"
                         "; serve it with --runtime torchscript")
    if wanted != "auto":
        return wanted
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torchscript"
    return "onnx" if has_onnx else "torchscript"


def served_files(meta: dict, runtime: str) -> list[str]:
    """The export's files the runtime loads, besides export.json."""
    if runtime == "onnx":
        return [meta["onnx"]["file"]]
    return [f"detector_b{b}.pt" for b in meta["batch_sizes"]]


def val_map50(metrics_uri: str) -> float | None:
    """COIN's mAP50 from a run's report/metrics.json (either layout), None when absent."""
    if not storage.exists(metrics_uri):
        return None
    metrics = json.loads(storage.read_text(metrics_uri))
    coin = metrics.get("table1", metrics).get("COIN") or {}
    value = coin.get("map50")
    return None if value is None else float(value)


def model_card(export_uri: str, runtime: str = "auto") -> ModelCard:
    """The card of the export folder ``export_uri`` (local or s3://), served with ``runtime``.

    When the folder is a run's ``export/``, the run id is its parent's name and the mAP50
    comes from the run's report.
    """
    export_uri = export_uri.rstrip("/")
    text = storage.read_text(storage.join(export_uri, "export.json"))
    meta = json.loads(text)
    chosen = choose_runtime(meta, runtime)
    digest = hashlib.sha256(text.encode())
    for name in served_files(meta, chosen):
        digest.update(storage.read_bytes(storage.join(export_uri, name)))
    run = RunDir(export_uri.rpartition("/")[0])
    in_run = bool(run.root) and run.export_dir == export_uri
    run_id = run.root.rstrip("/").rsplit("/", 1)[-1] if in_run else ""
    score = val_map50(run.report_metrics) if in_run else None
    return ModelCard(run_id, list(meta["categories"]), digest.hexdigest(), score, chosen,
                     (int(meta["input_size"][0]), int(meta["input_size"][1])))


class RequestError(Exception):
    """A request the client must fix: its HTTP status and one line saying what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())[:300]


def route(method: str, path: str, dds: bool) -> str:
    """The handler name for a request: health, model, detect, task or status.

    Raises RequestError 404 for an unknown path, 405 for a known path with another method.
    """
    if (method, path) in ROUTES:
        return ROUTES[(method, path)]
    if dds and DDS_CREATE.match(path):
        return "task" if method == "POST" else _refuse(405, f"{method} {path}: use POST")
    if dds and DDS_STATUS.match(path):
        return "status" if method == "GET" else _refuse(405, f"{method} {path}: use GET")
    if path in {p for _, p in ROUTES}:
        return _refuse(405, f"{method} {path}: method not allowed")
    return _refuse(404, f"no such path {path}")


def _refuse(status: int, message: str) -> str:
    raise RequestError(status, message)


def parse_body(body: bytes, max_bytes: int) -> dict:
    """The JSON object of a request body; 413 over ``max_bytes``, 400 when not JSON."""
    if len(body) > max_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes is over the cap of {max_bytes}")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, "malformed JSON: the body is not an object")
    return parsed


def decode_capped(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image to (H, W, 3) uint8 RGB; 413 over ``max_pixels``, 400 if undecodable.

    The size is read from the header before any pixel is decoded, so an oversized image
    costs no memory.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image over the cap of {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 (PIL raises many types for a bad header) -> decode_image's reason
        width = height = 0
    if width * height > max_pixels:
        raise RequestError(413, f"image of {width}x{height} = {width * height} pixels is over the cap of {max_pixels}")
    try:
        return decode_image(data, "upload")
    except (ImageDecodeError, Image.DecompressionBombError) as err:
        raise RequestError(400, f"undecodable image: {err}") from None


def prompt_labels(prompts: list[str], categories: list[str]) -> list[int]:
    """Category indices asked for by ``prompts`` (a name, singular or plural, any case).

    Raises RequestError 400 naming every prompt that is no category of this detector.
    """
    names = {normalise(c.replace("_", " ")): k for k, c in enumerate(categories)}
    names.update({name + "s": k for name, k in list(names.items())})
    unknown = [p for p in prompts if normalise(p) not in names]
    if unknown:
        raise RequestError(400, f"unknown categories: {', '.join(repr(p) for p in unknown)} "
                                f"(this detector knows: {', '.join(categories)})")
    if not prompts:
        raise RequestError(400, f"no prompts: ask for one or more of {', '.join(categories)}")
    return sorted({names[normalise(p)] for p in prompts})


@dataclass
class DetectRequest:
    """One decoded, checked request."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: list[int]  # category indices asked for, in [0, K)
    threshold: float  # lowest score to answer with
    image_sha256: str  # of the uploaded file (the DDS task book counts per image)


def http_request(body: bytes, categories: list[str], settings: ServeSettings) -> DetectRequest:
    """Check and decode a ``POST /v1/detect`` body (``coin_ray.cloud.http_backend``'s schema)."""
    try:
        data, prompts, threshold = request_from_json(parse_body(body, settings.max_request_bytes))
    except ValueError as err:
        raise RequestError(400, f"bad request: {err}") from None
    labels = prompt_labels(prompts, categories)
    return DetectRequest(decode_capped(data, settings.max_pixels), labels, threshold or 0.0,
                         dds_serve.image_sha(data))


def task_request(body: bytes, categories: list[str], settings: ServeSettings) -> DetectRequest:
    """Check and decode a DDS ``POST /v2/task/<kind>/detection`` body (``coin_ray.cloud.dds``'s schema)."""
    parsed = parse_body(body, settings.max_request_bytes)
    try:
        data, prompts, threshold = dds_serve.parse_task_request(parsed)  # threshold checked there
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    labels = prompt_labels(prompts, categories)
    return DetectRequest(decode_capped(data, settings.max_pixels), labels, threshold,
                         dds_serve.image_sha(data))


def answer_for(detections: dict[str, np.ndarray], request: DetectRequest, categories: list[str]) -> CloudAnswer:
    """The detections of ``request``'s image kept for its categories and threshold, as the
    cloud answers: boxes (N,4) xyxy pixels of the uploaded image, category names, scores,
    and the full (N,K+1) probs over ``categories`` plus background."""
    labels = np.asarray(detections["labels"]).reshape(-1)
    keep = np.isin(labels, request.labels) & (np.asarray(detections["scores"]) >= request.threshold)
    return CloudAnswer(np.asarray(detections["boxes"], np.float32).reshape(-1, 4)[keep],
                       [categories[int(k)] for k in labels[keep]],
                       np.asarray(detections["scores"], np.float32)[keep],
                       np.asarray(detections["probs"], np.float32)[keep])
