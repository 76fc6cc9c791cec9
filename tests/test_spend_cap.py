"""A spend cap holds per answer cache, and a collection it stopped is finished by a re-run.

Both routes of issue 27 (4.7), in process on a local Ray against the project's detector
server serving the tiny world's stand-in cloud: a collect capped by ``cloud.max_calls``,
then a plain full run with a higher cap, with and without ``run_id``. The training stages
after collect are replaced by a recorder of what they would train on (``cloud_records``,
what disseminate reads): the test is about which images are asked and seen, not training.
"""

from __future__ import annotations

import json

import pytest

from coin_ray import storage
from coin_ray.cloud.budget import read_spent, spend_folder
from coin_ray.config import load_config
from coin_ray.location import default_answer_cache
from coin_ray.ray import pipeline
from coin_ray.run import STAGE_NAMES, RunDir
from coin_ray.serve import Knobs, start_server
from coin_ray.train.data import cloud_records

CAP = 5


@pytest.fixture
def stand_in():
    """The tiny world (the user's shared one) and its stand-in cloud on a loopback port."""
    from coin_ray.world.build import build_world
    from coin_ray.world.cloud_standin import StandInCloudDetector

    world = build_world("tiny")
    server = start_server(StandInCloudDetector.load(world.cloud_detector), Knobs())
    yield world, server
    server.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run_id", ["", "my-run"])
def test_capped_collect_then_a_plain_run_asks_every_image_once(local_ray, stand_in, tmp_path, monkeypatch, run_id):
    world, server = stand_in
    images = len(list(world.target_train_images.iterdir())) + len(list(world.target_val_images.iterdir()))
    base = [f"storage={tmp_path / 'runs'}", "data.world=tiny", f"cloud.url={server.url}",
            "cloud.num_actors=1", "cloud.requests_per_second=50", f"run_id={run_id}"]
    capped = pipeline.run_adaptation(load_config(None, [*base, f"cloud.max_calls={CAP}"]), stages=["collect"])
    run = RunDir(capped.run_dir)
    assert server.stats()["detect_requests"] == CAP
    assert run.manifest()["stages"]["collect"]["unfinished"] == images - CAP and not run.is_done("collect")

    seen: dict[str, list[str]] = {}

    def trained_on(stage):
        def record(cfg, run_):
            seen[stage] = sorted(r.uri for r in cloud_records(run_))
            return {}
        return record
    for stage in STAGE_NAMES[1:]:
        monkeypatch.setitem(pipeline.STAGES, stage, trained_on(stage))
    full = pipeline.run_adaptation(load_config(None, [*base, f"cloud.max_calls={4 * images}"]))

    assert full.run_dir == capped.run_dir  # raising the cap resumes the run, with or without run_id
    assert full.stages_run == list(STAGE_NAMES)  # collect first, then everything after it
    assert server.stats()["detect_requests"] == images  # each image asked exactly once in all
    assert len(seen["disseminate"]) == len(set(seen["disseminate"])) == images
    assert seen["distill"] == seen["disseminate"]
    assert run.is_done("collect") and "unfinished" not in run.manifest()["stages"]["collect"]
    summary = json.loads(storage.read_text(run.collect_summary))
    assert summary["calls"] == images - CAP and summary["cache_hits"] == CAP
    assert summary["budget"]["calls_before"] == CAP and summary["budget"]["calls_total"] == images
    assert read_spent(spend_folder(default_answer_cache(), "http")) == images  # the ledger, with the cache
