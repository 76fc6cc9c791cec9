"""The distillation step on a tiny real CLIP detector: phases, CKG isolation, EMA, resume."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from coin_ray.config import DistillConfig, ModelConfig
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.run import RunDir
from coin_ray.schema import SOURCE_CLIP_DET, Detections, records_to_table
from coin_ray.separate import SourceBoxes, as_source, concat, separate
from coin_ray.storage import write_parquet
from coin_ray.train.data import DetectionDataset, clip_det_records
from coin_ray.train.distill import (Batch, Phase, batches_ahead, build_state, detect_and_separate,
                                    distill_step, load_state_dict, phase_at, remember_teacher_detections,
                                    state_dict, teacher_detections, update_ckg)

CATEGORIES = ["car", "person", "bus"]
K = len(CATEGORIES)
MODEL = ModelConfig(min_size=64, max_size=96, detections_per_image=8, score_threshold=0.0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(write_clip(tmp_path_factory.mktemp("clip"), CATEGORIES + ["a", "photo", "of", "background"],
                          hidden_size=32, projection_dim=32, num_layers=2))


def _models(clip_dir):
    teacher = OpenVocabularyRCNN.from_clip(clip_dir, CATEGORIES, MODEL, seed=0)
    student = OpenVocabularyRCNN.from_clip(clip_dir, CATEGORIES, MODEL, seed=1)
    return teacher, student


def _batch(teacher) -> Batch:
    """Two images whose cloud detections agree with the teacher on some boxes, not others."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=gen), torch.rand(3, 72, 64, generator=gen)]
    cloud = []
    for det in teacher.detect(images):
        src = as_source(det)
        keep = src.select(torch.arange(min(4, len(src))))
        labels = keep.labels.clone()
        labels[1::2] = (labels[1::2] + 1) % K  # every other box disagrees with the teacher
        probs = torch.nn.functional.one_hot(labels, K + 1).float() * 0.9 + 0.1 / (K + 1)
        private = torch.tensor([[0.0, 0.0, 3.0, 3.0]])  # a box only the cloud sees
        cloud.append(SourceBoxes(torch.cat([keep.boxes, private]), torch.cat([labels, torch.tensor([0])]),
                                 torch.full((len(labels) + 1,), 0.9), torch.cat([probs, probs[:1]])))
    return Batch(images, cloud)


def _half_life(keep: float, steps: int) -> float:
    """The half-life (fraction of a ``steps``-step run) whose per-step keep rate is ``keep``."""
    return math.log(0.5) / math.log(keep) / steps


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=4, burn_up=0.5, min_score=0.0, min_clip_score=0.0, teacher_half_life=_half_life(0.9, 4),
                pi=0.0, lr=1e-3)
    return DistillConfig(**{**base, **kw})


def test_phase_is_decided_by_the_burn_up_step():
    cfg = _cfg(steps=10, burn_up=0.7)
    assert [phase_at(s, cfg).after_burn_up for s in (0, 6, 7, 9)] == [False, False, True, True]


