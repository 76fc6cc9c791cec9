"""The COIN losses against direct computations, plus empty inputs and the EMA teacher."""

import math

import pytest
import torch
from torch import nn

from coin_ray.losses import (gradient_direction_loss, kl_to_target, l_align, l_ckg, l_con, l_inc, l_pri,
                             squared_error)
from coin_ray.models.roi_heads import RegionOutputs, RegionTargets
from coin_ray.models.teacher import ema_update, make_teacher

K = 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _probs(rows, seed):
    return torch.softmax(torch.randn(rows, K + 1, generator=_gen(seed)) * 2, dim=-1)


def _kl_by_hand(logits, target):
    total = 0.0
    for row_l, row_t in zip(logits.tolist(), target.tolist()):
        z = math.log(sum(math.exp(v) for v in row_l))
        total += sum(t * (math.log(t) - (v - z)) for v, t in zip(row_l, row_t) if t > 0)
    return total / len(logits) / (K + 1)  # the reference's KLDivLoss(reduction='mean')


def test_l_align_is_the_mean_absolute_difference_and_only_teaches_the_text_side():
    t = torch.tensor([[1.0, -2.0], [0.5, 0.0]], requires_grad=True)
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = l_align(t, e)
    assert loss.item() == pytest.approx((1 + 2 + 0.5 + 1) / 4)
    loss.backward()
    assert e.grad is None and t.grad is not None


