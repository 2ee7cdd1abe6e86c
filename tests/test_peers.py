"""The peers of benchmarks/peers.py (what users already have) on tiny seeded volumes."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers import fill_between_slices, random_forest, random_walk, report


def _blob(seed=0, shape=(9, 28, 30)):
    """A bright ellipsoid over slices 2..6 on a dark noisy background; slices 2 and 6 painted."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    truth = (((z - 4) / 2.6) ** 2 + ((y - 14) / 8) ** 2 + ((x - 15) / 9) ** 2 < 1).astype(np.uint8)
    image = truth * 1.0 + rng.normal(scale=0.2, size=shape)
    labels = np.zeros_like(truth)
    annotated = np.array([2, 6])
    labels[annotated] = truth[annotated]
    tags = np.where(truth.reshape(len(truth), -1).any(1), 1, 0).astype(np.int8)
    return image.astype(np.float32), truth, labels, annotated, tags


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("peer", [random_forest, random_walk])
def test_learned_peers_recover_a_blob_between_two_annotated_slices(peer):
    image, truth, labels, annotated, tags = _blob()
    assert truth[4].sum() > truth[2].sum()  # the middle slice is not a copy of a painted one
    mask, prob = peer(image, labels, annotated, tags)
    assert mask.shape == truth.shape and mask.dtype == np.uint8 and prob.shape == truth.shape
    assert set(np.unique(mask)) <= {0, 1} and 0 <= prob.min() and prob.max() <= 1
    assert _dice(mask[3:6] > 0, truth[3:6] > 0) > 0.85
    assert not mask[tags == 0].any()  # healthy-tagged slices are background seeds / training pixels


def test_learned_peers_without_painted_foreground_predict_nothing():
    image, _, labels, _, tags = _blob()
    empty = np.zeros_like(labels)
    for peer in (random_forest, random_walk):
        assert not peer(image, empty, np.array([], int), tags)[0].any()


def test_random_walk_uses_the_spacing():
    image, _, labels, annotated, tags = _blob(1)
    a = random_walk(image, labels, annotated, tags)[1]
    b = random_walk(image, labels, annotated, tags, spacing=(3.0, 1.0, 1.0))[1]
    assert not np.allclose(a, b)


def test_fill_between_slices_interpolates_only_within_the_painted_range():
    pytest.importorskip("itk")
    labels = np.zeros((9, 24, 26), np.uint8)
    labels[2, 4:10, 4:10] = 1  # a square top left ...
    labels[6, 12:20, 14:22] = 1  # ... and a bigger one bottom right
    out = fill_between_slices(labels)
    assert out.shape == labels.shape and out.dtype == np.uint8
    areas = out.reshape(9, -1).sum(1)
    assert (areas[3:6] > 0).all()
    assert not out[[0, 1, 7, 8]].any()
    np.testing.assert_array_equal(out[[2, 6]], labels[[2, 6]])  # painted slices are kept as painted
    assert areas[2] < areas[4] < areas[6]  # the shape morphs from one contour to the other
    c = [np.argwhere(out[i]).mean(0) for i in (2, 4, 6)]
    assert c[0][0] < c[1][0] < c[2][0] and c[0][1] < c[1][1] < c[2][1]
    assert labels.sum() == 36 + 64  # the user's labels are untouched


def test_fill_between_slices_along_another_axis():
    pytest.importorskip("itk")
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:6, 2:6, 1] = 1
    labels[2:6, 2:6, 9] = 1
    out = fill_between_slices(labels, axis=2)
    assert out[2:6, 2:6, 5].all() and not out[..., 0].any() and not out[..., 12].any()


def test_report_puts_peers_and_methods_side_by_side():
    peer_rows = [
        {"peer": p, "sample": "nuclei", "placement": "even", "k": 5, "seed": s, "dice": d + 0.01 * s,
         "cpu_seconds": 2.0, "loadavg": 1.5}
        for p, d in (("interpolation", 0.5), ("random_walk", 0.7)) for s in range(3)
    ]
    method_rows = [
        {"method": "supervised", "sample": "nuclei", "placement": "even", "k": 5, "seed": s, "dice": 0.8,
         "budget_minutes": 3.0, "clock": "process", "params": {}, "loadavg": 2.5}
        for s in range(2)
    ] + [{"method": "supervised", "sample": "nuclei", "placement": "even", "k": 5, "seed": 0, "dice": 0.9,
          "budget_minutes": 3.0, "clock": "process", "params": {}, "every_slice_labelled": True}]
    table = report(peer_rows, method_rows)
    lines = table.splitlines()
    assert lines[0] == ("| sample | placement | K | interpolation (CPU s) | random_walk (CPU s) "
                        "| supervised, 3 min process | supervised (every slice labelled), 3 min process |")
    assert lines[2] == ("| nuclei | even | 5 | 0.510 ± 0.008 (2.0 s, n=3) | 0.710 ± 0.008 (2.0 s, n=3) "
                        "| 0.800 ± 0.000 (n=2) | 0.900 ± 0.000 (n=1) |")
    assert "peers 1.50 to 1.50 (median 1.50); methods 2.50 to 2.50" in table
