"""Backends over the project's http protocol: server, retries, rate limit, auth, cache (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cloud_world import CATEGORIES, ColourBoxes, draw, png_bytes
from coin_ray.cloud.cache import AnswerCache
from coin_ray.cloud.client import CloudClient, RetryPolicy
from coin_ray.cloud.errors import AuthError, Secret
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.cloud.mapping import CategoryMap, answer_to_detections
from coin_ray.cloud.ratelimit import LocalLimiter, SlotBook, late_tolerance, sleep_until
from coin_ray.schema import SOURCE_CLOUD, Detections, records_to_table
from coin_ray.serve import spawn_server, start_server
from coin_ray import storage

TOKEN = "tok-3f9a1c77e2b54d0e"
FAST = RetryPolicy(max_retries=3, base_s=0.01, max_backoff_s=0.05)


def client_for(url: str, cache=None, limiter=None, token: str = "", timeout_s: float = 5.0,
               policy=FAST) -> CloudClient:
    backend = HttpBackend(url, timeout_s=timeout_s, token=Secret(token))
    return CloudClient(backend, prompts=["car", "bus"], model="colour", threshold=0.25,
                       cache=cache, limiter=limiter or LocalLimiter(1000, 8), policy=policy,
                       token_env="COIN_TEST_TOKEN")


def test_http_round_trip_maps_labels_and_counts_dropped(served):
    server = served()
    image, truth = draw(3)
    outcome = client_for(server.url).ask(png_bytes(image), image)
    assert outcome.calls == 1 and not outcome.cache_hit and outcome.error == ""
    cmap = CategoryMap.build(CATEGORIES, {"car": ["car", "automobile"]})
    rec, dropped = answer_to_detections(outcome.answer, cmap, "x", "x.png", 32, 24)
    got = {CATEGORIES[l]: b.tolist() for l, b in zip(rec.labels, rec.boxes)}
    assert got == {k: v for k, v in truth.items() if k != "tree"}
    assert dropped == {"tree": 1} and rec.source == SOURCE_CLOUD
    np.testing.assert_allclose(rec.probs[:, -1], 0.0)  # class-only rule: background 0
    assert server.stats()["detect_requests"] == 1


def test_a_named_phrase_keeps_its_category_when_full_probs_rank_it_second():
    from coin_ray.cloud.base import CloudAnswer

    # One box reported twice (per-class output): car 0.7 and bus 0.2, with the box's
    # distribution; a compound phrase naming no category takes the most probable one.
    row = [0.7, 0.2, 0.1]
    answer = CloudAnswer(np.array([[1, 1, 9, 9]] * 3, np.float32), ["car", "bus", "red thing"],
                         np.array([0.7, 0.2, 0.6], np.float32), np.array([row] * 3, np.float32))
    rec, dropped = answer_to_detections(answer, CategoryMap.build(["car", "bus"]), "x", "x.png", 32, 24)
    assert rec.labels.tolist() == [0, 1, 0] and not dropped
    np.testing.assert_allclose(rec.scores, [0.7, 0.2, 0.6])
    np.testing.assert_allclose(rec.probs, [row] * 3)


def test_cache_identity_is_the_served_model_not_the_port():
    from coin_ray.cloud.backends import model_id
    from coin_ray.config import CloudConfig

    servers = [start_server(ColourBoxes(), model_name="colour-v1") for _ in range(2)]
    try:
        ids = {model_id(CloudConfig(url=s.url), HttpBackend(s.url)) for s in servers}
    finally:
        [s.stop() for s in servers]
    assert ids == {"colour-v1"}
    assert model_id(CloudConfig(url="http://x", model="pinned"), HttpBackend("http://x")) == "pinned"
    gone = servers[0].url  # stopped: no health answer, the URL stands in
    assert model_id(CloudConfig(url=gone), HttpBackend(gone, timeout_s=0.5)) == gone


def test_category_map_normalises_and_maps_several_labels():
    cmap = CategoryMap.build(["person", "car"], {"person": ["pedestrian", "person"]},
                             {"Automobile": "car"})
    assert cmap.prompt_list() == ["pedestrian", "person", "car"]
    assert cmap.category_of("  The Pedestrian. ") == 0
    assert cmap.category_of("AUTOMOBILE") == 1 and cmap.category_of("tree") is None


def test_transient_failures_retry_then_give_up_with_reason(served):
    flaky = served(fail_500=0.5, seed=1)
    image, _ = draw(0)
    outcomes = [client_for(flaky.url, policy=RetryPolicy(10, 0.001, 0.01)).ask(png_bytes(image), image)
                for _ in range(6)]
    assert all(o.answer is not None for o in outcomes)
    assert sum(o.calls for o in outcomes) == flaky.stats()["detect_requests"] > 6
    broken = served(fail_500=1.0)
    out = client_for(broken.url).ask(png_bytes(image), image)
    assert out.answer is None and out.reason == "http 500" and out.calls == FAST.max_retries + 1
    assert "gave up after 4 attempts" in out.error


@pytest.mark.parametrize("knob,reason", [("fail_hang", "timeout"), ("fail_malformed", "malformed body")])
def test_hangs_and_malformed_bodies_are_transient(served, knob, reason):
    server = served(**{knob: 1.0, "hang_s": 1.0})
    image, _ = draw(0)
    out = client_for(server.url, timeout_s=0.2, policy=RetryPolicy(1, 0.001, 0.01)).ask(
        png_bytes(image), image)
    assert out.reason == reason and out.calls == 2


def test_429_retry_after_is_honoured(served):
    server = served(rps_limit=2)
    image, _ = draw(0)
    client = client_for(server.url, policy=RetryPolicy(20, 0.01, 0.05))
    start = time.monotonic()
    outs = [client.ask(png_bytes(image), image) for _ in range(5)]
    assert all(o.answer is not None for o in outs)
    assert server.stats()["status"].get("429", 0) >= 1
    assert time.monotonic() - start >= 1.0  # 5 answers at 2/s need more than one second


def test_401_stops_every_caller_and_never_leaks_the_token(served, tmp_path):
    server = served(token=TOKEN)
    image, _ = draw(0)
    limiter = LocalLimiter(1000, 8)
    client = client_for(server.url, cache=AnswerCache(str(tmp_path), "http"), limiter=limiter,
                        token="wrong-" + TOKEN)
    with pytest.raises(AuthError) as err:
        client.ask(png_bytes(image), image)
    message = str(err.value)
    assert "'http'" in message and "COIN_TEST_TOKEN" in message and TOKEN not in message
    with pytest.raises(AuthError):  # a second caller is refused without a request
        client.ask(png_bytes(image), image)
    assert server.stats()["detect_requests"] == 1
    good = client_for(server.url, token=TOKEN).ask(png_bytes(image), image)
    assert good.answer is not None and TOKEN not in repr(Secret(TOKEN))


def test_cache_answers_second_ask_and_keys_on_question(served, tmp_path):
    server = served(token=TOKEN)
    image, _ = draw(1)
    data = png_bytes(image)
    cache = AnswerCache(str(tmp_path / "cache"), "http")
    first = client_for(server.url, cache=cache, token=TOKEN).ask(data, image)
    second = client_for(server.url, cache=cache, token=TOKEN).ask(data, image)
    assert (first.calls, second.calls, second.cache_hit) == (1, 0, True)
    np.testing.assert_array_equal(first.answer.boxes, second.answer.boxes)
    assert server.stats()["detect_requests"] == 1
    files = storage.list_files(str(tmp_path / "cache"))
    assert len(files) == 1 and TOKEN not in Path(files[0]).read_text()
    other = client_for(server.url, cache=cache, token=TOKEN)
    other.threshold = 0.5
    assert other.key(data) != first and other.key(data) != client_for(server.url).key(data)


def test_slot_book_spaces_requests_and_probes_first():
    book = SlotBook(rps=10, max_in_flight=3)
    lease, slot = book.reserve(100.0)
    assert slot == 100.0 and book.reserve(100.0) is None  # probing: one at a time
    book.release(lease, ok=True)
    slots = [book.reserve(100.0)[1] for _ in range(3)]
    np.testing.assert_allclose(slots, [100.1, 100.2, 100.3])
    assert book.reserve(100.0) is None  # in-flight cap of 3
    assert book.reserve(100.0 + 301.0) is not None  # stale leases are reclaimed


def test_late_callers_give_their_slot_back():
    assert sleep_until(time.time() + 0.01, tolerance=0.05)
    assert not sleep_until(time.time() - 0.2, tolerance=0.05)
    assert late_tolerance(10.0) == pytest.approx(0.09)


def test_local_limiter_holds_rate_across_threads():
    limiter = LocalLimiter(rps=50, max_in_flight=4)
    times, lock = [], threading.Lock()

    def work():
        for _ in range(5):
            lease = limiter.acquire()
            with lock:
                times.append(time.monotonic())
            limiter.release(lease, ok=True)
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    times.sort()
    assert len(times) == 20 and times[-1] - times[0] >= 19 / 50 - 0.02


def test_serve_subprocess_replays_parquet(tmp_path):
    image, truth = draw(5)
    (tmp_path / "a.png").write_bytes(png_bytes(image))
    rec = Detections.from_class_only("a", str(tmp_path / "a.png"), 32, 24,
                                     np.asarray([truth["car"]], np.float32), np.asarray([0]),
                                     np.asarray([0.8]), 2, SOURCE_CLOUD)
    storage.write_parquet(records_to_table([rec]), str(tmp_path / "cloud.parquet"))
    env = {**os.environ, "COIN_SERVE_TOKEN": TOKEN}
    proc, url = spawn_server(["--backend", "replay", "--url", str(tmp_path / "cloud.parquet"),
                              "--categories", ",".join(CATEGORIES), "--require-token-env", "COIN_SERVE_TOKEN"],
                             timeout_s=10.0, env=env, output=subprocess.PIPE)
    try:
        out = client_for(url, token=TOKEN).ask(png_bytes(image), image)
        assert out.answer.phrases == ["car"]
        np.testing.assert_allclose(out.answer.boxes, [truth["car"]])
        stats = json.loads(urllib.request.urlopen(url + "/stats").read())
        assert stats["detect_requests"] == 1 and stats["status"]["200"] >= 2
    finally:
        proc.terminate()
        log = proc.communicate(timeout=10)[0].decode()
    assert TOKEN not in log


def test_serve_foggy_shapes_standin_checkpoint(tmp_path):
    import torch
    from coin_ray.serve import _backend_from_args, _parse_args, checkpoint_model_name
    from coin_ray.world.cloud_standin import build_detector

    torch.manual_seed(0)
    model = build_detector(2, width=8, score_threshold=0.0)
    torch.save({"state_dict": model.state_dict(), "meta": {"categories": CATEGORIES,
                "model": {"width": 8}}}, tmp_path / "cloud.pt")
    backend = _backend_from_args(_parse_args(["--backend", "foggy-shapes", "--checkpoint",
                                              str(tmp_path / "cloud.pt")]))
    assert checkpoint_model_name(str(tmp_path / "cloud.pt")).startswith("foggy-shapes-")
    server = start_server(backend)
    try:
        image, _ = draw(2, size=(64, 96))
        answer = HttpBackend(server.url).detect(png_bytes(image), image, ["car", "bus"])
    finally:
        server.stop()
    assert 0 < len(answer.phrases) == len(answer.boxes) and set(answer.phrases) <= set(CATEGORIES)


def test_run_that_labels_nothing_says_so_loudly_once(capsys, caplog):
    from coin_ray.cloud.label import RunTally
    from coin_ray.ray.collect import _warn_if_nothing

    tally = RunTally()
    empty = Detections.empty("a", "a.png", 4, 4, SOURCE_CLOUD, 2)
    tally.add(empty, calls=1, cache_hit=False, reason="", dropped={"tree": 3})
    tally.add(Detections.empty("b", "b.png", 4, 4, SOURCE_CLOUD, 2, error="http 500: gave up"),
              calls=4, cache_hit=False, reason="http 500", dropped={})
    summary = tally.as_dict(price_per_call=0.01)
    assert summary["errors_by_reason"] == {"http 500": 1} and summary["money_spent"] == 0.05
    _warn_if_nothing(summary)
    assert "NOTHING WAS LABELLED" in summary["warning"] and "3 labels" in summary["warning"]
    out, err = capsys.readouterr()
    assert "NOTHING WAS LABELLED" in err
    assert (out + err + caplog.text).count("NOTHING WAS LABELLED") == 1  # it was printed and logged


def test_failed_images_are_named_with_their_reason_then_counted():
    """Issue 27, 4.9: a bad image showed only as "errors 1"."""
    from coin_ray.cloud.client import BUDGET
    from coin_ray.cloud.label import RunTally
    from coin_ray.progress import failure_lines

    tally = RunTally()
    for i in range(7):
        tally.add(Detections.empty(f"i{i}", f"/imgs/{i}.png", 0, 0, SOURCE_CLOUD, 2,
                                   error=f"image: cannot identify image file {i}"), 0, False, "image", {})
    tally.add(Detections.empty("b", "/imgs/b.png", 4, 4, SOURCE_CLOUD, 2, error="not asked"), 0, False, BUDGET, {})
    lines = failure_lines("collect", tally.failures, tally.failed, "cloud.parquet")
    assert lines[0] == "[collect] 7 images failed:"
    assert lines[1] == "  /imgs/0.png: image: cannot identify image file 0" and len(lines) == 7
    assert lines[-1] == "  ... and 2 more (every one in cloud.parquet)"
    assert failure_lines("collect", [], 0) == []
