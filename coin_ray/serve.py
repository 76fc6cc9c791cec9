"""The detector server: any backend over the project's ``http`` protocol.

    python -m coin_ray.serve --backend hf --model IDEA-Research/grounding-dino-tiny --port 8500
    python -m coin_ray.serve --backend foggy-shapes --checkpoint ~/.cache/coin_ray/cloud.pt \
        --latency-ms 250 --rps 50

Users host their own "cloud" with it; tests and benchmarks use its knobs: added latency, a
requests-per-second limit answered with 429 + Retry-After (seconds, or an HTTP date for a
chosen fraction), and injected faults (500s, 429s, hangs past the client's timeout,
malformed 200 bodies). Every request is counted; ``GET /stats`` returns the counts
(``?arrivals=1`` adds the arrival time of every detect request, for checking rate limits
from the outside). The protocol itself is documented in ``coin_ray.cloud.http_backend``.

``--protocol dds`` serves the same backend through DeepDataSpace's V2 task + poll shapes
instead (``coin_ray.cloud.dds_serve``), with tasks that take ``--task-ms`` and fail with
``--fail-task``; ``/stats`` then also counts task creations per image.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse
from urllib.request import urlopen

from coin_ray import storage
from coin_ray.cloud import dds_serve
from coin_ray.cloud.backends import build_backend
from coin_ray.cloud.base import DetectorBackend, at_least, request_threshold
from coin_ray.cloud.http_backend import answer_to_json, request_from_json, unknown_prompts_reply
from coin_ray.config import FOGGY_SHAPES_CLOUD_CONFUSION, CloudConfig
from coin_ray.data.images import ImageDecodeError, decode_image
from coin_ray.errors import EXIT_BAD_INPUT, one_line

log = logging.getLogger("coin_ray.serve")


@dataclass
class Knobs:
    """Test and benchmark behaviour; the defaults serve plainly.

    Fractions are per detect request and drawn from one seeded generator, in this order:
    500, 429, hang, malformed (their sum must be <= 1).
    """

    latency_s: float = 0.0  # added before every answered detect request
    rps_limit: float = 0.0  # admitted detect requests per sliding second; 0 = no limit
    fail_500: float = 0.0
    fail_429: float = 0.0
    fail_hang: float = 0.0
    fail_malformed: float = 0.0
    hang_s: float = 60.0  # how long a hang lasts before the connection is dropped
    retry_after_s: float = 0.1  # Retry-After sent with injected 429s
    retry_after_date: float = 0.0  # fraction of 429s whose Retry-After is an HTTP date
    token: str = ""  # when set, detect requests need "Authorization: Bearer <token>" (dds: "Token")
    task_s: float = 0.0  # dds protocol: mean time a task takes (times U(0.5, 1.5))
    fail_task: float = 0.0  # dds protocol: fraction of tasks that end "failed"
    seed: int = 0


class _Counters:
    """Thread-safe request counters plus the sliding window of the rate limit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.detect = 0
        self.status: Counter = Counter()
        self.faults: Counter = Counter()
        self.arrivals: list[float] = []
        self.window: deque[float] = deque()

    def snapshot(self, with_arrivals: bool) -> dict[str, Any]:
        with self.lock:
            out = {"requests": self.requests, "detect_requests": self.detect,
                   "status": {str(k): v for k, v in sorted(self.status.items())},
                   "faults": dict(self.faults)}
            if with_arrivals:
                out["arrivals"] = list(self.arrivals)
            return out


