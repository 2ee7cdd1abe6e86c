import numpy as np
import pytest
import torch

from semiseg.losses import dice_loss, soft_dice
from semiseg.metrics import dice_per_class


def test_dice_per_class_cases():
    t = np.zeros((2, 4, 4), int)
    t[0, :2] = 1
    t[1, :, :1] = 2
    assert dice_per_class(t, t) == {1: 1.0, 2: 1.0}
    p = t.copy()
    p[0, 0] = 0  # 4 of 8 class-1 voxels lost
    assert dice_per_class(p, t)[1] == pytest.approx(2 * 4 / (4 + 8))
    assert dice_per_class(p, t, exclude_slices=[0]) == {2: 1.0}
    assert dice_per_class(np.zeros_like(t), np.zeros_like(t), classes=[1]) == {1: 1.0}
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(t[:1], t)


def test_soft_dice_perfect_and_disjoint():
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, 2:5, 2:5] = 1
    onehot = torch.nn.functional.one_hot(mask, 2).permute(0, 3, 1, 2).float()
    assert soft_dice(onehot, mask, smooth=0).item() == pytest.approx(1.0)
    assert soft_dice(1 - onehot, mask, smooth=0).item() == pytest.approx(0.0)
    big = 100 * (2 * onehot - 1)
    assert dice_loss(big, mask).item() == pytest.approx(0.0, abs=1e-4)