def test_steps_in_both_phases_use_every_set_and_only_the_ckg_learns_from_l_ckg(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg()
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    frozen = copy.deepcopy(state.teacher.state_dict())

    m = distill_step(state, batch, Phase(after_burn_up=False), cfg)
    assert m["sep_consistent"] > 0 and m["sep_inconsistent"] > 0 and m["sep_private"] > 0
    assert m["l_inc"] == 0.0 and m["l_con"] > 0 and m["l_pri"] > 0 and m["l_align"] > 0
    assert all(torch.equal(v, frozen[k]) for k, v in state.teacher.state_dict().items())  # frozen

    # L_ckg alone: gradients on the CKG, none on the student.
    state.optimizer.zero_grad(set_to_none=True)
    seps_out = _student_pass(state, batch, cfg)
    update_ckg(state, *seps_out)
    assert all(p.grad is None for p in state.detector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in state.ckg.parameters())

    m = distill_step(state, batch, Phase(after_burn_up=True), cfg)
    assert m["l_inc"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in m.values())


def _student_pass(state, batch, cfg):
    seps = detect_and_separate(state, batch, Phase(after_burn_up=False), cfg)
    out = state.student(batch.images, seps, state.generator)
    inc = concat([s.inconsistent for s in seps])
    p_ckg = state.ckg(out.inconsistent.embeddings.detach(), inc.cloud_probs, inc.clip_probs)
    return out, concat([s.consistent for s in seps]), p_ckg


def test_after_burn_up_the_teacher_moves_toward_the_student_by_the_keep_rate(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(teacher_half_life=_half_life(0.75, 4))
    assert cfg.teacher_keep_rate == pytest.approx(0.75)
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    before = copy.deepcopy(state.teacher.state_dict())
    distill_step(state, batch, Phase(after_burn_up=True), cfg)
    after, student_now = state.teacher.state_dict(), state.detector.state_dict()
    for name, value in after.items():
        if value.is_floating_point():
            expected = 0.75 * before[name] + 0.25 * student_now[name]
            assert torch.allclose(value, expected, atol=1e-6), name


def test_switched_off_losses_are_zero_and_simple_fusions_skip_the_ckg(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(use_con=False, use_pri=False, use_align=False, fusion="avg")
    state = build_state(teacher, student, cfg)
    ckg_before = copy.deepcopy(state.ckg.state_dict())
    m = distill_step(state, _batch(state.teacher), Phase(after_burn_up=True), cfg)
    assert m["l_con"] == m["l_pri"] == m["l_align"] == 0.0 and m["l_inc"] > 0
    ckg_after = state.ckg.state_dict()
    params = {n for n, _ in state.ckg.named_parameters()}
    assert all(torch.equal(ckg_after[n], ckg_before[n]) for n in params)


def test_checkpoint_resume_continues_exactly(clip_dir):
    cfg = _cfg(steps=3, burn_up=0.34)
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    distill_step(state, batch, phase_at(0, cfg), cfg)
    saved = copy.deepcopy(state_dict(state))
    torch.manual_seed(1)
    straight = distill_step(state, batch, phase_at(state.step, cfg), cfg)

    torch.manual_seed(0)
    teacher2, student2 = _models(clip_dir)
    resumed = build_state(teacher2, student2, cfg, seed=5)
    load_state_dict(resumed, saved)
    assert resumed.step == 1
    torch.manual_seed(1)
    again = distill_step(resumed, batch, phase_at(resumed.step, cfg), cfg)
    assert again == pytest.approx(straight, rel=1e-5, abs=1e-6)


def _state_and_named_batch(clip_dir, **cfg_kw):
    """(cfg, state, batch) for the caching tests: ``_cfg(**cfg_kw)``, a fresh state and
    ``_batch`` with image ids "a" and "b" (the caches are keyed by them)."""
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(**cfg_kw)
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    batch.image_ids = ["a", "b"]
    return cfg, state, batch


def test_frozen_teacher_detections_are_reused_until_burn_up(clip_dir):
    cfg, state, batch = _state_and_named_batch(clip_dir)
    first = teacher_detections(state, batch, Phase(after_burn_up=False), cfg)
    assert set(state.teacher_cache) == {"a", "b"}
    direct = [as_source(d) for d in state.teacher.detect(batch.images)]
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(first, direct))
    again = teacher_detections(state, batch, Phase(after_burn_up=False), cfg)
    assert all(x is y for x, y in zip(first, again))
    teacher_detections(state, batch, Phase(after_burn_up=True), cfg)
    assert state.teacher_cache == {}


def test_a_frozen_teachers_separations_are_made_once_per_image_and_phase(clip_dir):
    cfg, state, batch = _state_and_named_batch(clip_dir, teacher_after_burn_up="frozen")
    before = detect_and_separate(state, batch, Phase(after_burn_up=False), cfg)
    after = detect_and_separate(state, batch, Phase(after_burn_up=True), cfg)
    assert set(state.separation_cache) == {("a", False), ("b", False), ("a", True), ("b", True)}

    def no_detecting(images):
        raise AssertionError("the frozen teacher detected again")

    state.teacher.detect = no_detecting
    assert all(x is y for x, y in zip(detect_and_separate(state, batch, Phase(after_burn_up=False), cfg), before))
    assert all(x is y for x, y in zip(detect_and_separate(state, batch, Phase(after_burn_up=True), cfg), after))
    # The cached separation is the one separating again gives.
    for sep, cloud, found in zip(after, batch.cloud, [state.teacher_cache[k] for k in ("a", "b")]):
        fresh = separate(cloud, found, iou_threshold=cfg.match_iou, fuse=True)
        assert torch.equal(sep.inconsistent.boxes, fresh.inconsistent.boxes)
        assert torch.equal(sep.consistent.boxes, fresh.consistent.boxes)
        assert torch.equal(sep.private.labels, fresh.private.labels)


def test_a_teacher_that_tracks_the_student_separates_every_batch_again(clip_dir):
    cfg, state, batch = _state_and_named_batch(clip_dir, teacher_after_burn_up="ema")
    detect_and_separate(state, batch, Phase(after_burn_up=False), cfg)
    assert state.separation_cache
    first = detect_and_separate(state, batch, Phase(after_burn_up=True), cfg)
    assert state.separation_cache == {}
    again = detect_and_separate(state, batch, Phase(after_burn_up=True), cfg)
    assert all(x is not y for x, y in zip(first, again))


def _stored(image_id: str, det: dict[str, torch.Tensor]) -> Detections:
    """A clip_det stage record of ``det`` (a ``detect`` output) for image ``image_id``."""
    return Detections(image_id, f"/data/{image_id}.jpg", 80, 64, det["boxes"].numpy(), det["labels"].numpy(),
                      det["scores"].numpy(), det["probs"].numpy(), SOURCE_CLIP_DET)


def test_stored_teacher_detections_are_used_instead_of_detecting_again(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(min_clip_score=0.2)
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    batch.image_ids = ["a", "b"]
    found = state.teacher.detect(batch.images)
    stored = [_stored("a", found[0]), _stored("b", found[1]), _stored("elsewhere", found[0]),
              Detections.empty("broken", "/data/broken.jpg", 0, 0, SOURCE_CLIP_DET, K, error="unreadable")]
    cloud = [Detections(i, f"/data/{i}.jpg", 80, 64, np.zeros((0, 4)), [], [], [], "cloud") for i in ("a", "b", "broken")]
    dataset = DetectionDataset(cloud, K)
    assert remember_teacher_detections(state, dataset, stored, cfg.min_clip_score) == 2
    assert set(state.teacher_cache) == {"a", "b"}

    def no_detecting(images):
        raise AssertionError("the teacher detected an image whose detections were stored")

    state.teacher.detect = no_detecting
    reused = teacher_detections(state, batch, Phase(after_burn_up=False), cfg)
    for got, det in zip(reused, found):
        want = as_source(det, cfg.min_clip_score)
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.probs, want.probs)
        assert (got.scores >= 0.2).all()


def test_clip_det_records_are_read_only_when_newer_than_the_clip_detector(tmp_path):
    run = RunDir(str(tmp_path))
    record = Detections("a", "/data/a.jpg", 8, 8, [[0, 0, 4, 4]], [1], [0.9], [[0.0, 0.9, 0.0, 0.1]],
                        SOURCE_CLIP_DET)
    write_parquet(records_to_table([record]), run.clip_detections)
    assert clip_det_records(run) == []  # neither stage recorded as done
    manifest = {"stages": {"disseminate": {"finished_at": "2026-12-01T10:00:00Z"},
                           "clip_det": {"finished_at": "2026-12-01T10:00:30Z"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert [r.image_id for r in clip_det_records(run)] == ["a"]
    manifest["stages"]["disseminate"]["finished_at"] = "2026-12-01T11:00:00Z"  # re-disseminated alone
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert clip_det_records(run) == []


def test_a_batch_with_no_boxes_at_all_still_steps(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(min_clip_score=1.0)  # nothing the teacher finds passes: every set is empty
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    batch.cloud = [c.select(torch.zeros(len(c), dtype=torch.bool)) for c in batch.cloud]
    m = distill_step(state, batch, Phase(after_burn_up=True), cfg)
    assert m["sep_consistent"] == m["sep_inconsistent"] == m["sep_private"] == 0
    assert m["l_pri"] == m["l_inc"] == 0.0 and m["l_con"] > 0  # background and RPN only
    assert all(torch.isfinite(p).all() for p in state.detector.parameters())


def test_steps_with_augmented_views_are_deterministic_under_a_seed(clip_dir):
    def two_steps(seed: int) -> list[dict[str, float]]:
        torch.manual_seed(0)
        teacher, student = _models(clip_dir)
        cfg = _cfg(flip=True, strong_augment=True)
        state = build_state(teacher, student, cfg, seed=seed)
        batch = _batch(state.teacher)
        out = []
        for step in range(2):
            state.generator = torch.Generator().manual_seed(seed * 100 + step)
            out.append(distill_step(state, batch, phase_at(step, cfg), cfg))
        return out

    assert two_steps(3) == two_steps(3)
    assert two_steps(3) != two_steps(4)


def test_fusion_ds_admits_the_disagreements_the_posterior_settles_and_targets_the_rest_with_it(clip_dir):
    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(fusion="ds", admit_posterior=0.9)
    state = build_state(teacher, student, cfg)
    batch = _batch(state.teacher)
    raw = detect_and_separate(state, batch, Phase(after_burn_up=True), cfg)
    disagreements = sum(len(s.inconsistent) for s in raw)
    assert disagreements > 0
    ckg_before = copy.deepcopy(state.ckg.state_dict())

    # Cloud probs sure of each box's label (as corrected records are where the posterior is
    # sure): every disagreement is settled and becomes consistent.
    for c in batch.cloud:
        c.probs = torch.nn.functional.one_hot(c.labels, K + 1).float() * 0.95 + 0.05 / (K + 1)
    m = distill_step(state, batch, Phase(after_burn_up=True), cfg)
    assert m["sep_inconsistent"] == 0 and state.stats.counts["admitted"] == disagreements
    assert m["sep_consistent"] == sum(len(s.consistent) for s in raw) + disagreements
    assert all(torch.equal(state.ckg.state_dict()[n], ckg_before[n]) for n, _ in state.ckg.named_parameters())

    # Unsure everywhere: nothing is admitted and L_inc learns the cloud's (posterior) probs.
    for c in batch.cloud:
        c.probs = torch.full_like(c.probs, 1 / (K + 1))
    m = distill_step(state, batch, Phase(after_burn_up=True), cfg)
    assert m["sep_inconsistent"] == disagreements and state.stats.counts["admitted"] == disagreements
    assert m["l_inc"] > 0


def test_fusion_ds_corrects_the_cloud_records_with_the_estimated_confusions(clip_dir):
    from coin_ray.train.distill import use_source_confusions

    torch.manual_seed(0)
    teacher, student = _models(clip_dir)
    cfg = _cfg(fusion="ds")
    state = build_state(teacher, student, cfg)
    box = np.array([[0, 0, 20, 20]], np.float32)

    def rec(i, label, source):
        probs = np.eye(K + 1, dtype=np.float32)[[label]]
        return Detections(f"i{i}", f"u{i}", 64, 64, box, np.array([label]), np.array([0.9], np.float32), probs,
                          source)

    # Class 1 is always called 0 by the cloud; CLIP's crop and the detector are right.
    truth = [0, 0, 0, 1, 1, 2, 2, 2]
    cloud = [rec(i, 0 if t == 1 else t, "cloud") for i, t in enumerate(truth)]
    clip = [rec(i, t, "clip") for i, t in enumerate(truth)]
    det = [rec(i, t, SOURCE_CLIP_DET) for i, t in enumerate(truth)]
    dataset = DetectionDataset(cloud, K)
    est = use_source_confusions(state, dataset, clip, det, cfg)
    assert est.items == len(truth) and state.confusions is est
    assert est.source("cloud")[1, 0] > 0.9 and est.source("clip_det")[1, 1] > 0.9
    assert [int(r.labels[0]) for r in dataset.records] == truth
    assert all(r.probs[0].argmax() == t for r, t in zip(dataset.records, truth))
    assert state.stats.counts["relabelled"] == 2 and state.stats.by_class["relabelled"] == {1: 2}


def test_fusion_ds_without_the_clip_detectors_detections_is_a_clear_error(clip_dir):
    from coin_ray.train.distill import prime_state

    teacher, student = _models(clip_dir)
    cfg = _cfg(fusion="ds")
    state = build_state(teacher, student, cfg)
    with pytest.raises(ValueError, match="fusion=ds needs the CLIP detector's detections.*run the clip_det stage"):
        prime_state(state, DetectionDataset([], K), cfg, [], [])
    prime_state(state, DetectionDataset([], K), _cfg(), [], [])  # the paper's CKG needs none


def test_batches_loaded_ahead_are_a_function_of_the_step_so_a_resumed_run_sees_the_same():
    def load(uri: str) -> np.ndarray:  # a distinct image per uri
        return np.random.default_rng(int(uri[-5])).integers(0, 256, (24, 32, 3), dtype=np.uint8)

    records = [Detections(f"img{i}", f"/data/{i}.jpg", 32, 24, np.array([[2.0, 2.0, 12.0, 10.0]]), [i % K], [0.9],
                          np.eye(K + 1)[[i % K]], "cloud") for i in range(5)]
    dataset = DetectionDataset(records, K, load=load)
    cfg = _cfg(steps=6, batch_size=2)
    straight = dict(batches_ahead(dataset, cfg, seed=3, first=1, last=6, ahead=True))
    resumed = dict(batches_ahead(dataset, cfg, seed=3, first=4, last=6, ahead=False))  # in turn: the same batches
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        a, b = straight[step], resumed[step]
        assert a.image_ids == b.image_ids
        assert [v.flipped for v in a.views] == [v.flipped for v in b.views]
        assert all(torch.equal(x.image, y.image) for x, y in zip(a.views, b.views))
    # The views are the student's: same size as the plain image, changed by the strong view.
    batch = straight[1]
    assert all(v.image.shape == image.shape for v, image in zip(batch.views, batch.images))
    assert any(not torch.equal(v.image, image) for v, image in zip(batch.views, batch.images))