class DetectorServer(ThreadingHTTPServer):
    """A threaded HTTP server around one backend (one thread per connection)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: DetectorBackend, knobs: Knobs,
                 model_name: str = "", protocol: str = "http") -> None:
        super().__init__(address, _Handler)
        self.backend = backend
        self.knobs = knobs
        self.protocol = protocol
        self.counters = _Counters()
        self.tasks = dds_serve.TaskBook(knobs.seed)
        self.rng = random.Random(knobs.seed)
        # Clients key their answer caches on this name: make it name the weights.
        self.model_name = model_name or str(getattr(backend, "model_name", "") or backend.name)

    def admit(self) -> float | None:
        """None if a detect request is within the rate limit, else seconds until a slot frees."""
        c, limit = self.counters, self.knobs.rps_limit
        with c.lock:
            now = time.time()
            while c.window and c.window[0] <= now - 1.0:
                c.window.popleft()
            if limit > 0 and len(c.window) >= limit:
                return c.window[0] + 1.0 - now
            c.window.append(now)
            return None

    def draw_fault(self) -> str:
        """'' or one of '500', '429', 'hang', 'malformed' (seeded, thread-safe)."""
        k = self.knobs
        with self.counters.lock:
            u = self.rng.random()
        for name, p in (("500", k.fail_500), ("429", k.fail_429), ("hang", k.fail_hang),
                        ("malformed", k.fail_malformed)):
            if u < p:
                return name
            u -= p
        return ""

    def retry_after(self, seconds: float) -> str:
        """A Retry-After value: decimal seconds, or (for a seeded fraction) an HTTP date."""
        with self.counters.lock:
            as_date = self.rng.random() < self.knobs.retry_after_date
        if not as_date:
            return f"{max(seconds, 0.001):.3f}"
        # Dates have whole seconds: round up so the client never comes back early.
        return formatdate(float(int(time.time() + seconds) + 1), usegmt=True)

    def stats(self, with_arrivals: bool) -> dict[str, Any]:
        out = self.counters.snapshot(with_arrivals)
        if self.protocol == "dds":
            out["tasks"] = self.tasks.stats()
        return out


class _Handler(BaseHTTPRequestHandler):
    server: DetectorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        with self.server.counters.lock:
            self.server.counters.status[status] += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _count(self, detect: bool = False) -> None:
        c = self.server.counters
        with c.lock:
            c.requests += 1
            if detect:
                c.detect += 1
                c.arrivals.append(time.time())

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._count()
        url = urlparse(self.path)
        if url.path == "/stats":
            arrivals = parse_qs(url.query).get("arrivals", ["0"])[0] == "1"
            self._json(200, self.server.stats(arrivals))
        elif url.path.startswith("/v2/task_status/") and self.server.protocol == "dds":
            dds_serve.handle_status(self, url.path.rsplit("/", 1)[-1])
        elif url.path == "/v1/health":
            self._json(200, {"backend": self.server.backend.name, "model": self.server.model_name})
        else:
            self._json(404, {"error": f"no such path {url.path}"})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        if self.server.protocol == "dds":
            dds_serve.handle_create(self)
            return
        is_detect = urlparse(self.path).path == "/v1/detect"
        self._count(detect=is_detect)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not is_detect:
            self._json(404, {"error": "POST /v1/detect is the only POST path"})
            return
        if not self._authorised():
            self._json(401, {"error": "missing or wrong token"})
            return
        wait = self.server.admit()
        if wait is not None:
            self._json(429, {"error": "rate limit"}, {"Retry-After": self.server.retry_after(wait)})
            return
        if self._inject_fault(self.server.draw_fault()):
            return
        time.sleep(self.server.knobs.latency_s)
        self._detect(body)

    def _authorised(self) -> bool:
        token = self.server.knobs.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _inject_fault(self, fault: str) -> bool:
        if not fault:
            return False
        with self.server.counters.lock:
            self.server.counters.faults[fault] += 1
        if fault == "500":
            self._json(500, {"error": "injected fault"})
        elif fault == "429":
            self._json(429, {"error": "injected 429"},
                       {"Retry-After": self.server.retry_after(self.server.knobs.retry_after_s)})
        elif fault == "hang":
            time.sleep(self.server.knobs.hang_s)
            self.close_connection = True
        else:
            self._send(200, b'{"boxes": [[1.0, 2.0')
        return True

    def _detect(self, body: bytes) -> None:
        try:
            image_bytes, prompts, threshold = request_from_json(json.loads(body))
            threshold = request_threshold(threshold)
            image = decode_image(image_bytes, "request")
        except (ValueError, ImageDecodeError) as err:
            self._json(400, {"error": f"bad request: {err}"[:300]})
            return
        unknown = unknown_prompts(self.server.backend, prompts)
        if unknown:
            # Answering with the known prompts only would look like "nothing there" for the rest.
            self._json(400, unknown_prompts_reply(unknown, getattr(self.server.backend, "categories", None)))
            return
        try:
            answer = at_least(self.server.backend.detect(image_bytes, image, prompts), threshold)
        except Exception as err:  # a backend failure is the server's 500, never a crash
            log.exception("backend failed")
            self._json(500, {"error": f"backend failed: {type(err).__name__}"})
            return
        categories = getattr(self.server.backend, "categories", None)
        self._json(200, answer_to_json(answer, categories, self.server.model_name))


def unknown_prompts(backend: DetectorBackend, prompts: list[str]) -> list[str]:
    """The prompts a closed-vocabulary backend (one with ``unknown_prompts``, as the
    Foggy-Shapes stand-in) cannot answer; [] for open-vocabulary backends."""
    check = getattr(backend, "unknown_prompts", None)
    return list(check(prompts)) if check is not None else []


@dataclass
class RunningServer:
    """A server running in a background thread of this process."""

    server: DetectorServer
    thread: threading.Thread
    url: str

    def stats(self, arrivals: bool = False) -> dict[str, Any]:
        return self.server.stats(arrivals)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_server(backend: DetectorBackend, knobs: Knobs | None = None, host: str = "127.0.0.1",
                 port: int = 0, model_name: str = "", protocol: str = "http") -> RunningServer:
    """Serve ``backend`` from a daemon thread; port 0 picks a free port. Returns its URL.

    ``model_name`` is what ``GET /v1/health`` reports and clients key caches on (default:
    the backend's ``model_name`` or ``name``); name the weights, e.g. a checkpoint hash.
    ``protocol``: "http" (the project's) or "dds" (V2 task + poll, ``cloud.dds_serve``).
    """
    server = DetectorServer((host, port), backend, knobs or Knobs(), model_name, protocol)
    thread = threading.Thread(target=server.serve_forever, name="coin-ray-serve", daemon=True)
    thread.start()
    actual_host, actual_port = server.server_address[:2]
    return RunningServer(server, thread, f"http://{actual_host}:{actual_port}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that the OS reported free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn_server(argv: list[str], host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None,
                 output: int | None = subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """Run ``python -m coin_ray.serve <argv>`` in a child process and wait until it is healthy.

    A child process keeps the server's threads off the caller's interpreter and its CPU
    time apart (benchmarks measure both). ``argv`` holds every option but ``--host`` and
    ``--port``; port 0 picks a free port. ``env`` and ``output`` go to ``subprocess.Popen``
    as ``env`` and ``stdout`` (stderr follows stdout). Returns (process, url); the caller
    terminates the process. Raises RuntimeError, with the process killed, if it exits or
    has not answered ``GET /v1/health`` within ``timeout_s`` seconds.
    """
    port = port or free_port(host)
    proc = subprocess.Popen([sys.executable, "-m", "coin_ray.serve", *argv, "--host", host, "--port", str(port)],
                            env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            urlopen(url + "/v1/health", timeout=1).read()
            return proc, url
        except OSError:  # not listening yet
            time.sleep(0.1)
    exited = proc.poll() is not None
    proc.kill()
    said = proc.communicate(timeout=10)[0] or b""
    raise RuntimeError(f"coin_ray.serve {' '.join(argv)} {'exited' if exited else 'did not answer'}: "
                       + said.decode(errors="replace")[-2000:])


def build_parser(prog: str = "python -m coin_ray.serve") -> argparse.ArgumentParser:
    """The server's options; ``prog`` is the command the user typed (shown in usage and errors)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--backend", required=True,
                   choices=["hf", "dds", "rekognition", "replay", "http", "foggy-shapes"],
                   help="the detector behind the server (foggy-shapes: the demo's stand-in, needs --checkpoint)")
    p.add_argument("--model", default="", help="hf hub id or local dir; dds model name")
    p.add_argument("--url", default="", help="upstream URL (http, dds) or replay file")
    p.add_argument("--checkpoint", default="", help="foggy-shapes stand-in checkpoint (cloud_detector.pt)")
    p.add_argument("--model-name", default="",
                   help="name reported to clients (cache key); default: from the backend")
    p.add_argument("--categories", default="",
                   help="comma-separated category names (replaying Parquet needs them)")
    p.add_argument("--threshold", type=float, default=0.25,
                   help="upstream backends (hf, dds, ...): minimum score asked for")
    p.add_argument("--token-env", default="", help="NAME of the env var with the upstream token")
    p.add_argument("--require-token-env", default="",
                   help="NAME of an env var holding the token clients must send")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8500, help="port to listen on")
    p.add_argument("--latency-ms", type=float, default=0.0, help="test knob: added latency per request")
    p.add_argument("--rps", type=float, default=0.0, help="requests/s limit (429 above it; 0: none)")
    p.add_argument("--fail-500", type=float, default=0.0, help="test knob: fraction of requests answered 500")
    p.add_argument("--fail-429", type=float, default=0.0, help="test knob: fraction answered 429")
    p.add_argument("--fail-hang", type=float, default=0.0,
                   help="test knob: fraction that hang for --hang-s before an answer")
    p.add_argument("--fail-malformed", type=float, default=0.0,
                   help="test knob: fraction answered with a malformed 200 body")
    p.add_argument("--hang-s", type=float, default=60.0, help="test knob: how long a hanging request hangs")
    p.add_argument("--retry-after-s", type=float, default=0.1, help="Retry-After of injected 429s")
    p.add_argument("--retry-after-date", type=float, default=0.0,
                   help="fraction of 429s whose Retry-After is an HTTP date")
    p.add_argument("--protocol", choices=["http", "dds"], default="http",
                   help="http: the project's protocol; dds: DDS V2 task + poll")
    p.add_argument("--task-ms", type=float, default=0.0, help="dds: mean task time")
    p.add_argument("--fail-task", type=float, default=0.0, help="dds: fraction of failed tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of the injected faults")
    return p


