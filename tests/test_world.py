"""Foggy-Shapes: determinism, ground truth around visible pixels, COCO files, fog, cache, stand-ins."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from coin_ray.cloud.base import CloudAnswer
from coin_ray.config import FOGGY_SHAPES_CATEGORIES
from coin_ray.data.images import load_image
from coin_ray.world.build import MANIFEST, build_world, check_world
from coin_ray.world.cloud_standin import StandInCloudDetector, prompt_categories
from coin_ray.world.dataset import render_image
from coin_ray.world.domains import apply_domain, fog
from coin_ray.world.scenes import render_scene, sample_scene


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_world("tiny", cache_dir=tmp_path_factory.mktemp("cache"), seed=3)


def test_render_is_deterministic_by_seed():
    a, gt_a, params_a = render_image(7, "val", 2, "fog", 256, 160)
    b, gt_b, params_b = render_image(7, "val", 2, "fog", 256, 160)
    c, _, _ = render_image(8, "val", 2, "fog", 256, 160)
    assert a.dtype == np.uint8 and a.shape == (160, 256, 3)
    np.testing.assert_array_equal(a, b)
    assert [g.box for g in gt_a] == [g.box for g in gt_b] and params_a == params_b
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_source_and_target_val_show_the_same_scene():
    clear, gt_clear, _ = render_image(0, "val", 1, "clear", 256, 160)
    foggy, gt_fog, params = render_image(0, "val", 1, "fog", 256, 160)
    assert [g.box for g in gt_clear] == [g.box for g in gt_fog]
    assert params["beta"] > 0 and not np.array_equal(clear, foggy)


def test_boxes_are_inside_the_image_and_tight_around_visible_pixels():
    seen = set()
    for seed in range(12):
        image, depth, instances, gt = render_scene(sample_scene(np.random.default_rng(seed), 256, 160))
        assert image.shape == (160, 256, 3) and depth.shape == instances.shape == (160, 256)
        for g in gt:
            x0, y0, x1, y1 = g.box
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 160
            ys, xs = np.nonzero(instances == g.obj_id)
            assert len(xs) > 0, "a ground-truth object has no visible pixel"
            # instances is the supersampled id map sampled once per pixel: 1 px tolerance
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
            assert max(x1 - x0, y1 - y0) >= 10
            assert g.visible_fraction >= 0.35
            seen.add(FOGGY_SHAPES_CATEGORIES[g.category])
    assert len(seen) >= 6, f"too few categories drawn in 12 scenes: {seen}"


def test_lower_objects_are_closer_and_larger():
    rows, depths, heights = [], [], []
    for seed in range(20):
        for g in render_scene(sample_scene(np.random.default_rng(seed), 256, 160))[3]:
            if FOGGY_SHAPES_CATEGORIES[g.category] == "person" and g.visible_fraction > 0.99:
                rows.append(g.box[3])
                depths.append(g.depth)
                heights.append(g.box[3] - g.box[1])
    assert len(rows) >= 5
    order = np.argsort(rows)
    assert np.all(np.diff(np.array(depths)[order]) <= 1e-6)
    assert np.corrcoef(rows, heights)[0, 1] > 0.8


def test_fog_lowers_contrast_monotonically_with_depth():
    depth = np.repeat(np.linspace(1, 120, 40, dtype=np.float32)[:, None], 2, axis=1)
    image = np.zeros((40, 2, 3), np.float32)
    image[:, 1] = 1.0  # a black and a white column at every depth
    airlight = np.full(3, 0.8, np.float32)
    foggy = fog(image, depth, 0.05, airlight)
    contrast = foggy[:, 1, 0] - foggy[:, 0, 0]
    assert np.all(np.diff(contrast) < 0)
    np.testing.assert_allclose(contrast, np.exp(-0.05 * depth[:, 0]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fog(image, depth, 0.0, airlight), image)


def test_fog_on_a_scene_follows_the_scattering_model():
    clear, depth, _, _ = render_scene(sample_scene(np.random.default_rng(4), 256, 160))
    out, params = apply_domain(clear, depth, "fog", np.random.default_rng(0))
    # Contrast left in far pixels is lower than in near pixels.
    near, far = depth < 10, (depth > 25) & (depth < 200)
    ratio = lambda m: out[m].astype(np.float32).std() / (255 * clear[m].std())  # noqa: E731
    assert ratio(far) < ratio(near) < 1.0
    with pytest.raises(ValueError, match="unknown domain"):
        apply_domain(clear, depth, "night", np.random.default_rng(0))


def test_coco_json_loads_in_pycocotools(tiny):
    for path, images in [(tiny.target_val_json, tiny.target_val_images),
                         (tiny.source_val_json, tiny.source_val_images),
                         (tiny.target_train_json, tiny.target_train_images)]:
        coco = COCO(str(path))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == FOGGY_SHAPES_CATEGORIES
        assert coco.getCatIds() == list(range(1, 9))
        assert len(coco.getAnnIds()) > 0
        for img in coco.loadImgs(coco.getImgIds()):
            assert load_image(str(images / img["file_name"])).shape == (img["height"], img["width"], 3)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                x, y, w, h = ann["bbox"]
                assert x >= 0 and y >= 0 and w > 0 and h > 0
                assert x + w <= img["width"] and y + h <= img["height"]


def test_second_call_reuses_the_cache(tiny):
    stamp = (tiny.root / MANIFEST).stat().st_mtime_ns
    again = build_world("tiny", cache_dir=tiny.root.parent.parent, seed=3)
    assert again == tiny and (tiny.root / MANIFEST).stat().st_mtime_ns == stamp
    assert check_world(tiny.root, "tiny", 3) == ""


def test_damaged_caches_are_detected(tiny, tmp_path):
    import shutil

    for damage in ["missing image", "bad manifest", "changed checkpoint", "no manifest", "extra file"]:
        root = tmp_path / damage.replace(" ", "_")
        shutil.copytree(tiny.root, root)
        image = sorted((root / "target_val" / "images").iterdir())[0]
        if damage == "missing image":
            image.unlink()
        elif damage == "bad manifest":
            (root / MANIFEST).write_text("{not json")
        elif damage == "changed checkpoint":
            ckpt = root / "cloud_detector.pt"
            ckpt.write_bytes(ckpt.read_bytes()[:-1] + b"x")
        elif damage == "no manifest":  # what an interrupted build leaves behind
            (root / MANIFEST).unlink()
        else:
            (root / "target_val" / "images" / "stray.jpg").write_bytes(image.read_bytes())
        assert check_world(root, "tiny", 3) != "", damage
    assert check_world(tiny.root, "tiny", 4) != ""  # another seed's manifest


def test_corrupt_cache_is_rebuilt(tiny, tmp_path, capsys):
    import shutil

    root = tmp_path / "world" / tiny.root.name
    shutil.copytree(tiny.root, root)
    image = sorted((root / "target_val" / "images").iterdir())[0]
    before = image.read_bytes()
    image.unlink()
    (root.with_name(root.name + ".partial")).mkdir()  # a crashed build's leftovers
    capsys.readouterr()
    rebuilt = build_world("tiny", cache_dir=tmp_path, seed=3)
    assert "rebuilding" in capsys.readouterr().out
    assert rebuilt.root == root and check_world(root, "tiny", 3) == ""
    assert image.read_bytes() == before  # the same world again: the build is deterministic


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    from coin_ray.world.build import world_root

    monkeypatch.setenv("COIN_RAY_CACHE", str(tmp_path))
    assert world_root("demo", 2, cloud_confusion=0.0) == tmp_path / "world" / "demo-2"
    assert world_root("demo", 2, tmp_path / "x", 0.0) == tmp_path / "x" / "world" / "demo-2"


def test_standin_cloud_detector_answers_like_a_backend(tiny):
    image = load_image(str(sorted(tiny.target_val_images.iterdir())[0]))
    backend = StandInCloudDetector.load(tiny.cloud_detector, score_threshold=0.0)
    answer = backend.detect(b"", image, list(FOGGY_SHAPES_CATEGORIES))
    assert isinstance(answer, CloudAnswer) and answer.probs is None
    n = len(answer.phrases)
    assert n > 0 and answer.boxes.shape == (n, 4) and answer.boxes.dtype == np.float32
    assert answer.scores.shape == (n,) and np.all((answer.scores >= 0) & (answer.scores <= 1))
    assert set(answer.phrases) <= set(FOGGY_SHAPES_CATEGORIES)
    assert np.all(answer.boxes[:, 2:] <= [256, 160]) and np.all(answer.boxes >= 0)
    only = StandInCloudDetector.load(tiny.cloud_detector, score_threshold=0.0, full_probs=True)
    answer = only.detect(b"", image, ["a bus", "cars"])
    assert set(answer.phrases) <= {"bus", "car"}
    assert answer.probs.shape == (len(answer.phrases), 3)
    np.testing.assert_allclose(answer.probs.sum(1), 1.0, atol=1e-5)
    none = only.detect(b"", image, ["traffic light"])  # no known category: an empty answer
    assert none.boxes.shape == (0, 4) and none.phrases == [] and none.probs.shape == (0, 1)


def test_prompt_categories_match_whole_words():
    cats = FOGGY_SHAPES_CATEGORIES
    assert prompt_categories(["bicycles", "a photo of a car"], cats) == ["bicycle", "car"]
    assert prompt_categories(["motorcycle"], cats) == ["motorcycle"]
    assert prompt_categories(["traffic light"], cats) == []


def test_standin_clip_loads_like_a_real_checkpoint(tiny):
    import torch
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(tiny.clip_dir), AutoProcessor.from_pretrained(tiny.clip_dir)
    image = load_image(str(sorted(tiny.source_val_images.iterdir())[0]))
    inputs = processor(text=[f"a photo of a {c}." for c in FOGGY_SHAPES_CATEGORIES],
                       images=[image[40:120, 30:150]], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 8)
    assert json.loads((tiny.clip_dir / "config.json").read_text())["model_type"] == "clip"
    assert os.path.exists(tiny.clip_dir / "tokenizer_config.json")


def test_preview_writes_a_small_png(tmp_path):
    from PIL import Image

    from coin_ray.world.preview import write_preview

    path = write_preview(tmp_path / "p.png", rows=1, scale=1)
    with Image.open(path) as img:
        assert img.size == (2 * 256 + 4, 160)
    assert path.stat().st_size < 150_000


def test_clip_command_line_trains_and_saves(tiny, tmp_path):
    from transformers import CLIPModel

    from coin_ray.world.clip_standin import main

    main(["--images", str(tiny.source_train_images), "--annotations", str(tiny.source_train_json),
          "--out", str(tmp_path / "clip"), "--steps", "1", "--batch-size", "4"])
    assert CLIPModel.from_pretrained(tmp_path / "clip").config.vision_config.image_size == 48
