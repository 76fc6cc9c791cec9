"""ONNX export: parity with the eager detector on the tiny world, any batch size, no autograd."""

from __future__ import annotations

import json

import pytest
import torch

from coin_ray.data.images import load_image
from coin_ray.export import export_detector, load_exported, pair_detections
from coin_ray.train.data import image_tensor, resize_to
from coin_ray.models.build import load_detector, save_detector
from coin_ray.onnx_export import ONNX_BOX_ATOL, ONNX_PROB_ATOL
from tiny_detector import detector_with_wide_gap_threshold

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_export(tiny_world, tmp_path_factory):
    """A detector on the tiny world's CLIP stand-in, exported with its val images as the check."""
    from coin_ray import storage

    world = tiny_world
    tmp = tmp_path_factory.mktemp("onnx")
    val = storage.list_files(str(world.target_val_images), (".jpg", ".png"))
    save_detector(detector_with_wide_gap_threshold(str(world.clip_dir), list(world.categories), val),
                  str(tmp / "model.pt"))
    meta = export_detector(str(tmp / "model.pt"), str(tmp / "export"), example_uri=val[0],
                           batch_sizes=(1, 2), check_uris=val)
    size = tuple(meta["input_size"])
    images = [resize_to(image_tensor(load_image(u)), size)[0] for u in val]
    return tmp, meta, images


def test_export_json_records_the_onnx_check_on_val_images(tiny_export):
    tmp, meta, images = tiny_export
    onnx = meta["onnx"]
    assert (tmp / "export" / "model.onnx").stat().st_size > 0
    assert onnx["file"] == "model.onnx" and onnx["check"]["images"] == len(images)
    assert onnx["check"]["detections"] > 0
    assert onnx["check"]["max_box_diff"] <= ONNX_BOX_ATOL and onnx["check"]["max_prob_diff"] <= ONNX_PROB_ATOL
    assert json.loads((tmp / "export" / "export.json").read_text()) == meta


@pytest.mark.parametrize("batch", [1, 3, len])
def test_onnx_matches_eager_at_any_batch_size(tiny_export, batch):
    tmp, _, images = tiny_export
    model = load_detector(str(tmp / "model.pt"))
    onnx = load_exported(str(tmp / "export"), runtime="onnx")
    onnx.batch_size = batch(images) if callable(batch) else batch
    eager, found = model.detect(images), onnx.detect(images)
    counts = [len(e["boxes"]) for e in eager]
    assert counts == [len(f["boxes"]) for f in found] and len(set(counts)) > 1
    for e, f in zip(eager, found):
        # Per-class detections of one box can tie in score; pair them order-free.
        pairs, unpaired = pair_detections(e, f)
        assert unpaired == 0 and len(pairs) == len(e["boxes"])
        a, b = zip(*pairs) if pairs else ((), ())
        torch.testing.assert_close(f["boxes"][list(b)], e["boxes"][list(a)], atol=ONNX_BOX_ATOL, rtol=0)
        torch.testing.assert_close(f["probs"][list(b)], e["probs"][list(a)], atol=ONNX_PROB_ATOL, rtol=0)


def test_exported_outputs_carry_no_autograd_history(tiny_export):
    tmp, _, images = tiny_export
    module = load_exported(str(tmp / "export")).modules[2]
    outputs = module(images[:2])  # called directly, outside any no_grad block
    assert all(t.grad_fn is None and not t.requires_grad for t in outputs)
    found = load_exported(str(tmp / "export"), runtime="onnx").detect(images[:2])
    assert all(t.grad_fn is None for det in found for t in det.values())


def test_loading_onnx_from_an_export_without_it_says_why(tiny_export, tmp_path):
    tmp, _, _ = tiny_export
    meta = export_detector(str(tmp / "model.pt"), str(tmp_path / "ts"), batch_sizes=(1,), with_onnx=False)
    assert meta["onnx"] == {"skipped": "with_onnx=False"}
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        load_exported(str(tmp_path / "ts"), runtime="onnx")
