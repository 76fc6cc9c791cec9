"""The CLIP detector (OpenVocabularyRCNN), prompt learner and prototypes on a tiny random CLIP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou
from transformers import AutoTokenizer, CLIPModel

from coin_ray.config import ModelConfig
from coin_ray.losses import l_align
from coin_ray.models.build import load_detector, model_config_from_dict, save_detector
from coin_ray.models.clip_backbone import centre_squares, crop_regions
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.models.prompt_learner import PromptLearner, encode_texts, prompt_texts
from coin_ray.models.prototypes import Prototypes
from coin_ray.models.roi_heads import RegionOutputs, RegionTargets, fastrcnn_soft_loss, postprocess_detections

CATEGORIES = ["car", "traffic light", "person"]
WORDS = ["car", "traffic", "light", "person", "a", "photo", "of", "the", "foggy", "street", "scene"]
# The tests above the crop section exercise the pooled (C4) region head.
SMALL = ModelConfig(min_size=96, max_size=128, num_extra_context=2, backbone_lr_mult=1.0,
                    region_features="pooled")


# One intra-op thread (tests/conftest.py): learned numbers then match across machines.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(write_clip(tmp_path_factory.mktemp("clip"), WORDS))


@pytest.fixture
def model(clip_dir):
    torch.manual_seed(0)
    return OpenVocabularyRCNN.from_clip(clip_dir, CATEGORIES, SMALL, "foggy street scene")


def _images(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 96, 128, generator=g) for _ in range(n)]


def _targets(n: int = 2) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [60.0, 30.0, 110.0, 90.0]])
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.8, 0.1, 0.0]])
    return [{"boxes": boxes.clone(), "labels": torch.tensor([0, 1]), "probs": probs.clone()}
            for _ in range(n)]


def test_training_forward_gives_the_four_losses_and_region_shapes(model):
    model.train()
    out = model(_images(), _targets())
    assert set(out.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    r = len(out.regions.labels)
    dim = model.roi_heads.box_head.proj.out_features
    assert out.outputs.embeddings.shape == (r, dim)
    assert out.outputs.logits.shape == (r, len(CATEGORIES) + 1)
    assert out.outputs.box_deltas.shape == (r, 4)
    assert torch.allclose(out.outputs.embeddings.norm(dim=1), torch.ones(r), atol=1e-5)
    assert out.regions.foreground.any(), "the target boxes themselves are always proposals"


def test_eval_detections_are_in_original_image_pixels(model):
    model.eval()
    images = [torch.rand(3, 200, 150), torch.rand(3, 96, 128)]
    dets = model(images)
    for det, img in zip(dets, images):
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
        assert det["scores"].shape == (n,) and det["probs"].shape == (n, len(CATEGORIES) + 1)
        assert bool((det["boxes"][:, 2] <= img.shape[2] + 1e-3).all())
        assert bool((det["boxes"][:, 3] <= img.shape[1] + 1e-3).all())
        assert bool((det["labels"] < len(CATEGORIES)).all())
        assert torch.allclose(det["probs"].sum(dim=1), torch.ones(n), atol=1e-5)


def test_the_api_pieces_compose_like_forward(model):
    model.eval()
    images = _images()
    features, image_list, _ = model.encode(images)
    assert features.shape[:2] == (2, model.trunk.out_channels)
    assert features.shape[2] * model.trunk.patch_size == image_list.tensors.shape[2]
    proposals, losses = model.propose(features, image_list)
    assert losses == {} and all(p.shape[1] == 4 for p in proposals)
    out = model.region_outputs(features, proposals, image_list.image_sizes)
    assert isinstance(out, RegionOutputs) and len(out.logits) == sum(len(p) for p in proposals)
    t = model.text_embeddings()
    assert t.shape == (len(CATEGORIES) + 1, model.roi_heads.box_head.proj.out_features)


def test_inputs_are_not_modified_and_training_mode_survives_detect(model):
    targets = _targets()
    before = [{k: v.clone() for k, v in t.items()} for t in targets]
    model.train()
    model(_images(), targets)
    model.detect(_images())
    assert model.training
    for t, b in zip(targets, before):
        assert all(torch.equal(t[k], b[k]) for k in b)


def test_image_without_boxes_gives_zero_box_loss(model):
    model.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "probs": torch.zeros(0, len(CATEGORIES) + 1)}]
    out = model(_images(1), empty)
    assert out.losses["loss_box_reg"].item() == 0.0
    assert out.losses["loss_rpn_box_reg"].item() == 0.0
    assert not out.regions.foreground.any()


def test_prompt_learner_with_plain_context_equals_clip_text_features(clip_dir):
    clip = CLIPModel.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    learner = PromptLearner(clip, tokenizer, CATEGORIES, context_init="a photo of a", num_extra_context=0)
    texts = [f"a photo of a {name}." for name in CATEGORIES]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)
        ours = learner()
    assert ours.shape == (len(CATEGORIES) + 1, reference.shape[1])
    assert torch.allclose(ours[:-1], reference, atol=1e-5)  # includes the two-word "traffic light"
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)


def test_gradients_reach_the_context_and_not_the_text_encoder(model):
    t = model.text_embeddings()
    (t[:, 0].sum() + t[1, 1:].sum()).backward()
    learner = model.prompt_learner
    assert learner.context.grad is not None and learner.context.grad.abs().sum() > 0
    assert learner.background.grad is not None
    frozen = list(learner.text_model.parameters()) + list(learner.text_projection.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert len(learner.context) == 4 + SMALL.num_extra_context  # "a photo of a" + M


def test_prototypes_start_from_the_prompt_ensemble(clip_dir, model):
    clip = CLIPModel.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    templates = model.meta["templates"]
    expected = F.normalize(encode_texts(clip, tokenizer, prompt_texts("traffic light", templates,
                                                                      "foggy street scene")).mean(0), dim=0)
    assert torch.allclose(model.prototypes.vectors[1], expected, atol=1e-5)
    assert model.prototypes.vectors.shape == (len(CATEGORIES) + 1, expected.shape[0])


def test_prototypes_move_toward_their_class_features_only():
    init = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    protos = Prototypes(init)
    feats = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = torch.tensor([2, 2, 0])
    protos.update(feats, labels, eta=0.9)
    assert torch.allclose(protos.vectors[2], 0.9 * init[2] + 0.1 * feats[:2].mean(0))
    assert torch.allclose(protos.vectors[0], 0.9 * init[0] + 0.1 * feats[2])
    assert torch.equal(protos.vectors[1], init[1]) and torch.equal(protos.vectors[3], init[3])
    target = feats[:2].mean(0)
    before = (init[2] - target).norm()
    for _ in range(20):
        protos.update(feats[:2], torch.tensor([2, 2]), eta=0.9)
    assert (protos.vectors[2] - target).norm() < 0.2 * before
    assert torch.equal(protos.vectors[1], init[1])


def test_prototypes_are_saved_in_the_state_dict(model):
    assert torch.equal(model.state_dict()["prototypes.vectors"], model.prototypes.vectors)


def test_l_align_is_the_mean_l1_between_text_embeddings_and_prototypes(model):
    t = model.text_embeddings().detach()
    e_p = model.prototypes.vectors
    direct = sum(abs(float(a) - float(b)) for a, b in zip(t.flatten(), e_p.flatten())) / t.numel()
    assert l_align(t, e_p).item() == pytest.approx(direct, rel=1e-5)


def test_soft_roi_loss_matches_a_direct_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 3.0]])
    probs = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    deltas = torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    targets = RegionTargets([torch.zeros(3, 4)], torch.tensor([0, 1, 2]), probs, torch.zeros(3, 4))
    losses = fastrcnn_soft_loss(RegionOutputs(F.normalize(logits, dim=1), logits, deltas), targets,
                                background_weight=0.5)
    ce = -(probs * F.log_softmax(logits, dim=1)).sum(dim=1)
    assert losses["loss_classifier"].item() == pytest.approx(((ce[0] + ce[1] + 0.5 * ce[2]) / 2.5).item())
    # smooth-L1 (beta 1/9) on foreground rows only, divided by all 3 rows: 0.1 < beta, so 0.5 x^2 / beta
    assert losses["loss_box_reg"].item() == pytest.approx(0.5 * 0.1 ** 2 * 9 / 3, rel=1e-5)


def test_param_groups_scale_the_backbone_and_skip_frozen_layers(clip_dir):
    cfg = dataclasses.replace(SMALL, frozen_vision_layers=1, backbone_lr_mult=0.1, head_layers=1)
    model = OpenVocabularyRCNN.from_clip(clip_dir, CATEGORIES, cfg)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["heads"]["lr"] == 1e-3
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert id(model.roi_heads.box_head.proj.weight) in in_groups
    assert id(model.prompt_learner.context) in in_groups
    assert not any(id(p) in in_groups for p in model.trunk.layers[0].parameters())
    assert not any(id(p) in in_groups for p in model.prompt_learner.text_model.parameters())
    head_layer = model.roi_heads.box_head.layers[0]
    assert all(id(p) in {id(q) for q in groups["backbone"]["params"]} for p in head_layer.parameters())


def test_save_and_load_give_the_same_detections(model, tmp_path):
    model.eval()
    with torch.no_grad():
        model.prototypes.vectors.add_(0.01)
    save_detector(model, str(tmp_path / "model.pt"))
    again = load_detector(tmp_path / "model.pt").eval()
    assert torch.equal(again.prototypes.vectors, model.prototypes.vectors)
    a, b = model.detect(_images(1)), again.detect(_images(1))
    assert torch.equal(a[0]["boxes"], b[0]["boxes"]) and torch.equal(a[0]["probs"], b[0]["probs"])


def _shapes_image() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 96x128 image with three flat-coloured rectangles on a textured background."""
    g = torch.Generator().manual_seed(3)
    image = 0.4 + 0.1 * torch.rand(3, 96, 128, generator=g)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [56.0, 16.0, 120.0, 48.0], [24.0, 56.0, 72.0, 92.0]])
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    for (x0, y0, x1, y1), colour in zip(boxes.int().tolist(), colours):
        image[:, y0:y1, x0:x1] = colour[:, None, None]
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1, 2])}


