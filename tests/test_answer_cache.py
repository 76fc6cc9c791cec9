"""One answer cache per user: where it is, runs sharing it at once, older caches, the ledger
kept with it, and the run id spend settings leave alone (no Ray)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloud_world import draw, png_bytes
from coin_ray import storage
from coin_ray.cloud.budget import SpendLedger, adopt_run_ledger, read_spent
from coin_ray.cloud.cache import AnswerCache
from coin_ray.config import load_config
from coin_ray.location import cache_location, legacy_cache_location, refuse_unshared, resolve_config
from coin_ray.ray.pipeline import stages_to_run
from coin_ray.run import STAGE_NAMES, RunDir, stage_settings
from test_cloud_client import client_for


def distinct_images(n: int) -> list[tuple[bytes, object]]:
    out = []
    for i in range(n):
        image, _ = draw(i)
        image[0, 0] = (i, 7, 7)
        out.append((png_bytes(image), image))
    return out


def test_the_default_cache_is_per_user_and_leaves_the_worlds_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("COIN_RAY_CACHE", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    one = resolve_config(load_config(None, ["storage=runs-a"]))
    two = resolve_config(load_config(None, ["storage=/elsewhere/runs"]))
    assert one.cloud.cache == two.cloud.cache == str(tmp_path / "home" / "answers") == cache_location(one)
    assert legacy_cache_location(one) == str(tmp_path / "runs-a" / "cache")
    assert resolve_config(one) is one  # idempotent: the driver fixes it once
    # "s3://" stays as given; an explicit <storage>/cache is no older cache of itself.
    s3 = resolve_config(load_config(None, ["storage=s3://b/runs", "cloud.cache=s3://b/runs/cache"]))
    assert s3.cloud.cache == "s3://b/runs/cache" and legacy_cache_location(s3) == ""
    from coin_ray.world.build import world_root
    assert world_root("tiny").parent == tmp_path / "home" / "world"


def test_a_node_local_cache_is_refused_on_several_nodes_in_one_line():
    refuse_unshared("s3://b/answers", 3, env={}, key="cloud.cache")
    with pytest.raises(Exception, match=r"^cloud.cache /home/u/.cache/coin_ray/answers is a local folder but "
                                        r"the Ray cluster has 3 nodes: set cloud.cache=s3://") as err:
        refuse_unshared("/home/u/.cache/coin_ray/answers", 3, env={}, key="cloud.cache")
    assert "\n" not in str(err.value)


def test_spend_settings_and_the_cache_location_leave_the_run_id_alone():
    base = load_config(None, ["data.world=tiny"])
    for setting in ("cloud.max_calls=5", "cloud.max_spend=2.0", "cloud.price_per_call=0.5",
                    "cloud.cache=s3://b/answers"):
        other = load_config(None, ["data.world=tiny", "cloud.price_per_call=0.1", setting])
        assert other.resolved_run_id() == base.resolved_run_id(), setting
    assert load_config(None, ["data.world=tiny", "cloud.threshold=0.5"]).resolved_run_id() != base.resolved_run_id()
    assert base.resolved_run_id() == "run-f37c4226f2"  # pinned: ids of existing runs must not move


def test_two_collectors_at_once_ask_each_image_once_and_leave_a_readable_cache(served, tmp_path):
    server = served(latency_s=0.2)  # long enough for both collectors to want every image at once
    items = distinct_images(6)
    root = str(tmp_path / "answers")
    collectors = [client_for(server.url, cache=AnswerCache(root, "http")) for _ in range(2)]

    def collect(client, order):
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda i: client.ask(*items[i]), order))
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(collect, collectors, [range(6), reversed(range(6))])
    assert server.stats()["detect_requests"] == 6
    assert sum(o.calls for o in first + second) == 6 and sum(o.cache_hit for o in first + second) == 6
    assert all(o.answer is not None for o in first + second)
    entries = storage.list_files(root)
    assert len(entries) == 6 and all(e.endswith(".json") for e in entries)  # no lock or temp file left
    for uri in entries:
        json.loads(storage.read_text(uri))
    reread = AnswerCache(root, "http")
    assert all(reread.get(collectors[0].key(data)) is not None for data, _ in items)


def test_a_lock_is_exclusive_across_threads_and_never_left_behind(tmp_path):
    uri = str(tmp_path / "a" / "k.lock")
    inside, most = [0], [0]

    def hold():
        with storage.locked(uri) as real:
            assert real
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            inside[0] -= 1
    threads = [threading.Thread(target=hold) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert most[0] == 1 and not (tmp_path / "a" / "k.lock").exists()
    with storage.locked("s3://bucket/k.lock") as real:  # S3 has no lock: the caller is told so
        assert real is False


def test_answers_in_an_older_storage_cache_are_hits_and_move_into_the_user_cache(served, tmp_path):
    server = served()
    items = distinct_images(3)
    legacy, home = str(tmp_path / "runs" / "cache"), str(tmp_path / "answers")
    client_for(server.url, cache=AnswerCache(legacy, "http")).ask(*items[0])  # an older version paid
    assert server.stats()["detect_requests"] == 1
    upgraded = client_for(server.url, cache=AnswerCache(home, "http", also_read=(legacy,)))
    outs = [upgraded.ask(*item) for item in items]
    assert outs[0].cache_hit and outs[0].calls == 0 and [o.calls for o in outs[1:]] == [1, 1]
    assert server.stats()["detect_requests"] == 3
    # Copied into the user's cache: a run with another storage finds it without the old folder.
    assert client_for(server.url, cache=AnswerCache(home, "http")).ask(*items[0]).cache_hit


def test_one_ledger_for_concurrent_runs_holds_the_cap_and_counts_every_call(tmp_path):
    folder = str(tmp_path / "answers" / "dds" / "spend")
    runs = [SpendLedger(folder, max_calls=7, writer=f"run-{i}") for i in range(3)]
    with ThreadPoolExecutor(6) as pool:
        granted = list(pool.map(lambda i: runs[i % 3].charge(), range(30)))
    assert sum(granted) == 7 and read_spent(folder) == 7
    assert sum(r.totals()["calls_this_run"] for r in runs) == 7
    assert all(r.totals()["calls_total"] == 7 for r in runs)
    raised = SpendLedger(folder, max_calls=9, writer="run-3")
    assert raised.before == 7 and [raised.charge() for _ in range(3)] == [True, True, False]
    # An older version's per-run ledger counts once, however often the run is resumed.
    old = str(tmp_path / "runs" / "r1" / "collect" / "spend.json")
    storage.write_text(old, json.dumps({"calls": 4}))
    adopt_run_ledger(old, folder, "from-r1")
    adopt_run_ledger(old, folder, "from-r1")
    assert read_spent(folder) == 13


def test_an_unfinished_collection_runs_first_with_every_later_stage(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    cfg = load_config(None, [])
    run.mark_done("collect", settings=stage_settings(cfg, "collect"), unfinished=3)
    for stage in STAGE_NAMES[1:]:
        run.mark_done(stage, settings=stage_settings(cfg, stage))
    assert not run.is_done("collect") and run.first_unfinished() == "collect"
    assert stages_to_run(run, None, cfg) == list(STAGE_NAMES)
    assert "collect is not finished: running it, then disseminate, clip_det" in capsys.readouterr().out
    assert not any(run.is_done(s) for s in STAGE_NAMES)
    run.mark_done("collect")
    assert stages_to_run(run, None, cfg) == list(STAGE_NAMES[1:])