def _parse_args(argv: list[str] | None, prog: str = "python -m coin_ray.serve") -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def _bad_input(prog: str, message: str) -> SystemExit:
    """Print one line (as every user error of coin-ray) and return the exit to raise (code 2)."""
    print(f"error: {prog}: {message}", file=sys.stderr, flush=True)
    return SystemExit(EXIT_BAD_INPUT)


def checkpoint_model_name(path: str) -> str:
    """'foggy-shapes-<12 hex of the checkpoint's SHA-256>': names the weights, not the path."""
    return "foggy-shapes-" + hashlib.sha256(storage.read_bytes(path)).hexdigest()[:12]


def _backend_from_args(args: argparse.Namespace, prog: str = "python -m coin_ray.serve") -> DetectorBackend:
    if args.backend == "foggy-shapes":
        # Imported on use: the stand-in needs torch + torchvision, which a plain server does not.
        from coin_ray.world.cloud_standin import StandInCloudDetector

        if not args.checkpoint:
            raise _bad_input(prog, "--backend foggy-shapes needs --checkpoint PATH")
        try:
            return StandInCloudDetector.load(str(storage.local_copy(args.checkpoint)))
        except Exception as err:  # noqa: BLE001 (any unreadable file is the user's to replace)
            raise _bad_input(prog, f"--checkpoint {args.checkpoint}: not a foggy-shapes stand-in checkpoint "
                                   f"({type(err).__name__}: {one_line(err)[:200]})") from None
    cloud = CloudConfig(backend=args.backend, model=args.model, url=args.url,
                        threshold=args.threshold, token_env=args.token_env)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] or None
    return build_backend(cloud, categories=categories)


