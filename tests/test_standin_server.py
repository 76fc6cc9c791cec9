"""The detector server's answers as the request asks them (issue 27: 4.2 and 4.9): no box under
the request's threshold, the Foggy-Shapes world asking its stand-in at the stand-in's own score
floor, and prompts a closed-vocabulary stand-in cannot answer refused in one clear line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cloud_world import ColourBoxes, draw, png_bytes
from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.client import CloudClient, RetryPolicy
from coin_ray.cloud.errors import UNKNOWN_CATEGORIES, AuthError, Secret, UnknownCategories
from coin_ray.cloud.http_backend import HttpBackend, request_to_json
from coin_ray.cloud.ratelimit import LocalLimiter
from coin_ray.config import FOGGY_SHAPES_CATEGORIES, load_config
from coin_ray.serve import start_server


class FourScores(ColourBoxes):
    """ColourBoxes whose boxes score 0.1, 0.4, 0.9 in turn (0.4 sits exactly on the threshold)."""

    def detect(self, image_bytes, image, prompts):
        answer = super().detect(image_bytes, image, prompts)
        scores = np.asarray([0.1, 0.4, 0.9][:len(answer.phrases)], np.float32)
        return CloudAnswer(answer.boxes, answer.phrases, scores)


@pytest.mark.parametrize("protocol", ["http", "dds"])
def test_the_server_returns_no_box_below_the_requests_threshold(protocol, monkeypatch):
    """Issue 27, 4.9: the stand-in server answered below the client's threshold."""
    monkeypatch.delenv("DDS_CLOUDAPI_ENDPOINT", raising=False)
    from coin_ray.cloud.dds import DdsBackend

    server = start_server(FourScores(), protocol=protocol)
    image, truth = draw(3)
    assert len(truth) == 3  # car, bus, tree: three boxes scoring 0.1, 0.4, 0.9
    try:
        if protocol == "http":
            backend = HttpBackend(server.url, threshold=0.4, timeout_s=5.0)
        else:
            backend = DdsBackend(endpoint=server.url, token=Secret("t"), threshold=0.4, timeout_s=5.0,
                                 poll_interval_s=0.01)
        answer = backend.detect(png_bytes(image), image, ["car", "bus", "tree"])
        everything = (HttpBackend(server.url, threshold=0.0, timeout_s=5.0).detect(
            png_bytes(image), image, ["car", "bus", "tree"]) if protocol == "http" else None)
    finally:
        server.stop()
    assert sorted(np.asarray(answer.scores).tolist()) == pytest.approx([0.4, 0.9])  # 0.4 itself stays
    if everything is not None:
        assert sorted(np.asarray(everything.scores).tolist()) == pytest.approx([0.1, 0.4, 0.9])


def test_a_threshold_outside_0_1_is_a_400():
    server = start_server(FourScores())
    image, _ = draw(3)
    body = json.dumps(request_to_json(png_bytes(image), ["car"], 1.5)).encode()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server.url + "/v1/detect", data=body, method="POST"),
                                   timeout=5)
    finally:
        server.stop()
    assert err.value.code == 400 and "outside [0, 1]" in err.value.read().decode()


def test_the_tiny_worlds_run_asks_its_stand_in_at_a_threshold_it_answers_above(tiny_world):
    """The world's runs ask at the stand-in's score floor, unless the user set cloud.threshold;
    served at that threshold, the stand-in answers exactly what it finds."""
    from coin_ray.data.images import load_image
    from coin_ray.demo import with_demo_world
    from coin_ray.world.cloud_standin import SCORE_FLOOR, StandInCloudDetector

    cfg = with_demo_world(load_config(None, ["data.world=tiny"]))
    assert cfg.cloud.threshold == SCORE_FLOOR == 0.05
    assert with_demo_world(load_config(None, ["data.world=tiny", "cloud.threshold=0.3"])).cloud.threshold == 0.3
    elsewhere = ["data.world=tiny", "cloud.url=http://127.0.0.1:9"]  # a detector of the user's
    assert with_demo_world(load_config(None, elsewhere)).cloud.threshold == 0.25

    standin = StandInCloudDetector.load(tiny_world.cloud_detector)
    server = start_server(standin)
    prompts = list(FOGGY_SHAPES_CATEGORIES)
    served, direct = [], []
    try:
        client = HttpBackend(server.url, threshold=cfg.cloud.threshold, timeout_s=30.0)
        for path in sorted(Path(tiny_world.target_train_images).glob("*.jpg"))[:2]:
            data = path.read_bytes()
            image = load_image(str(path))
            served.append(np.asarray(client.detect(data, image, prompts).scores))
            direct.append(np.asarray(standin.detect(data, image, prompts).scores))
    finally:
        server.stop()
    assert sum(len(s) for s in direct) > 0
    for got, want in zip(served, direct):
        assert len(got) == len(want) and (got >= cfg.cloud.threshold).all()


