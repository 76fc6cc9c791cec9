"""Issue 26's "done when": a config with neither ``epochs`` nor ``steps`` trains the default
epochs on data of any size. The tiny Foggy-Shapes world's own target images: the length both
training stages resolve for all of them, and both stages trained in-process on a few of
them, each step counted (the whole world at 65 epochs would take minutes)."""

from __future__ import annotations

import math

import pytest

from coin_ray.config import DEFAULT_DISSEMINATE_EPOCHS, DEFAULT_DISTILL_EPOCHS, from_dict
from coin_ray.data.datasets import load_coco
from coin_ray.models.build import save_detector
from coin_ray.train.disseminate import disseminate
from coin_ray.train.distill import distill
from coin_ray.train.oracle import ground_truth_records
from coin_ray.train.schedule import resolve_length
from coin_ray.world.build import build_world

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_world("tiny", cache_dir=tmp_path_factory.mktemp("world"))


def test_a_config_without_a_length_trains_the_default_epochs_on_the_tiny_world(tiny, tmp_path, capsys):
    cfg = from_dict({}, [f"clip.model={tiny.clip_dir}", "model.min_size=48", "model.max_size=64",
                         "model.region_features=pooled", "model.target_backbone=mobilenet_v3",
                         f"train.disseminate.batch_size={BATCH}", f"train.distill.batch_size={BATCH}"])
    assert (cfg.train.disseminate.steps, cfg.train.disseminate.epochs) == (None, None)
    assert (cfg.train.distill.steps, cfg.train.distill.epochs) == (None, None)
    # The world's labelled target train images stand in for the cloud's boxes (score 1).
    split = load_coco(str(tiny.target_train_json), str(tiny.target_train_images), cfg.data.categories)
    records = ground_truth_records(split)
    assert len(records) == 8
    assert resolve_length(cfg, "disseminate", len(records))[0].train.disseminate.steps == 200  # 50 x 8 / 2
    assert resolve_length(cfg, "distill", len(records))[0].train.distill.steps == 260  # 65 x 8 / 2
    records = records[:2]  # 50 and 65 steps of 2 images
    images = len(records)

    seen: list[int] = []
    detector = disseminate(cfg, records, on_step=lambda step, metrics: seen.append(step))
    steps = math.ceil(DEFAULT_DISSEMINATE_EPOCHS * images / BATCH)
    assert seen == list(range(1, steps + 1))
    assert f"[disseminate] 50 epochs (the default) = {steps} steps of 2 images over 2 images" in capsys.readouterr().out

    save_detector(detector, str(tmp_path / "clip_det.pt"))
    seen.clear()
    state = distill(cfg, str(tmp_path / "clip_det.pt"), records, on_step=lambda step, metrics: seen.append(step))
    steps = math.ceil(DEFAULT_DISTILL_EPOCHS * images / BATCH)
    assert seen == list(range(1, steps + 1)) and state.step == steps
    assert f"[distill] 65 epochs (the default) = {steps} steps of 2 images over 2 images" in capsys.readouterr().out