def test_l_pri_is_the_kl_to_the_source_probs():
    logits = torch.randn(5, K + 1, generator=_gen(1))
    target = _probs(5, 2)
    assert l_pri(logits, target).item() == pytest.approx(_kl_by_hand(logits, target), rel=1e-5)
    ref = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, reduction="sum") / logits.numel()
    assert l_pri(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_terms_are_scaled_as_kldivloss_mean_over_rows_and_classes():
    # Two rows, K+1 = 4: one-hot targets give -log p[label], summed then divided by 2 * 4.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    expected = (math.log(4.0) + math.log(6.0 / 3.0)) / 8
    assert kl_to_target(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert l_pri(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert l_inc(logits, target, pi=0.7).item() == pytest.approx(expected, rel=1e-6)


def test_kl_to_target_with_zero_entries_and_zero_when_equal():
    target = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    logits = torch.tensor([[0.3, 1.2, -0.5, 0.0]])
    assert kl_to_target(logits, target).item() == pytest.approx(-torch.log_softmax(logits, -1)[0, 1].item() / (K + 1))
    probs = _probs(4, 3)
    assert kl_to_target(torch.log(probs), probs).item() == pytest.approx(0.0, abs=1e-6)


def test_l_inc_keeps_only_confident_fused_boxes():
    logits = torch.randn(3, K + 1, generator=_gen(4))
    fused = torch.tensor([[0.8, 0.1, 0.05, 0.05], [0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.7, 0.2]])
    expected = _kl_by_hand(logits[[0, 2]], fused[[0, 2]])
    assert l_inc(logits, fused, pi=0.7).item() == pytest.approx(expected, rel=1e-5)
    assert l_inc(logits, fused, pi=0.9).item() == 0.0


def test_l_con_against_cross_entropy_and_smooth_l1_by_hand():
    logits = torch.randn(4, K + 1, generator=_gen(5))
    targets = torch.tensor([0, 2, K, K])
    deltas = torch.randn(4, 4, generator=_gen(6))
    box_targets = torch.randn(4, 4, generator=_gen(7))
    bg_w = 0.5
    log_p = torch.log_softmax(logits, -1)
    weights = [1.0, 1.0, bg_w, bg_w]
    cls = -sum(w * log_p[i, t].item() for i, (t, w) in enumerate(zip(targets.tolist(), weights))) / sum(weights)

    def sl1(x, beta=1 / 9):
        return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta

    box = sum(sl1(v) for v in (deltas[:2] - box_targets[:2]).flatten().tolist()) / 4
    outputs = RegionOutputs(torch.zeros(4, 2), logits, deltas)
    targets = RegionTargets([torch.zeros(4, 4)], targets, torch.nn.functional.one_hot(targets, K + 1).float(),
                            box_targets)
    rpn = {"loss_objectness": torch.tensor(0.25), "loss_rpn_box_reg": torch.tensor(0.5)}
    got = l_con(outputs, targets, rpn, background_weight=bg_w)
    box += 0.75
    assert got.item() == pytest.approx(cls + box, rel=1e-5)


def test_every_loss_is_an_attached_zero_on_empty_input():
    empty = torch.zeros(0, K + 1, requires_grad=True)
    deltas = torch.zeros(0, 4, requires_grad=True)
    for loss in (l_pri(empty, empty), l_inc(empty, empty, 0.7), squared_error(empty, empty),
                 l_con(RegionOutputs(empty, empty, deltas),
                       RegionTargets([], torch.zeros(0, dtype=torch.int64), empty, deltas), {})):
        assert loss.item() == 0.0 and loss.requires_grad


def test_squared_error_sums_classes_and_averages_rows():
    p, q = _probs(3, 8), _probs(3, 9)
    assert squared_error(p, q).item() == pytest.approx(((p - q) ** 2).sum().item() / 3, rel=1e-6)


def test_gradient_direction_loss_is_0_parallel_1_orthogonal_2_opposite():
    g = torch.tensor([1.0, -2.0, 3.0])
    assert gradient_direction_loss([g], [5 * g]).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_direction_loss([g], [-0.1 * g]).item() == pytest.approx(2.0, abs=1e-6)
    assert gradient_direction_loss([torch.tensor([1.0, 0])], [torch.tensor([0, 2.0])]).item() == pytest.approx(1.0)
    # Tiny gradients keep their direction (no eps swallowing them).
    assert gradient_direction_loss([1e-20 * g], [-1e-20 * g]).item() == pytest.approx(2.0, abs=1e-5)


def test_gradient_direction_loss_takes_matrices_row_by_row_and_averages_tensors():
    # Weight rows: parallel (cos 1), orthogonal (cos 0) -> 1 - mean = 0.5. A global cosine
    # of the flattened matrices would give 1 - 3/sqrt(10 * 5) instead.
    w_con = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    w_inc = torch.tensor([[3.0, 6.0], [0.0, 5.0]])
    assert gradient_direction_loss([w_con], [w_inc]).item() == pytest.approx(0.5, abs=1e-6)
    # A bias is one plain cosine: opposite -> 2. Mean over the two tensors: (0.5 + 2) / 2.
    b = torch.tensor([1.0, -1.0])
    assert gradient_direction_loss([w_con, b], [w_inc, -b]).item() == pytest.approx(1.25, abs=1e-6)
    # A row that is zero on either side (a dead unit) has no direction and is left out.
    dead = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert gradient_direction_loss([dead], [w_inc]).item() == pytest.approx(0.0, abs=1e-6)
    nothing = torch.zeros(2, 2, requires_grad=True)
    loss = gradient_direction_loss([w_con], [nothing])
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError):
        gradient_direction_loss([w_con], [b])


def test_l_ckg_adds_the_kl_to_the_consistent_one_hot():
    g = torch.tensor([0.5, 1.0])
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1]])
    labels = torch.tensor([0, 2])
    expected = 2.0 + (-math.log(0.7) - math.log(0.5)) / 2 / (K + 1)
    assert l_ckg([g], [-g], probs, labels).item() == pytest.approx(expected, rel=1e-6)


def test_losses_do_not_modify_inputs():
    logits, target = torch.randn(3, K + 1, generator=_gen(10)), _probs(3, 11)
    before = (logits.clone(), target.clone())
    l_pri(logits, target), l_inc(logits, target, 0.1), squared_error(torch.softmax(logits, -1), target)
    assert torch.equal(logits, before[0]) and torch.equal(target, before[1])


def test_teacher_moves_toward_the_student_by_exactly_the_keep_rate():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    keep = 0.9
    ema_update(teacher, student, keep)
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            expected = keep * before[name] + (1 - keep) * student.state_dict()[name]
            assert torch.allclose(value, expected, atol=1e-7), name
    assert teacher[1].num_batches_tracked.item() == 7
    ema_update(teacher, student, 1.0)  # keep rate 1: frozen
    assert torch.allclose(teacher[0].weight, keep * before["0.weight"] + (1 - keep) * student[0].weight)


def test_a_tensor_shared_by_two_modules_moves_once():
    shared = nn.Linear(2, 2)
    student = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})  # one weight, two names
    teacher = make_teacher(student)
    assert teacher["a"].weight is teacher["b"][0].weight
    with torch.no_grad():
        teacher["a"].weight.fill_(0.0)
        student["a"].weight.fill_(1.0)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher["a"].weight, torch.full((2, 2), 0.25))
