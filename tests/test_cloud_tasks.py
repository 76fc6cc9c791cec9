"""Paid task backends are paid once: dds against ``coin_ray.serve --protocol dds`` on 127.0.0.1.

The server counts task creations per image (SHA-256 of the uploaded bytes); every test
checks those counts, not the client's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cloud_world import ColourBoxes, draw, png_bytes, write_images
from coin_ray.cloud.budget import SpendLedger, budget_line, budget_summary, call_cap, read_spent
from coin_ray.cloud.cache import AnswerCache
from coin_ray.cloud.client import BUDGET, SKIPPED, CloudClient, RetryPolicy
from coin_ray.cloud.dds import DdsBackend
from coin_ray.cloud.errors import AuthError, Secret
from coin_ray.cloud.ratelimit import LocalLimiter
from coin_ray.data.images import decode_image
from coin_ray.serve import Knobs, start_server

TOKEN = "dds-serve-tok-5e6f7a8b"


@pytest.fixture
def dds_server():
    """``dds_server(**knobs)``: ColourBoxes behind the DDS V2 task protocol on a loopback port."""
    servers = []

    def start(**knobs):
        s = start_server(ColourBoxes(), Knobs(token=TOKEN, **knobs), protocol="dds")
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def dds_client(url: str, cache_root: Path | None, *, poll_deadline_s: float = 5.0,
               retries: int = 3, token: str = TOKEN, **kw) -> CloudClient:
    backend = DdsBackend(token=Secret(token), endpoint=url, poll_deadline_s=poll_deadline_s,
                         poll_interval_s=0.05, timeout_s=2.0)
    cache = AnswerCache(str(cache_root), "dds") if cache_root else None
    return CloudClient(backend, prompts=["car", "bus"], model="dds-test", threshold=0.25,
                       cache=cache, limiter=kw.pop("limiter", LocalLimiter(1000, 8)),
                       policy=RetryPolicy(retries, 0.01, 0.05), token_env="COIN_DDS_TOKEN", **kw)


def images(n: int, seed: int = 0) -> list[tuple[bytes, object]]:
    out = []
    for i in range(n):
        image, _ = draw(seed + i)
        image[0, 0] = (i, 9, 9)  # distinct bytes per image
        out.append((png_bytes(image), image))
    return out


def ask_all(client: CloudClient, items) -> list:
    return [client.ask(data, image) for data, image in items]


def creations(server) -> dict:
    return dict(server.server.tasks.creations)


def test_poll_deadline_shorter_than_task_creates_once_and_answers_later(dds_server, tmp_path):
    server = dds_server(task_s=2.0)  # 1 to 3 s: far longer than a 0.1 s poll deadline
    items = images(4)
    first = ask_all(dds_client(server.url, tmp_path, poll_deadline_s=0.1, retries=1), items)
    assert all(o.answer is None and o.reason == "poll deadline" for o in first)
    assert "polled again by the next run" in first[0].error
    assert sorted(creations(server).values()) == [1, 1, 1, 1]
    # Within one ask, polling again (not creating again) outlasts a slow task.
    slow = images(2, seed=50)
    within = ask_all(dds_client(server.url, tmp_path, poll_deadline_s=0.3, retries=20), slow)
    assert all(o.answer is not None and o.calls == 1 for o in within)
    resumed = ask_all(dds_client(server.url, tmp_path, poll_deadline_s=5.0), items)
    assert all(o.answer is not None and o.calls == 0 for o in resumed)
    assert sorted(creations(server).values()) == [1] * 6
    assert server.stats()["tasks"]["duplicate_creations"] == 0
    assert not list(tmp_path.rglob("*.pending"))  # answered: no pending task left behind


def test_retried_creation_reuses_its_idempotency_key(dds_server, tmp_path):
    # Every create reply is lost after the task exists (a hang past the client's timeout).
    server = dds_server(fail_hang=1.0, hang_s=0.6)
    (data, image), = images(1)
    out = dds_client(server.url, tmp_path, retries=2).ask(data, image)
    assert out.answer is None and out.calls == 3
    stats = server.stats()["tasks"]
    assert stats["creations"] == 1 and stats["idempotent_replays"] == 2


KILLED_CHILD = textwrap.dedent("""
    import sys, threading
    from coin_ray.cloud.cache import AnswerCache
    from coin_ray.cloud.client import CloudClient, RetryPolicy
    from coin_ray.cloud.dds import DdsBackend
    from coin_ray.cloud.errors import Secret
    from coin_ray.cloud.ratelimit import LocalLimiter
    from coin_ray.data.images import decode_image
    url, cache, token, *paths = sys.argv[1:]
    backend = DdsBackend(token=Secret(token), endpoint=url, poll_deadline_s=60, poll_interval_s=0.05)
    client = CloudClient(backend, prompts=["car", "bus"], model="dds-test", threshold=0.25,
                         cache=AnswerCache(cache, "dds"), limiter=LocalLimiter(1000, 8),
                         policy=RetryPolicy(3, 0.01, 0.05))
    def ask(path):
        data = open(path, "rb").read()
        client.ask(data, decode_image(data))
    threads = [threading.Thread(target=ask, args=(p,)) for p in paths]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def test_kill_with_tasks_in_flight_then_resume_creates_nothing_again(dds_server, tmp_path):
    server = dds_server(task_s=5.0)  # none can finish (>= 2.5 s) before all 8 are created
    paths = write_images(tmp_path / "imgs", 8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, server.url, str(tmp_path / "cache"),
                              TOKEN, *paths], env=env)
    deadline = time.monotonic() + 60
    while (len(list((tmp_path / "cache").rglob("*.pending"))) < 8 and child.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert sum(creations(server).values()) == 8 and not list((tmp_path / "cache").rglob("*.json"))
    client = dds_client(server.url, tmp_path / "cache")
    resumed = [client.ask(Path(p).read_bytes(), decode_image(Path(p).read_bytes())) for p in paths]
    assert all(o.answer is not None and o.calls == 0 for o in resumed)
    assert sorted(creations(server).values()) == [1] * 8
    assert server.stats()["tasks"]["duplicate_creations"] == 0


def test_failed_tasks_are_remembered_and_retried_only_when_asked(dds_server, tmp_path):
    server = dds_server(fail_task=0.5, seed=4)
    items = images(8)
    first = ask_all(dds_client(server.url, tmp_path), items)
    failed = [i for i, o in enumerate(first) if o.answer is None]
    assert 0 < len(failed) < 8 and {first[i].reason for i in failed} == {"dds task failed"}
    before = creations(server)
    again = ask_all(dds_client(server.url, tmp_path), items)
    assert creations(server) == before  # 0 new creations
    assert [i for i, o in enumerate(again) if o.reason == SKIPPED] == failed
    assert all(again[i].calls == 0 and "retry-failed" in again[i].error for i in failed)
    server.server.knobs.fail_task = 0.0
    retried = ask_all(dds_client(server.url, tmp_path, retry_failed=True), items)
    assert all(o.answer is not None for o in retried)
    after = creations(server)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == \
        {k: 1 for k in after if after[k] == 2}
    assert sum(after.values()) - sum(before.values()) == len(failed)
    assert not list(tmp_path.rglob("*.failed"))


def test_budget_of_n_calls_then_raised_finishes_without_duplicates(dds_server, tmp_path):
    server = dds_server()
    items = images(10)
    ledger = str(tmp_path / "cache" / "dds" / "spend")
    budget = SpendLedger(ledger, max_calls=call_cap(4, 0.0, 0.0))
    client = dds_client(server.url, tmp_path / "cache", budget=budget)
    out = [None] * len(items)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client.ask(*items[i])))
               for i in range(len(items))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(creations(server).values()) == 4 and sum(o.calls for o in out) == 4
    assert sum(o.reason == BUDGET for o in out) == 6
    block = budget_summary(budget.totals(), 0.5, 2.0)
    assert block["calls_total"] == 4 and block["spend_total"] == 2.0 and block["exhausted"]
    assert "6 images not asked" in budget_line(block, 6)
    # Raised by money: 0.5 per call, 5.0 allows 10 calls over both runs.
    raised = SpendLedger(ledger, max_calls=call_cap(0, 5.0, 0.5))
    rest = ask_all(dds_client(server.url, tmp_path / "cache", budget=raised), items)
    assert all(o.answer is not None for o in rest) and sum(o.calls for o in rest) == 6
    assert sorted(creations(server).values()) == [1] * 10
    assert raised.totals()["calls_total"] == 10 and read_spent(ledger) == 10


