"""Export: TorchScript files that give the eager detector's detections, local and on s3://."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coin_ray import storage
from coin_ray.config import ModelConfig
from coin_ray.export import (BOX_ATOL, ExportMismatch, check_equivalence, check_images, export_detector,
                             image_tensor, load_exported)
from coin_ray.models.build import load_detector, save_detector
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN

CATEGORIES = ["car", "person", "bus"]


def tiny_detector(tmp_path, seed: int = 0, region_features: str = "pooled") -> OpenVocabularyRCNN:
    clip = write_clip(tmp_path / f"clip{seed}{region_features}", CATEGORIES + ["a", "photo", "of"], seed=seed)
    # A threshold that keeps a varying number of boxes per image (with the pooled head), so
    # counts are tested too.
    cfg = ModelConfig(min_size=64, max_size=96, score_threshold=0.34, detections_per_image=20,
                      region_features=region_features)
    return OpenVocabularyRCNN.from_clip(str(clip), CATEGORIES, cfg, seed=seed)


def example_image(path) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (72, 100, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    save_detector(tiny_detector(tmp), str(tmp / "model.pt"))
    meta = export_detector(str(tmp / "model.pt"), str(tmp / "export"),
                           example_uri=example_image(tmp / "ex.png"), batch_sizes=(1, 2))
    return tmp, meta


def test_export_writes_modules_and_a_passing_check(exported):
    tmp, meta = exported
    assert sorted(p.name for p in (tmp / "export").iterdir()) == ["detector_b1.pt", "detector_b2.pt", "export.json",
                                                                  "model.onnx"]
    on_disk = json.loads((tmp / "export" / "export.json").read_text())
    assert on_disk == meta and meta["format"] == "torchscript" and meta["categories"] == CATEGORIES
    assert meta["check"]["max_box_diff"] <= BOX_ATOL and meta["check"]["detections"] > 0


def test_exported_matches_eager_in_odd_batches(exported):
    tmp, meta = exported
    model = load_detector(str(tmp / "model.pt"))
    det = load_exported(str(tmp / "export"))
    assert det.input_size == (72, 100) == tuple(meta["input_size"])
    images = check_images(image_tensor(np.asarray(Image.open(tmp / "ex.png"))), 5, seed=7)
    eager, traced = model.detect(images), det.detect(images)  # batches of 2, 2, then 1
    counts = [len(e["boxes"]) for e in eager]
    assert counts == [len(t["boxes"]) for t in traced] and len(set(counts)) > 1
    for e, t in zip(eager, traced):
        assert torch.equal(t["labels"], e["labels"])
        torch.testing.assert_close(t["boxes"], e["boxes"], atol=BOX_ATOL, rtol=0)
        torch.testing.assert_close(t["probs"], e["probs"], atol=1e-4, rtol=0)
    assert det.detect([]) == []


def test_a_crop_head_detector_exports_and_matches_eager(tmp_path):
    save_detector(tiny_detector(tmp_path, region_features="crops"), str(tmp_path / "model.pt"))
    export_detector(str(tmp_path / "model.pt"), str(tmp_path / "export"),
                    example_uri=example_image(tmp_path / "ex.png"), batch_sizes=(1, 2), with_onnx=True)
    model, det = load_detector(str(tmp_path / "model.pt")), load_exported(str(tmp_path / "export"))
    assert model.roi_heads.uses_crops
    images = check_images(image_tensor(np.asarray(Image.open(tmp_path / "ex.png"))), 3, seed=7)
    for e, t in zip(model.detect(images), det.detect(images)):
        assert len(e["boxes"]) > 0 and torch.equal(t["labels"], e["labels"])
        torch.testing.assert_close(t["boxes"], e["boxes"], atol=BOX_ATOL, rtol=0)
        torch.testing.assert_close(t["probs"], e["probs"], atol=1e-4, rtol=0)


def test_other_sizes_are_resized_and_boxes_mapped_back(exported):
    tmp, _ = exported
    model = load_detector(str(tmp / "model.pt"))
    det = load_exported(str(tmp / "export"))
    image = torch.rand(3, 144, 150, generator=torch.Generator().manual_seed(1))
    small = torch.nn.functional.interpolate(image[None], size=(72, 100), mode="bilinear",
                                            align_corners=False)[0]
    expected, got = model.detect([small])[0], det.detect([image])[0]
    assert len(got["boxes"]) == len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"] * torch.tensor([1.5, 2.0, 1.5, 2.0]),
                               atol=2 * BOX_ATOL, rtol=0)
    assert float(got["boxes"][:, 2].max()) <= 150 and float(got["boxes"][:, 3].max()) <= 144


def test_exported_file_needs_no_text_encoder(exported):
    tmp, _ = exported
    module = load_exported(str(tmp / "export")).modules[1]
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    assert "classifier" in names
    assert not any("prompt_learner" in n or "text_model" in n for n in names)


def test_check_catches_a_different_model(exported, tmp_path):
    tmp, _ = exported
    other = tiny_detector(tmp_path, seed=1)
    images = check_images(torch.full((3, 72, 100), 0.5), 2)
    with pytest.raises(ExportMismatch):
        check_equivalence(other, load_exported(str(tmp / "export")), images)


@pytest.mark.timeout(120)
def test_export_to_s3(exported, s3_bucket):
    tmp, _ = exported
    out = f"s3://{s3_bucket}/run/export"
    export_detector(str(tmp / "model.pt"), out, batch_sizes=(1,))
    assert storage.list_files(out) == [f"{out}/detector_b1.pt", f"{out}/export.json", f"{out}/model.onnx"]
    for runtime in ("torchscript", "onnx"):
        found = load_exported(out, runtime=runtime).detect([torch.rand(3, 50, 60)])[0]
        assert found["probs"].shape[1] == len(CATEGORIES) + 1


# ---------------------------------------------------------------------------------------
# Batch inference with the export on Ray Data -> COCO results JSON.


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three readable images (one in a sub-folder), a corrupt one and a non-image file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for rel in ("a.png", "b.png", "sub/c.png"):
        (folder / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 100, 3), dtype=np.uint8)).save(folder / rel)
    (folder / "bad.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("skipped")
    return folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runtime", ["torchscript", "onnx"])
def test_predict_writes_coco_results_equal_to_eager(exported, local_ray, image_folder, tmp_path, runtime):
    from coin_ray.ray.predict import predict

    tmp, _ = exported
    out = tmp_path / "out" / "results.json"
    summary = predict(str(tmp / "export"), str(image_folder), str(out), batch_size=2, runtime=runtime)
    assert (summary.images, summary.errors) == (4, 1)
    assert [Path(u).name for u, _ in summary.failures] == ["bad.png"] and summary.failures[0][1]
    assert summary.index == str(tmp_path / "out" / "results.images.json")
    results = json.loads(out.read_text())
    index = json.loads((tmp_path / "out" / "results.images.json").read_text())
    files = {img["id"]: img["file_name"] for img in index["images"]}
    assert sorted(Path(f).name for f in files.values()) == ["a.png", "b.png", "c.png"]
    assert [c["name"] for c in index["categories"]] == CATEGORIES
    model = load_detector(str(tmp / "model.pt"))
    for image_id, uri in files.items():
        eager = model.detect([image_tensor(np.asarray(Image.open(uri)))])[0]
        mine = [r for r in results if r["image_id"] == image_id]
        assert len(mine) == len(eager["boxes"]) and summary.detections == len(results)
        x1, y1, x2, y2 = eager["boxes"].T
        expected = torch.stack([x1, y1, x2 - x1, y2 - y1], dim=1)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in mine]), expected, atol=0.02, rtol=0)
        assert [r["category_id"] for r in mine] == (eager["labels"] + 1).tolist()


@pytest.mark.timeout(300)
def test_predict_uses_the_annotation_files_ids(exported, local_ray, image_folder, tmp_path):
    from coin_ray.ray.predict import predict

    tmp, _ = exported
    gt = {"images": [{"id": 101, "file_name": "a.png", "width": 100, "height": 72},
                     {"id": 205, "file_name": "sub/c.png", "width": 100, "height": 72}],
          "categories": [{"id": 7, "name": "Person"}, {"id": 3, "name": "car"}], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "results.json"
    predict(str(tmp / "export"), str(image_folder), str(out), annotations_uri=str(tmp_path / "gt.json"))
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} <= {101, 205}
    assert {r["category_id"] for r in results} <= {7, 3}  # "bus" is not in the file: left out
    assert not (tmp_path / "results.images.json").exists()


def test_pairing_is_order_free_and_forgives_only_ties_at_the_cap():
    from coin_ray.export import pair_detections

    def dets(boxes, labels, scores):
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                "scores": torch.tensor(scores)}

    a = dets([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]], [1, 1, 2], [0.5, 0.5, 0.3])
    b = dets([[20, 20, 30, 30], [0, 0, 10, 10], [5, 5, 9, 9]], [1, 1, 2], [0.5, 0.5, 0.3])
    assert pair_detections(a, b) == ([(0, 1), (1, 0), (2, 2)], 0)
    # The last kept detection differs, but its score ties the list's lowest: forgiven.
    c = dets([[20, 20, 30, 30], [0, 0, 10, 10], [40, 40, 60, 60]], [1, 1, 3], [0.5, 0.5, 0.3])
    assert pair_detections(a, c)[1] == 0
    # A confident detection without a counterpart of its label is not.
    d = dets([[20, 20, 30, 30], [0, 0, 10, 10], [5, 5, 9, 9]], [1, 3, 2], [0.5, 0.5, 0.3])
    assert pair_detections(a, d)[1] == 2


def test_a_check_with_no_detections_says_it_compared_nothing(tmp_path):
    """Issue 27, 4.3: export.json recorded 0 detections and the check passed on nothing."""
    model = tiny_detector(tmp_path)
    model.model_cfg.score_threshold = 1.0  # no probability exceeds it: nothing is detected
    images = check_images(torch.full((3, 72, 100), 0.5), 2)
    check = check_equivalence(model, model, images)
    assert check["detections"] == 0 and check["status"].startswith("nothing compared")
    model.model_cfg.score_threshold = 0.0
    assert check_equivalence(model, model, images)["status"] == "passed"
