"""CLIP box scoring with a tiny random CLIP written by clip_factory.write_clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_world import CATEGORIES, draw
from coin_ray.cloud.clip_score import (ClipBoxScorer, background_texts, category_texts, clip_baseline,
                                       clip_foreground, crop_boxes)
from coin_ray.models.clip_factory import write_clip
from coin_ray.schema import SOURCE_CLIP, SOURCE_CLOUD, Detections

TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(write_clip(tmp_path_factory.mktemp("clip"), [*CATEGORIES, "photo", "foggy", "street", "background", "nothing", "particular"],
                          image_size=32, hidden_size=32, projection_dim=32, num_layers=1))


def test_category_texts_cross_templates_names_and_style():
    texts = category_texts(["person"], TEMPLATES, "foggy street", {"person": ["person", "pedestrian"]})
    assert texts == [["a photo of a person in a foggy street.", "a photo of a pedestrian in a foggy street.",
                      "a blurry photo of a person in a foggy street.",
                      "a blurry photo of a pedestrian in a foggy street."]]


def test_crop_boxes_clip_to_image_and_never_empty():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    crops = crop_boxes(image, np.asarray([[2.5, 1.2, 7.1, 4.0], [-5, -5, 30, 30], [19.5, 9.5, 19.6, 9.6]]))
    assert [c.shape[:2] for c in crops] == [(3, 6), (10, 20), (1, 1)]
    np.testing.assert_array_equal(crops[0], image[1:4, 2:8])


def test_clip_scores_match_direct_formula(clip_dir):
    scorer = ClipBoxScorer(clip_dir, CATEGORIES, templates=TEMPLATES, style="foggy street scene")
    image, truth = draw(4, size=(40, 60))
    boxes = np.asarray([truth["car"], truth["bus"], [0, 0, 60, 40]], np.float32)
    cloud = Detections.from_class_only("i", "i.png", 60, 40, boxes, np.asarray([0, 1, 0]),
                                       np.asarray([0.9, 0.8, 0.3]), 2, SOURCE_CLOUD)
    rec = scorer.score(cloud, image)
    assert rec.source == SOURCE_CLIP and rec.probs.shape == (3, 3)
    np.testing.assert_array_equal(rec.boxes, cloud.boxes)
    assert (rec.probs[:, 2] > 0).all()  # column K is the background prompt, a real class now
    np.testing.assert_allclose(rec.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(rec.labels, rec.probs[:, :2].argmax(1))
    np.testing.assert_array_equal(rec.scores, rec.probs[:, :2].max(1))
    # Reference: the same numbers from CLIPModel.forward on one crop and the mean text embedding.
    from transformers import AutoProcessor, CLIPModel
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    texts = category_texts(CATEGORIES, TEMPLATES, "foggy street scene") + [background_texts("foggy street scene")]
    with torch.no_grad():
        crop = crop_boxes(image, boxes[:1])
        # The crop is 4 px high: its layout must be stated (see test_flat_crops_are_read_channels_last).
        img = model(**proc(text=texts[0], images=crop, return_tensors="pt", padding=True,
                           input_data_format="channels_last"))
        t = [torch.nn.functional.normalize(model(**proc(text=ts, images=crop, return_tensors="pt", padding=True,
                                                         input_data_format="channels_last")).text_embeds,
                                           dim=-1).mean(0)
             for ts in texts]
        t = torch.nn.functional.normalize(torch.stack(t), dim=-1)
        ref = (model.logit_scale.exp() * img.image_embeds @ t.T).softmax(-1)
    np.testing.assert_allclose(rec.probs[0], ref[0].numpy(), atol=1e-4)


def test_background_texts_carry_the_style_like_the_categories():
    assert background_texts("foggy street") == [
        "a photo of background in a foggy street.", "a photo of nothing in particular in a foggy street.",
        "a blurry photo of background in a foggy street.", "a blurry photo of nothing in particular in a foggy street."]
    assert background_texts("")[:2] == ["a photo of background.", "a photo of nothing in particular."]


def test_clip_baseline_drops_boxes_clip_calls_background():
    probs = np.array([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6], [0.4, 0.2, 0.4], [0.0, 1.0, 0.0]], np.float32)
    assert clip_foreground(probs).tolist() == [True, False, True, True]  # a tie goes to the foreground
    rec = Detections("i", "i.png", 9, 9, np.arange(16, dtype=np.float32).reshape(4, 4), [0, 1, 0, 1],
                     [0.5, 0.3, 0.4, 1.0], probs, SOURCE_CLIP)
    row = clip_baseline(rec)
    assert row.labels.tolist() == [0, 0, 1] and row.scores.tolist() == pytest.approx([0.5, 0.4, 1.0])
    np.testing.assert_array_equal(row.boxes, rec.boxes[[0, 2, 3]])
    np.testing.assert_array_equal(row.probs, probs[[0, 2, 3]])
    # A record collected before the background class (column K all 0) keeps every box.
    assert clip_foreground(np.array([[0.7, 0.3, 0.0], [0.0, 0.0, 0.0]])).tolist() == [True, True]


def test_clip_keeps_errors_and_empty_records(clip_dir):
    scorer = ClipBoxScorer(clip_dir, CATEGORIES, templates=TEMPLATES)
    err = Detections.empty("e", "e.png", 4, 4, SOURCE_CLOUD, 2, error="http 500: gave up")
    out = scorer.score(err, None)
    assert out.error == err.error and out.source == SOURCE_CLIP and len(out) == 0


@pytest.mark.parametrize("height", [1, 3, 4])
def test_flat_crops_are_read_channels_last(clip_dir, height):
    # A crop 1, 3 or 4 px high is (h, w, 3): transformers would guess h channels unless told.
    from transformers import AutoProcessor

    from coin_ray.cloud.clip_score import _features, crop_pixels

    proc = AutoProcessor.from_pretrained(clip_dir)
    crop = np.random.default_rng(height).integers(0, 256, (height, 26, 3), dtype=np.uint8)
    # (3, h, 26) is unambiguous (26 is no channel count): the reference layout.
    reference = proc(images=[np.ascontiguousarray(crop.transpose(2, 0, 1))], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(crop_pixels(proc, [crop]), reference)
    scorer = ClipBoxScorer(clip_dir, CATEGORIES, templates=TEMPLATES)
    image = np.zeros((10, 40, 3), np.uint8)
    image[2:2 + height, 5:31] = crop
    probs = scorer.probs(image, np.asarray([[5, 2, 31, 2 + height]], np.float32))
    with torch.no_grad():
        emb = torch.nn.functional.normalize(_features(scorer.model.get_image_features(pixel_values=reference)),
                                            dim=-1)
        ref = (scorer.model.logit_scale.exp() * emb @ scorer.text.T).softmax(-1)
    np.testing.assert_allclose(probs[0], ref[0].numpy(), atol=1e-5)
