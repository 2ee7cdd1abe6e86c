"""Unit tests of semiseg.consistency: transforms, MI, KL, entropy, EMA, ramp-up."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from semiseg.consistency import (
    Dihedral,
    clamped_noise,
    ema_decay,
    ema_update,
    joint_distribution,
    mutual_information,
    mutual_information_from_joint,
    pixel_entropy,
    pixel_kl,
    random_dihedral,
    sigmoid_rampup,
    unlabelled_count,
    unsupervised_weight,
)


def one_hot_map(labels: torch.Tensor, c: int) -> torch.Tensor:
    return F.one_hot(labels, c).permute(0, 3, 1, 2).float()


def entropy_of(labels: torch.Tensor, c: int) -> float:
    freq = torch.bincount(labels.flatten(), minlength=c).double() / labels.numel()
    freq = freq[freq > 0]
    return float(-(freq * freq.log()).sum())


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_round_trip_exact(k, flip):
    x = torch.randn(2, 3, 6, 6)
    t = Dihedral((k, (k + 1) % 4), (flip, not flip))
    y = t.apply(x)
    assert torch.equal(t.invert(y), x)
    # a genuine transform: the identity only for k=0 without flip
    if (k, flip) != (0, False):
        assert not torch.equal(y[0], x[0])


def test_dihedral_matches_numpy():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = Dihedral((1,), (True,))
    expect = np.rot90(x[0, 0].numpy(), 1)[:, ::-1]
    assert np.array_equal(t.apply(x)[0, 0].numpy(), expect)


def test_dihedral_non_square():
    x = torch.randn(4, 1, 4, 6)
    t = random_dihedral(4, square=False, generator=torch.Generator().manual_seed(0))
    assert all(k % 2 == 0 for k in t.k)
    assert torch.equal(t.invert(t.apply(x)), x)
    with pytest.raises(ValueError):
        Dihedral((1,), (False,)).apply(torch.randn(1, 1, 4, 6))


def test_dihedral_bad_arguments():
    with pytest.raises(ValueError):
        Dihedral((4,), (False,))
    with pytest.raises(ValueError):
        Dihedral((0, 1), (False,))
    with pytest.raises(ValueError):
        Dihedral((0,), (False,)).apply(torch.randn(2, 1, 4, 4))


def test_dihedral_keeps_gradients():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    t = Dihedral((1, 3), (True, False))
    t.invert(t.apply(x) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0))


def test_clamped_noise_bounded():
    x = torch.zeros(1000)
    y = clamped_noise(x, 1.0, 0.3)
    assert y.abs().max() <= 0.3 + 1e-7 and y.std() > 0.1
    assert torch.equal(clamped_noise(x, 0.0, 0.3), x)


# ----------------------------------------------------------------------------- information
def test_joint_by_convolution_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    n, c, h, w, r = 2, 3, 5, 4, 1
    p1 = torch.softmax(torch.randn(n, c, h, w, generator=g), 1)
    p2 = torch.softmax(torch.randn(n, c, h, w, generator=g), 1)
    joint = joint_distribution(p1, p2, radius=r, symmetric=False)
    assert joint.shape == (3, 3, c, c)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            table = torch.zeros(c, c, dtype=torch.float64)
            for b in range(n):
                for i in range(h):
                    for j in range(w):
                        ii, jj = i + dy, j + dx
                        if 0 <= ii < h and 0 <= jj < w:
                            table += torch.outer(p1[b, :, ii, jj].double(), p2[b, :, i, j].double())
            table /= table.sum()
            assert torch.allclose(joint[dy + r, dx + r].double(), table, atol=1e-6)
    sym = joint_distribution(p1, p2, radius=r)
    assert torch.allclose(sym, (joint + joint.transpose(-1, -2)) / 2)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_mi_identical_one_hot_equals_entropy(c):
    labels = torch.randint(0, c, (3, 8, 8), generator=torch.Generator().manual_seed(c))
    p = one_hot_map(labels, c)
    mi = mutual_information(p, p, radius=0)
    assert mi.item() == pytest.approx(entropy_of(labels, c), abs=1e-5)


def test_mi_constant_images_all_displacements():
    # each image is one class: every displacement sees the same perfect dependence
    labels = torch.tensor([0, 1, 1, 2]).view(4, 1, 1).expand(4, 6, 6)
    p = one_hot_map(labels, 3)
    joint = joint_distribution(p, p, radius=1)
    per_disp = mutual_information_from_joint(joint)
    assert torch.allclose(per_disp, torch.full_like(per_disp, entropy_of(labels, 3)), atol=1e-5)


def test_mi_independent_uniform_is_zero():
    g = torch.Generator().manual_seed(0)
    a = one_hot_map(torch.randint(0, 4, (4, 64, 64), generator=g), 4)
    b = one_hot_map(torch.randint(0, 4, (4, 64, 64), generator=g), 4)
    assert abs(mutual_information(a, b).item()) < 5e-3
    u = torch.full((2, 4, 8, 8), 0.25)
    assert abs(mutual_information(u, u).item()) < 1e-6


def test_mi_bounded_and_differentiable():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    p = torch.softmax(x, 1)
    mi = mutual_information(p, p.flip(-1))
    assert 0 <= mi.item() <= math.log(3) + 1e-6
    mi.backward()
    assert torch.isfinite(x.grad).all()


def test_kl_identical_is_zero_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), 1)
    q = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), 1)
    assert pixel_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert pixel_kl(p, q).item() > 0
    expected = (p * (p / q).log()).sum(1).mean()
    assert pixel_kl(p, q).item() == pytest.approx(expected.item(), rel=1e-5)


def test_entropy_values():
    c = 4
    uniform = torch.full((1, c, 3, 3), 1 / c)
    assert pixel_entropy(uniform).item() == pytest.approx(math.log(c), rel=1e-6)
    assert pixel_entropy(uniform, normalise=True).item() == pytest.approx(1.0, rel=1e-6)
    sure = one_hot_map(torch.zeros(1, 3, 3, dtype=torch.long), c)
    assert pixel_entropy(sure).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- mean teacher
@pytest.mark.parametrize(
    ("step", "alpha", "warmup", "expected"),
    [(1, 0.999, True, 0.5), (9, 0.999, True, 0.9), (10_000, 0.999, True, 0.999), (1, 0.99, False, 0.99)],
)
def test_ema_decay(step, alpha, warmup, expected):
    assert ema_decay(step, alpha, warmup=warmup) == pytest.approx(expected)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    s0 = [q.detach().clone() for q in student.parameters()]
    t0 = [q.detach().clone() for q in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        assert torch.allclose(t, 0.9 * a + 0.1 * b)
    # buffers are copied
    bs, bt = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    bs.running_mean.fill_(3.0)
    ema_update(bt, bs, 0.99)
    assert torch.equal(bt.running_mean, bs.running_mean)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


@pytest.mark.parametrize(
    ("step", "warmup", "rampup", "expected"),
    [(0, 10, 0, 0.0), (9, 10, 0, 0.0), (10, 10, 0, 1.0), (10, 10, 20, math.exp(-5)), (30, 10, 20, 1.0), (0, 0, 0, 1.0)],
)
def test_unsupervised_weight(step, warmup, rampup, expected):
    assert unsupervised_weight(step, warmup, rampup) == pytest.approx(expected)


def test_unlabelled_count():
    assert unlabelled_count(8, 1.0) == 8
    assert unlabelled_count(8, 0.5) == 4
    assert unlabelled_count(1, 0.25) == 1
    with pytest.raises(ValueError):
        unlabelled_count(8, 0.0)
