"""The CKG network, the fusion variants and the gradient direction alignment."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from coin_ray.losses import l_ckg
from coin_ray.models.ckg import CKG, FUSIONS, mlp_gradients

K, D = 3, 8


def _ckg(seed=0) -> CKG:
    torch.manual_seed(seed)
    return CKG(D, K, heads=2, init_prototypes=F.normalize(torch.randn(K + 1, D), dim=-1))


def _probs(rows, seed):
    return torch.softmax(torch.randn(rows, K + 1, generator=torch.Generator().manual_seed(seed)), -1)


def test_ckg_shapes_and_rows_sum_to_one():
    ckg = _ckg()
    feats = F.normalize(torch.randn(5, D), dim=-1)
    p = ckg(feats, _probs(5, 1), _probs(5, 2))
    assert p.shape == (5, K + 1)
    assert torch.allclose(p.sum(-1), torch.ones(5), atol=1e-6)
    assert ckg(feats[:0], _probs(0, 1), _probs(0, 2)).shape == (0, K + 1)


def test_ckg_prototypes_follow_the_ema_of_their_own_labels():
    ckg = _ckg()
    before_cloud, before_clip = ckg.cloud_prototypes.vectors.clone(), ckg.clip_prototypes.vectors.clone()
    feats = torch.tensor([[1.0] * D, [2.0] * D, [4.0] * D])
    ckg.update_prototypes(feats, torch.tensor([0, 0, 1]), torch.tensor([2, 2, 2]), eta=0.5)
    assert torch.allclose(ckg.cloud_prototypes.vectors[0], 0.5 * before_cloud[0] + 0.5 * 1.5)
    assert torch.allclose(ckg.cloud_prototypes.vectors[1], 0.5 * before_cloud[1] + 0.5 * 4.0)
    assert torch.equal(ckg.cloud_prototypes.vectors[2:], before_cloud[2:])
    assert torch.allclose(ckg.clip_prototypes.vectors[2], 0.5 * before_clip[2] + 0.5 * 7 / 3)
    assert torch.equal(ckg.clip_prototypes.vectors[:2], before_clip[:2])


def test_fusions_are_the_table_6_variants():
    pc, pk = _probs(2, 3), _probs(2, 4)
    sc, sk = torch.tensor([0.9, 0.0]), torch.tensor([0.3, 0.0])
    ckg_p = _probs(2, 5)
    assert set(FUSIONS) == {"cloud", "clip", "avg", "score_avg", "ckg", "ds"}
    assert torch.equal(FUSIONS["cloud"](pc, pk, sc, sk, None), pc)
    # ds: the corrected cloud records carry the estimated posterior as their probs.
    assert torch.equal(FUSIONS["ds"](pc, pk, sc, sk, None), pc)
    assert torch.equal(FUSIONS["clip"](pc, pk, sc, sk, None), pk)
    assert torch.allclose(FUSIONS["avg"](pc, pk, sc, sk, None), (pc + pk) / 2)
    s_avg = FUSIONS["score_avg"](pc, pk, sc, sk, None)
    assert torch.allclose(s_avg[0], (0.9 * pc[0] + 0.3 * pk[0]) / 1.2)
    assert torch.equal(FUSIONS["ckg"](pc, pk, sc, sk, ckg_p), ckg_p)
    with pytest.raises(ValueError):
        FUSIONS["ckg"](pc, pk, sc, sk, None)


class _Student(nn.Module):
    """A backbone, the aligned projection MLP theta (``trans``) and a cosine classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 10)
        self.trans = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, D))
        self.text = nn.Parameter(F.normalize(torch.randn(K + 1, D), dim=-1))

    def head(self, projected):
        return F.normalize(projected, dim=-1) @ F.normalize(self.text.detach(), dim=-1).T * 10.0


def _alignment_inputs(seed=0):
    torch.manual_seed(seed)
    student, ckg = _Student(), _ckg(seed)
    x_con, x_inc = torch.randn(4, 6), torch.randn(3, 6)
    h_con, h_inc = torch.relu(student.backbone(x_con)), torch.relu(student.backbone(x_inc))
    labels = torch.tensor([0, 1, 2, 1])
    f_con = F.normalize(student.trans(h_con), dim=-1)
    f_inc = F.normalize(student.trans(h_inc), dim=-1)
    return student, ckg, h_con, h_inc, labels, f_con, f_inc


def test_l_ckg_reaches_the_ckg_and_not_the_student():
    student, ckg, h_con, h_inc, labels, f_con, f_inc = _alignment_inputs()
    p_inc = ckg(f_inc.detach(), _probs(3, 6), _probs(3, 7))
    p_con = ckg(f_con.detach(), _probs(4, 8), _probs(4, 9))
    g_con, g_inc = mlp_gradients(student.trans, student.head, h_con, F.one_hot(labels, K + 1).float(),
                                 h_inc, p_inc)
    shapes = [(12, 10), (12,), (D, 12), (D,)]
    assert [tuple(g.shape) for g in g_con] == [tuple(g.shape) for g in g_inc] == shapes
    loss = l_ckg(g_con, g_inc, p_con, labels)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ckg.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_mlp_gradients_match_autograd_on_every_tensor_of_the_real_mlp():
    student, ckg, h_con, h_inc, labels, _, _ = _alignment_inputs(1)
    target = F.one_hot(labels, K + 1).float()
    g_con, _ = mlp_gradients(student.trans, student.head, h_con, target, h_inc, _probs(3, 1))
    p = torch.softmax(student.head(student.trans(h_con.detach())), -1)
    ((p - target) ** 2).sum(-1).mean().backward()
    expected = [p.grad for p in student.trans.parameters()]
    assert len(g_con) == len(expected) == 4
    for got, want in zip(g_con, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_alignment_is_zero_when_the_ckg_teaches_the_consistent_answer():
    # Same regions on both sides, inconsistent target = the consistent one-hot: g~ == g^.
    student, _, h_con, _, labels, _, _ = _alignment_inputs(2)
    target = F.one_hot(labels, K + 1).float()
    g_con, g_inc = mlp_gradients(student.trans, student.head, h_con, target, h_con, target)
    assert l_ckg(g_con, g_inc, target, labels).item() == pytest.approx(0.0, abs=1e-5)


def test_alignment_under_bf16_autocast_matches_float32():
    student, ckg, h_con, h_inc, labels, f_con, f_inc = _alignment_inputs(3)
    target = F.one_hot(labels, K + 1).float()
    p_inc = ckg(f_inc.detach(), _probs(3, 6), _probs(3, 7))
    g32 = mlp_gradients(student.trans, student.head, h_con, target, h_inc, p_inc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g16 = mlp_gradients(student.trans, student.head, h_con.bfloat16(), target, h_inc.bfloat16(), p_inc)
        loss = l_ckg(*g16, p_inc, labels[:3])
    assert all(g.dtype == torch.float32 for g in g16[1]) and torch.isfinite(loss)
    for a32, b32, a16, b16 in zip(g32[0], g32[1], g16[0], g16[1]):
        cos32 = F.cosine_similarity(a32.flatten(), b32.flatten(), dim=0)
        cos16 = F.cosine_similarity(a16.flatten(), b16.flatten(), dim=0)
        assert cos16.item() == pytest.approx(cos32.item(), abs=2e-2)
