import numpy as np
import pytest

import semiseg
from semiseg.data import DISEASED, HEALTHY, make_pools
from semiseg.synthetic import sparse_labels


def test_phantom_is_seeded_and_scan_like():
    a = semiseg.make_phantom(3, shape=(16, 48, 48), labelled=2)
    b = semiseg.make_phantom(3, shape=(16, 48, 48), labelled=2)
    c = semiseg.make_phantom(4, shape=(16, 48, 48), labelled=2)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint16 and a.truth.dtype == np.uint8
    has = a.truth.reshape(16, -1).any(1)
    assert has.any() and not has.all()  # some slices healthy
    np.testing.assert_array_equal(a.tags, np.where(has, DISEASED, HEALTHY))
    assert len(a.annotated) == 2
    np.testing.assert_array_equal(a.labels[a.annotated], a.truth[a.annotated])
    pools = make_pools(a.labels, a.tags)
    assert set(pools.annotated) >= set(a.annotated)


def test_phantom_tumours_differ_from_tissue():
    s = semiseg.make_phantom(0, shape=(24, 64, 64))
    tumour = s.image[s.truth > 0].astype(float)
    ring = s.image[(s.truth == 0)].astype(float)
    assert abs(np.median(tumour) - np.median(ring)) > 10


def test_digits_follow_the_paper_construction():
    s = semiseg.make_digits(0, n_slices=40, labelled=3)
    healthy = s.tags == HEALTHY
    assert healthy.sum() == 20
    assert not s.truth[healthy].any()
    assert s.truth[~healthy].reshape(20, -1).any(1).all()
    noise_only = semiseg.make_digits(0, n_slices=4, clutter=0, healthy_fraction=1.0, labelled=0)
    assert noise_only.image.std() == pytest.approx(0.01, rel=0.05)


def test_digits_only_annotates_requested_digit():
    s = semiseg.make_digits(1, n_slices=300, labelled=3, labelled_digit=9)
    assert len(s.annotated) == 3


def test_sparse_labels_spreads_slices():
    truth = np.zeros((20, 2, 2), np.uint8)
    truth[4:16] = 1
    lab = sparse_labels(truth, 3)
    idx = np.flatnonzero(lab.reshape(20, -1).any(1))
    assert len(idx) == 3 and idx.min() >= 4 and idx.max() <= 15 and np.diff(idx).min() >= 3
    assert not sparse_labels(truth, 0).any()


def test_unknown_sample_kind():
    with pytest.raises(ValueError, match="unknown sample"):
        semiseg.make_sample("cats")


@pytest.mark.parametrize("placement", ["clustered", "random"])
def test_seeded_placements_are_deterministic_and_differ_between_seeds(placement):
    truth = np.zeros((40, 4, 4), np.uint8)
    truth[5:35, 1, 1] = 1
    picks = [np.flatnonzero(sparse_labels(truth, 4, placement=placement, seed=s).any((1, 2))) for s in range(6)]
    again = np.flatnonzero(sparse_labels(truth, 4, placement=placement, seed=3).any((1, 2)))
    assert np.array_equal(picks[3], again)
    assert all(len(p) == 4 and set(p) <= set(range(5, 35)) for p in picks)
    assert len({tuple(p) for p in picks}) > 1


def test_clustered_placement_is_contiguous_within_the_first_part_of_the_range():
    truth = np.zeros((40, 4, 4), np.uint8)
    truth[5:35, 1, 1] = 1
    for seed in range(10):
        idx = np.flatnonzero(sparse_labels(truth, 5, placement="clustered", seed=seed).any((1, 2)))
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + 5))
        assert idx[0] <= 5 + (30 - 5) // 2  # the other part of the range stays unseen
    even = np.flatnonzero(sparse_labels(truth, 5).any((1, 2)))
    assert np.diff(even).min() > 1


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement"):
        sparse_labels(np.ones((4, 2, 2), np.uint8), 2, placement="nowhere")