def main(argv: list[str] | None = None, prog: str = "python -m coin_ray.serve") -> None:
    """Parse arguments, build the backend and serve until interrupted; a user error exits 2
    with one line on stderr (``prog`` names the command in it and in ``--help``)."""
    args = _parse_args(argv, prog)
    if args.checkpoint and not storage.exists(args.checkpoint):
        demo = f"~/.cache/coin_ray/world/demo-0-confusion{FOGGY_SHAPES_CLOUD_CONFUSION:g}/cloud_detector.pt"
        raise _bad_input(prog, f"--checkpoint {args.checkpoint}: no such file (the demo's stand-in is "
                               f"{demo} once the demo world is built)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = os.environ.get(args.require_token_env, "") if args.require_token_env else ""
    knobs = Knobs(latency_s=args.latency_ms / 1000.0, rps_limit=args.rps, fail_500=args.fail_500,
                  fail_429=args.fail_429, fail_hang=args.fail_hang,
                  fail_malformed=args.fail_malformed, hang_s=args.hang_s, token=token,
                  retry_after_s=args.retry_after_s, retry_after_date=args.retry_after_date,
                  task_s=args.task_ms / 1000.0, fail_task=args.fail_task, seed=args.seed)
    model_name = args.model_name or (checkpoint_model_name(args.checkpoint) if args.checkpoint else "")
    server = DetectorServer((args.host, args.port), _backend_from_args(args, prog), knobs, model_name,
                            args.protocol)
    log.info("serving backend %s on http://%s:%d", server.backend.name, *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