def test_overfitting_one_image_finds_its_boxes(model):
    torch.manual_seed(0)
    image, target = _shapes_image()
    optimizer = torch.optim.AdamW(model.param_groups(3e-3), weight_decay=0.0)
    model.train()
    history = []
    for _ in range(120):
        out = model([image], [target])
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), out.losses["loss_classifier"].item()))
    first, last = torch.tensor(history[:10]).mean(0), torch.tensor(history[-10:]).mean(0)
    # Measured on one thread (Intel and AMD alike): total 0.59x, classifier 0.55x of the
    # first ten steps. The classifier loss levels off there (background proposals whose
    # IoU sits near the 0.5 boundary stay ambiguous), so the bound keeps a 30 % margin
    # above that floor; the detections below check what the user relies on.
    assert last[0] < 0.8 * first[0] and last[1] < 0.8 * first[1], (first, last)
    det = model.detect([image])[0]
    ious = box_iou(target["boxes"], det["boxes"])
    for box, label, iou in zip(target["boxes"], target["labels"], ious):
        assert bool((iou > 0.5).any()), f"box {box.tolist()} not found"
        best = det["scores"].masked_fill(iou <= 0.5, -1.0).argmax()
        assert int(det["labels"][best]) == int(label), f"box {box.tolist()} has the wrong label"