def test_nuclei_are_seeded_scan_like_and_tagged_from_the_truth():
    a = semiseg.make_sample("nuclei", seed=2, labelled=3, shape=(12, 64, 72))
    b = semiseg.make_nuclei(2, labelled=3, shape=(12, 64, 72))
    c = semiseg.make_nuclei(3, labelled=3, shape=(12, 64, 72))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == a.truth.shape == (12, 64, 72)
    assert a.image.dtype == np.uint16 and a.truth.dtype == np.uint8
    assert set(np.unique(a.truth)) == {0, 1}
    has = a.truth.reshape(12, -1).any(1)
    assert has.any() and not has[0] and not has[-1]  # the cell layer leaves top and bottom empty
    np.testing.assert_array_equal(a.tags, np.where(has, DISEASED, HEALTHY))
    assert len(a.annotated) == 3 and has[a.annotated].all()
    np.testing.assert_array_equal(a.labels[a.annotated], a.truth[a.annotated])
    assert a.spacing == (3.0, 1.0, 1.0) and semiseg.make_phantom(0, shape=(8, 32, 32)).spacing == (1.0, 1.0, 1.0)


def test_nuclei_are_anisotropic_bright_dimming_with_depth_and_vary_between_slices():
    from scipy import ndimage as ndi

    s = semiseg.make_nuclei(0, labelled=5)
    assert s.image.shape == (24, 160, 160)
    lab, n = ndi.label(s.truth)
    assert n >= 10
    boxes = ndi.find_objects(lab)
    z_span = np.array([b[0].stop - b[0].start for b in boxes])
    y_span = np.array([b[1].stop - b[1].start for b in boxes])
    assert np.median(z_span / y_span) < 0.6  # objects span fewer slices than pixels
    img = s.image.astype(float)
    assert np.median(img[s.truth > 0]) > np.median(img[s.truth == 0]) + 15
    zs = np.flatnonzero(s.truth.reshape(24, -1).any(1))
    top, bottom = zs[: len(zs) // 3], zs[-(len(zs) // 3):]
    assert np.median(img[top][s.truth[top] > 0]) > np.median(img[bottom][s.truth[bottom] > 0])
    # Unannotated slices are not copies of the annotated ones: neighbours overlap only partly.
    a, b = s.truth[zs[len(zs) // 2]] > 0, s.truth[zs[len(zs) // 2] + 1] > 0
    assert (a & b).sum() / (a | b).sum() < 0.8
    # Poisson-like noise: the background spread grows with the signal.
    assert img[s.truth == 0].std() > 3


def test_head_is_seeded_mostly_air_and_the_brain_lies_inside_a_dark_skull():
    a = semiseg.make_sample("head", seed=1, labelled=3, shape=(16, 64, 64))
    b = semiseg.make_head(1, labelled=3, shape=(16, 64, 64))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert not np.array_equal(a.image, semiseg.make_head(2, labelled=3, shape=(16, 64, 64)).image)
    assert a.image.dtype == np.uint16 and set(np.unique(a.truth)) == {0, 1}
    assert a.spacing == (4.0, 1.0, 1.0)
    has = a.truth.reshape(16, -1).any(1)
    assert has.any() and not has[-1]  # the last slices pass above the vertex
    np.testing.assert_array_equal(a.tags, np.where(has, DISEASED, HEALTHY))
    np.testing.assert_array_equal(a.labels[a.annotated], a.truth[a.annotated])
    s = semiseg.make_head(0, labelled=5)
    assert s.image.shape == (32, 224, 224)
    img = s.image.astype(float)
    assert 0.08 < s.truth.mean() < 0.25  # slices much larger than the brain: mostly not target
    air = img < 0.05 * img.max()
    assert air.mean() > 0.4 and img[air].std() > 0  # mostly air, and the air is noisy, not constant
    # Around the brain lies the dark skull, then bright scalp: the edge is anatomy, not contrast.
    from scipy import ndimage as ndi

    brain = s.truth.astype(bool)
    shell = ndi.binary_dilation(brain, iterations=6) & ~ndi.binary_dilation(brain, iterations=2)
    assert np.median(img[shell]) < 0.5 * np.median(img[brain])