def test_refused_token_costs_exactly_one_request_among_many_callers(dds_server, tmp_path):
    server = dds_server()
    client = dds_client(server.url, None, token="wrong-" + TOKEN, limiter=LocalLimiter(1000, 8))
    errors = []

    def ask(item):
        try:
            client.ask(*item)
        except AuthError as err:
            errors.append(str(err))
    threads = [threading.Thread(target=ask, args=(item,)) for item in images(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert server.stats()["detect_requests"] == 1 and len(errors) == 8
    assert all("COIN_DDS_TOKEN" in e and TOKEN not in e for e in errors)


def test_task_the_service_lost_is_created_again_with_a_new_key(dds_server, tmp_path):
    server = dds_server(task_s=2.0)
    (data, image), = images(1)
    first = dds_client(server.url, tmp_path, poll_deadline_s=0.1, retries=0).ask(data, image)
    assert first.reason == "poll deadline" and list(tmp_path.rglob("*.pending"))
    server.server.tasks.tasks.clear()  # the service forgot it (expired): polls now get 404
    again = dds_client(server.url, tmp_path).ask(data, image)
    assert again.answer is not None and again.calls == 1
    stats = server.stats()["tasks"]
    assert stats["creations"] == 2 and stats["idempotent_replays"] == 0


def test_adapt_job_retry_failed_flag_sets_cloud_retry_failed(monkeypatch):
    from types import SimpleNamespace

    from coin_ray import cli, commands

    seen = []
    monkeypatch.setattr(commands, "check_adapt", lambda cfg, collect: None)
    monkeypatch.setattr(commands, "run_adaptation", lambda cfg, **kw: seen.append(cfg) or SimpleNamespace(ok=True))
    assert cli.main(["adapt", "--retry-failed", "cloud.max_calls=3"]) == 0
    assert cli.main(["adapt", "cloud.max_spend=1.5", "cloud.price_per_call=0.5"]) == 0
    assert (seen[0].cloud.retry_failed, seen[0].cloud.max_calls) == (True, 3)
    assert (seen[1].cloud.retry_failed, seen[1].cloud.max_spend) == (False, 1.5)
    assert cli.main(["adapt", "cloud.max_spend=1.5"]) == 2  # a money cap needs a price per call