# ---- model.region_features: crops (regions embedded from their own pixels) ----

CROPS = dataclasses.replace(SMALL, region_features="crops")


@pytest.fixture
def crop_model(clip_dir):
    torch.manual_seed(0)
    return OpenVocabularyRCNN.from_clip(clip_dir, CATEGORIES, CROPS, "foggy street scene")


def test_centre_squares_keep_the_processors_centre_crop():
    boxes = torch.tensor([[10.0, 20.0, 18.0, 50.0], [0.0, 0.0, 40.0, 10.0], [5.0, 5.0, 9.0, 9.0]])
    assert torch.equal(centre_squares(boxes), torch.tensor([[10.0, 31.0, 18.0, 39.0],
                                                            [15.0, 0.0, 25.0, 10.0],
                                                            [5.0, 5.0, 9.0, 9.0]]))


def test_crop_regions_sample_the_centre_square_of_each_box():
    # Each pixel's value is its column index: a crop's columns then tell which x it read.
    image = torch.arange(64.0).repeat(1, 3, 32, 1)  # (1,3,32,64)
    crops = crop_regions(image, [torch.tensor([[8.0, 0.0, 16.0, 32.0], [40.0, 4.0, 64.0, 12.0]])], 4)
    assert crops.shape == (2, 3, 4, 4)
    # Tall box: the full width 8..16 (pixel centres 9..15 sampled); wide box: x 48..56.
    assert torch.allclose(crops[0, 0, 0], torch.tensor([8.5, 10.5, 12.5, 14.5]) + 0.0, atol=1e-4)
    assert torch.allclose(crops[1, 0, 0], torch.tensor([48.5, 50.5, 52.5, 54.5]), atol=1e-4)


