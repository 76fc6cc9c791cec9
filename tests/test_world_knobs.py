"""Foggy-Shapes knobs: cloud_confusion (rho), distractor boxes, the stand-in CLIP's background crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coin_ray.boxes import pairwise_iou
from coin_ray.config import FOGGY_SHAPES_CATEGORIES as CATS
from coin_ray.config import FOGGY_SHAPES_CLOUD_CONFUSION, Config
from coin_ray.world.build import build_world, check_world, world_root
from coin_ray.world.clip_standin import (PARTIAL_MAX_IOU, TEMPLATES, _background_box, _caption_tokens,
                                         caption_words, load_distractors, template_style)
from coin_ray.world.cloud_standin import confuse_labels, load_coco_split, train_cloud_detector
from coin_ray.world.dataset import distractor_boxes
from coin_ray.world.scenes import SceneObject


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_world("tiny", cache_dir=tmp_path_factory.mktemp("cache"), seed=3)


def test_confusion_relabels_exactly_round_rho_n_of_rider_and_train(tiny):
    data = load_coco_split(tiny.source_train_images, tiny.source_train_json)
    before = np.concatenate([lab for _, _, lab in data])
    rider, person, train, bus = (CATS.index(c) + 1 for c in ("rider", "person", "train", "bus"))
    assert (int((before == rider).sum()), int((before == train).sum())) == (5, 3)
    same, counts = confuse_labels(data, CATS, 0.0, seed=3)
    assert same is data and counts == {"rider": 0, "train": 0}  # rho = 0: today's labels, untouched
    out, counts = confuse_labels(data, CATS, 0.4, seed=3)
    assert counts == {"rider": 2, "train": 1}  # floor(0.4 * 5 + 1/2), floor(0.4 * 3 + 1/2)
    after = np.concatenate([lab for _, _, lab in out])
    changed = np.flatnonzero(after != before)
    assert len(changed) == 3
    assert sorted(zip(before[changed].tolist(), after[changed].tolist())) == \
        sorted([(rider, person)] * 2 + [(train, bus)])
    assert confuse_labels(data, CATS, 0.5, seed=3)[1] == {"rider": 3, "train": 2}  # halves round up
    again, _ = confuse_labels(data, CATS, 0.4, seed=3)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(out, again))  # seeded
    _, all_of_them = confuse_labels(data, CATS, 1.0, seed=3)
    assert all_of_them == {"rider": 5, "train": 3}
    with pytest.raises(ValueError, match="cloud_confusion"):
        confuse_labels(data, CATS, 1.5, seed=3)


def test_confusion_is_recorded_in_the_checkpoint_only_when_on(tiny, tmp_path):
    for rho in (0.0, 0.5):
        path = train_cloud_detector(tiny.source_train_images, tiny.source_train_json, tmp_path / f"{rho}.pt",
                                    CATS, steps=1, batch_size=1, seed=3, log_every=0, cloud_confusion=rho)
        meta = torch.load(path, weights_only=True)["meta"]
        assert meta.get("cloud_confusion") == (rho or None)


def test_confusion_is_part_of_the_cache_key(tiny, tmp_path):
    assert world_root("demo", 0, tmp_path, 0.0) == tmp_path / "world" / "demo-0"
    assert world_root("demo", 0, tmp_path, 0.25) == tmp_path / "world" / "demo-0-confusion0.25"
    assert check_world(tiny.root, "tiny", 3) == ""
    assert "cloud_confusion" in check_world(tiny.root, "tiny", 3, 0.5)
    assert json.loads((tiny.root / "manifest.json").read_text())["cloud_confusion"] == FOGGY_SHAPES_CLOUD_CONFUSION
    with pytest.raises(ValueError, match="cloud_confusion"):
        build_world("tiny", cache_dir=tmp_path, seed=3, cloud_confusion=-0.1)


def test_the_world_and_the_config_share_one_default_rho(tmp_path):
    """A run with default settings uses the world build_world makes by default (no second build)."""
    rho = Config().data.cloud_confusion
    assert rho == FOGGY_SHAPES_CLOUD_CONFUSION > 0
    assert world_root("demo", 0, tmp_path) == tmp_path / "world" / f"demo-0-confusion{rho:g}"


def test_distractor_boxes_come_from_the_instance_map():
    instances = np.zeros((10, 12), np.int32)
    instances[2:5, 3:7] = 101  # a tree
    instances[6:8, 0:2] = 102  # a car: ground truth, not a distractor
    objects = (SceneObject("tree", 5, 5, 1, 0, 101), SceneObject("car", 1, 8, 1, 0, 102),
               SceneObject("pole", 9, 9, 1, 0, 103))  # the pole was hidden entirely
    assert distractor_boxes(objects, instances) == [((3.0, 2.0, 7.0, 5.0), "tree")]


def test_annotations_list_distractors_per_image(tiny):
    coco = json.loads(tiny.target_train_json.read_text())
    assert {"images", "annotations", "categories", "distractors"} <= set(coco)
    per_image = load_distractors(tiny.target_train_json)
    assert len(per_image) == len(coco["images"]) and sum(map(len, per_image)) == len(coco["distractors"]) > 0
    assert {d["kind"] for d in coco["distractors"]} <= {"tree", "pole", "crate", "bush"}
    for d in coco["distractors"]:
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 256 and y + h <= 160


def test_background_crops_stay_off_every_object(tiny):
    data = [(img, boxes, labels - 1) for img, boxes, labels in load_coco_split(tiny.source_train_images,
                                                                                tiny.source_train_json)]
    distractors = load_distractors(tiny.source_train_json)
    rng = np.random.default_rng(0)
    found = [b for b in (_background_box(rng, data, distractors) for _ in range(300)) if b is not None]
    assert len(found) > 150
    for i, box in found:
        gt = data[i][1]
        if len(gt):
            assert float(pairwise_iou(torch.from_numpy(box[None]), torch.from_numpy(gt)).max()) < PARTIAL_MAX_IOU


def test_background_captions_are_the_collectors_ensemble(tiny):
    from transformers import CLIPTokenizer

    assert template_style("a photo of a {} in a foggy street scene.") == "foggy street scene"
    assert template_style("a {} in a street scene.") == "street scene"
    assert template_style("a photo of a {}.") == ""
    assert {"nothing", "particular", "background"} <= set(caption_words(CATS))
    tokenizer = CLIPTokenizer.from_pretrained(tiny.clip_dir)
    styled = TEMPLATES.index("a photo of a {} in a foggy street scene.")
    tokens = _caption_tokens(tokenizer, CATS, [0, styled], np.random.default_rng(1))
    texts = tokenizer.batch_decode(tokens["input_ids"], skip_special_tokens=True)
    assert len(texts) == 2 * (len(CATS) + 1)
    assert texts[0] == "a photo of a truck ." and texts[len(CATS) + 1].endswith("in a foggy street scene .")
    assert texts[len(CATS)] in {"a photo of background .", "a photo of nothing in particular .",
                                "a blurry photo of background .", "a blurry photo of nothing in particular ."}
    assert "in a foggy street scene" in texts[-1] and ("background" in texts[-1] or "nothing" in texts[-1])