def test_prompts_the_stand_in_does_not_know_are_a_400_naming_them(tiny_world):
    """Issue 27, 4.2: `[car, person, traffic light]` got 1 box on 10 images, in silence."""
    from coin_ray.world.cloud_standin import StandInCloudDetector

    server = start_server(StandInCloudDetector.load(tiny_world.cloud_detector))
    image, _ = draw(3)
    body = json.dumps(request_to_json(png_bytes(image), ["car", "traffic light", "cars"], 0.05)).encode()
    try:
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(urllib.request.Request(server.url + "/v1/detect", data=body, method="POST"),
                                   timeout=5)
        reply = json.loads(raw.value.read())
        backend = HttpBackend(server.url, threshold=0.05, timeout_s=5.0)
        with pytest.raises(UnknownCategories) as err:
            backend.detect(png_bytes(image), image, ["car", "person", "traffic light"])
        # Known prompts alone are answered as before.
        backend.detect(png_bytes(image), image, ["car", "person"])
    finally:
        server.stop()
    assert raw.value.code == 400
    assert reply["unknown_categories"] == ["traffic light"] and reply["categories"] == FOGGY_SHAPES_CATEGORIES
    message = str(err.value)
    assert "\n" not in message and message.startswith(UNKNOWN_CATEGORIES)
    assert "'traffic light'" in message and "it knows: truck, car, rider" in message
    assert err.value.unknown == ["traffic light"]


def test_unknown_prompts_stop_the_collection_after_one_request(tiny_world):
    """The first refused request stops the limiter: no other image is asked (nor paid for),
    and the refusal is not remembered as that image's failure."""
    from coin_ray.world.cloud_standin import StandInCloudDetector

    server = start_server(StandInCloudDetector.load(tiny_world.cloud_detector))
    limiter = LocalLimiter(1000, 8)
    client = CloudClient(HttpBackend(server.url, timeout_s=5.0), prompts=["car", "traffic light"],
                         model="standin", threshold=0.05, cache=None, limiter=limiter,
                         policy=RetryPolicy(max_retries=2, base_s=0.01))
    first, _ = draw(3)
    second, _ = draw(4)
    try:
        with pytest.raises(UnknownCategories):
            client.ask(png_bytes(first), first)
        with pytest.raises(AuthError, match="traffic light"):  # the limiter's stop, with the same line
            client.ask(png_bytes(second), second)
        requests = server.stats()["detect_requests"]
    finally:
        server.stop()
    assert requests == 1


def test_a_private_local_instance_gets_a_token_of_its_own_and_writes_none(tmp_path):
    """Issue 27, 4.4: the first `coin-ray adapt` silently wrote ~/.ray/auth_token (Ray 2.60's
    ray.init() does when RAY_AUTH_MODE is unset and it finds no token), which then turned token
    authentication on for a later `ray start --head`."""
    from coin_ray.ray.cluster import private_instance_token

    env: dict[str, str] = {}
    assert private_instance_token(env, tmp_path) and len(env["RAY_AUTH_TOKEN"]) == 64
    assert not (tmp_path / ".ray").exists()
    first = env["RAY_AUTH_TOKEN"]
    assert not private_instance_token(env, tmp_path) and env["RAY_AUTH_TOKEN"] == first  # kept
    for chosen in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token"}, {"RAY_AUTH_TOKEN_PATH": "/t"}):
        assert not private_instance_token(dict(chosen), tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    other: dict[str, str] = {}
    assert not private_instance_token(other, tmp_path) and other == {}  # the user's token is Ray's to use