def test_a_crop_region_starts_as_clips_embedding_of_its_crop(clip_dir, crop_model):
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    head = crop_model.roi_heads.box_head
    size = head.crop_size
    crops = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    _, embeddings = head(torch.zeros(3, 16, head.out_channels), crops)
    expected = clip.get_image_features(pixel_values=crops)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(embeddings, expected, atol=1e-5)


def test_the_crop_head_trains_detects_and_shares_clips_tower(crop_model, tmp_path):
    crop_model.train()
    out = crop_model(_images(), _targets())
    sum(out.losses.values()).backward()
    head = crop_model.roi_heads.box_head
    assert head.layers[0] is crop_model.trunk.layers[0], "one CLIP tower, not a copy"
    assert head.layers[-1].mlp.fc1.weight.grad.abs().sum() > 0, "the classifier's gradient reaches CLIP"
    assert crop_model.roi_heads.box_predictor.weight.grad.abs().sum() > 0
    groups = {g["name"]: {id(p) for p in g["params"]} for g in crop_model.param_groups(1e-3)}
    assert all(id(p) in groups["backbone"] for p in head.layers[-1].parameters())
    assert id(head.proj.weight) in groups["heads"]
    save_detector(crop_model, str(tmp_path / "model.pt"))
    again = load_detector(tmp_path / "model.pt").eval()
    assert again.roi_heads.uses_crops and again.roi_heads.box_head.layers[0] is again.trunk.layers[0]
    a, b = crop_model.detect(_images(1)), again.detect(_images(1))
    assert torch.equal(a[0]["boxes"], b[0]["boxes"]) and torch.equal(a[0]["probs"], b[0]["probs"])


def test_a_model_saved_before_region_features_existed_loads_as_pooled():
    saved = dataclasses.asdict(SMALL)
    del saved["region_features"]
    assert model_config_from_dict(saved).region_features == "pooled"
    assert model_config_from_dict(dataclasses.asdict(CROPS)).region_features == "crops"


def test_postprocess_reports_every_class_above_the_threshold_as_its_own_detection():
    """detectron2 / torchvision inference: a box 0.6 person / 0.3 rider is both a person and a rider."""
    from torchvision.models.detection import _utils as det_utils

    probs = torch.tensor([[0.10, 0.60, 0.30, 0.00],   # car, person, rider(=2), bg: two classes pass 0.2
                          [0.05, 0.05, 0.10, 0.80],   # mostly background: nothing passes
                          [0.70, 0.10, 0.00, 0.20]])  # car only
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 30.0, 30.0], [60.0, 5.0, 90.0, 40.0]])]
    outputs = RegionOutputs(torch.zeros(3, 4), probs.log(), torch.zeros(3, 4))
    found = postprocess_detections(outputs, proposals, [(100, 100)], det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                   score_threshold=0.2, detections_per_image=10)[0]
    assert found["labels"].tolist() == [0, 1, 2]  # by decreasing score: car 0.7, person 0.6, rider 0.3
    assert torch.allclose(found["scores"], torch.tensor([0.7, 0.6, 0.3]), atol=1e-6)
    assert torch.equal(found["boxes"][1], found["boxes"][2]) and torch.equal(found["boxes"][1], proposals[0][0])
    assert torch.allclose(found["probs"][2], probs[0], atol=1e-6)  # each detection keeps its box's K+1 row
    capped = postprocess_detections(outputs, proposals, [(100, 100)], det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                    score_threshold=0.2, detections_per_image=2)[0]
    assert capped["labels"].tolist() == [0, 1]
