import numpy as np
import pytest

from semiseg.data import (
    DISEASED,
    HEALTHY,
    UNKNOWN,
    InputError,
    Normaliser,
    SliceSampler,
    as_channels,
    make_pools,
    read_weak_csv,
    suggest_tags,
    validate_labels,
    write_weak_csv,
)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((5, 7, 9), (1, 5, 7, 9)), ((2, 5, 7, 9), (2, 5, 7, 9))],
)
def test_as_channels_shapes(shape, expected):
    assert as_channels(np.zeros(shape, np.uint16)).shape == expected


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((7, 9), np.float32, "3D"),
        ((1, 2, 3, 4, 5), np.float32, "3D"),
        ((64, 64, 3), np.uint8, "RGB"),
        ((40, 5, 7, 9), np.float32, "channels"),
        ((5, 7, 9), np.complex64, "numeric"),
        ((5, 7, 9), np.bool_, "numeric"),
    ],
)
def test_as_channels_rejects(shape, dtype, message):
    with pytest.raises(InputError, match=message):
        as_channels(np.zeros(shape, dtype))


def test_as_channels_moves_channel_axis():
    img = np.zeros((5, 7, 9, 2))
    assert as_channels(img, channel_axis=-1).shape == (2, 5, 7, 9)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((3, 4, 4), np.float32), "integer"),
        (np.full((3, 4, 4), 0.5, np.float32), "whole"),
        (-np.ones((3, 4, 4), np.int16), ">= 0"),
        (np.zeros((3, 4, 5), np.uint8), "does not match"),
    ],
)
def test_validate_labels_rejects(labels, message):
    with pytest.raises(InputError, match=message):
        validate_labels(labels, (3, 4, 4))


def _image(dtype, scale):
    """A phantom image as a scanner would store it (the would-be labels of a swapped call)."""
    from semiseg.synthetic import make_phantom

    img = make_phantom(0, shape=(8, 48, 48), labelled=2).image.astype(np.float64)
    img = (img - img.min()) / (img.max() - img.min()) * scale
    return img.astype(dtype)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _image(np.int16, 1148), "distinct values, far more than the classes"),  # the 1,149-class run
        (lambda: _image(np.uint8, 255), "distinct values"),  # an 8-bit image: fewer than 256 values
        (lambda: _image(np.uint8, 60), "change from voxel to voxel"),  # a dim 8-bit image: ~60 values
        (lambda: _image(np.int16, 3000) - 1000, ">= 0"),  # CT-like, negative values
        (lambda: _image(np.float32, 1.0), "not whole"),  # a float image
        (lambda: _image(np.float32, 1148).round(), "integer dtype"),  # a float image of whole numbers
    ],
)
def test_labels_that_look_like_an_image_ask_whether_they_were_swapped(make, message):
    labels = make()
    with pytest.raises(InputError, match=f"{message}.*did you swap IMAGE and LABELS\\?$"):
        validate_labels(labels, labels.shape)


def _blocks(n_classes: int, shape=(8, 48, 48), block=4) -> np.ndarray:
    """Dense labels of ``n_classes`` classes in ``block``-sided squares (an atlas-like map)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, n_classes, size=(shape[0], shape[1] // block, shape[2] // block))
    coarse.flat[:n_classes] = np.arange(n_classes)  # every class present
    return np.kron(coarse, np.ones((1, block, block), np.int64)).astype(np.uint16)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _blocks(2),
        lambda: _blocks(120),  # a whole-body CT atlas: ~120 classes, dense, every slice
        lambda: _blocks(255),  # as many classes as allowed, in small squares
        lambda: np.where(np.arange(8)[:, None, None] % 4 == 0, _blocks(40), 0),  # sparse, 40 classes
        lambda: _blocks(3).astype(np.int64),
        lambda: (_blocks(2) > 0),  # bool
    ],
)
def test_legitimate_multiclass_labels_are_accepted(make):
    labels = make()
    out = validate_labels(labels, labels.shape)
    assert out.shape == labels.shape


def test_label_values_must_fit_a_uint16_mask():
    lab = np.zeros((3, 4, 4), np.int32)
    lab[1, 1, 1] = 70000
    with pytest.raises(InputError, match=r"class ids 0\.\.65535, got 70000"):
        validate_labels(lab, lab.shape)


def _labels(painted_slices, n=6):
    lab = np.zeros((n, 4, 4), np.uint8)
    for i in painted_slices:
        lab[i, 1, 1] = 1
    return lab


@pytest.mark.parametrize(
    ("painted", "tags", "annotated", "unlabelled", "healthy", "diseased"),
    [
        ([1, 3], None, [1, 3], [0, 2, 4, 5], [], [1, 3]),
        ([1], [0, -1, -1, 1, -1, -1], [0, 1], [2, 3, 4, 5], [0], [1, 3]),
        ([], [0, 0, -1, -1, -1, -1], [0, 1], [2, 3, 4, 5], [0, 1], []),
        ([2], [-1, -1, -1, -1, -1, 1], [2], [0, 1, 3, 4, 5], [], [2, 5]),
    ],
)
def test_make_pools(painted, tags, annotated, unlabelled, healthy, diseased):
    pools = make_pools(_labels(painted), tags)
    assert pools.annotated.tolist() == annotated
    assert pools.unlabelled.tolist() == unlabelled
    assert pools.healthy.tolist() == healthy
    assert pools.diseased.tolist() == diseased
    assert pools.painted.tolist() == painted


def test_make_pools_along_other_axis():
    lab = np.zeros((3, 5, 4), np.uint8)
    lab[:, 2, :] = 1
    pools = make_pools(lab, axis=1)
    assert pools.annotated.tolist() == [2]
    assert pools.unlabelled.tolist() == [0, 1, 3, 4]


def test_make_pools_errors():
    with pytest.raises(InputError, match="no annotated slice"):
        make_pools(_labels([]))
    with pytest.raises(InputError, match="tagged healthy but hold labels"):
        make_pools(_labels([1]), [-1, 0, -1, -1, -1, -1])
    with pytest.raises(InputError, match="one entry per slice"):
        make_pools(_labels([1]), [1, 0])
    with pytest.raises(InputError, match="-1"):
        make_pools(_labels([1]), [3, 0, 0, 0, 0, 0])


def test_multiclass_count():
    lab = _labels([1])
    lab[2, 0, 0] = 3
    assert make_pools(lab).num_classes == 4


def test_weak_csv_round_trip(tmp_path):
    tags = np.array([UNKNOWN, HEALTHY, DISEASED, UNKNOWN, HEALTHY], np.int8)
    path = write_weak_csv(tmp_path / "weak.csv", tags)
    assert path.read_text().splitlines()[0] == "slice,diseased"
    np.testing.assert_array_equal(read_weak_csv(path, 5), tags)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,0\n", "not a weak-tag file: expected a CSV with the header 'slice,diseased'"),
        ("slice,diseased\n9,1\n", "out of range"),
        ("slice,diseased\n1,2\n", "0 or 1"),
        ("slice,diseased\nx,1\n", "bad row"),
    ],
)
def test_weak_csv_errors(tmp_path, text, message):
    p = tmp_path / "weak.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=message):
        read_weak_csv(p, 5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x80\x81", "not a text file"),  # an image, say
        (b"II*\x00\x08\x00\x00\x00\x80\xff", "not a text file"),  # a TIFF
        (b"slice;diseased\n1;0\n", "not a weak-tag file"),  # another separator
    ],
)
def test_weak_csv_that_is_not_csv_names_the_file_and_the_format(tmp_path, content, message):
    p = tmp_path / "tags.bin"
    p.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_weak_csv(p, 5)
    text = str(err.value)
    assert message in text and str(p) in text and "'slice,diseased'" in text
    assert "codec" not in text and "\n" not in text


def test_weak_csv_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_weak_csv(tmp_path / "nope.csv", 3)


def test_suggest_tags_marks_painted_slices():
    tags = suggest_tags(_labels([2, 4]), [0, -1, -1, -1, -1, -1])
    assert tags.tolist() == [0, -1, 1, -1, 1, -1]


def test_normaliser_maps_percentiles():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (1, 4, 32, 32))
    norm = Normaliser.fit(img)
    out = norm(img)
    assert out.dtype == np.float32
    assert np.percentile(out, 1) == pytest.approx(-1, abs=0.05)
    assert np.percentile(out, 99) == pytest.approx(1, abs=0.05)
    assert Normaliser.from_dict(norm.to_dict()) == norm


def test_normaliser_handles_constant_and_rejects_nan():
    norm = Normaliser.fit(np.full((1, 2, 4, 4), 7.0))
    assert np.all(np.isfinite(norm(np.full((1, 4, 4), 7.0))))
    bad = np.zeros((1, 2, 4, 4))
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        Normaliser.fit(bad)


def test_sampler_shapes_and_painted_oversampling():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 20, 24, 20)).astype(np.float32)
    labels = np.zeros((20, 24, 20), np.uint8)
    labels[3, 5:9, 5:9] = 1
    tags = np.full(20, HEALTHY)
    tags[3] = UNKNOWN
    tags[10:] = UNKNOWN
    pools = make_pools(labels, tags)
    sampler = SliceSampler(image, labels, pools, Normaliser.fit(image), crop=32)
    out = sampler.sample(rng, {"labelled": 4, "unlabelled": 3, "healthy": 2, "diseased": 2})
    assert out["labelled"].shape == (4, 1, 32, 32)  # padded up from 24 x 20
    assert out["mask"].shape == (4, 32, 32)
    assert out["unlabelled"].shape == (3, 1, 32, 32)
    assert out["healthy"].shape == (2, 1, 32, 32)
    assert out["diseased_has_mask"].all()
    # At least half the labelled crops come from the one painted slice despite 9 healthy ones.
    hits = sum(out["mask"][i].any() for i in range(4))
    assert hits >= 2


def test_sampler_is_seeded():
    image = np.random.default_rng(1).normal(size=(1, 6, 40, 40)).astype(np.float32)
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[2, 10:20, 10:20] = 1
    pools = make_pools(labels)
    s = SliceSampler(image, labels, pools, Normaliser.fit(image), crop=16)
    a = s.sample(np.random.default_rng(5), {"labelled": 3, "unlabelled": 3})
    b = s.sample(np.random.default_rng(5), {"labelled": 3, "unlabelled": 3})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sampler_flags_unannotated_crops_of_diseased_tagged_slices():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 8, 16, 16)).astype(np.float32)
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[0, 4:8, 4:8] = 1
    tags = np.full(8, UNKNOWN)
    tags[[5, 6]] = DISEASED  # unannotated slices 1..7: 5 and 6 hold a lesion somewhere
    pools = make_pools(labels, tags)
    s = SliceSampler(image, labels, pools, Normaliser.fit(image), crop=16, augment=False)
    out = s.sample(np.random.default_rng(3), {"unlabelled": 64})
    flags = out["unlabelled_diseased"]
    assert flags.dtype == bool and flags.shape == (64,) and 0 < flags.sum() < 64
    # a flagged crop is one of slices 5 or 6 (identified by its pixels, no augmentation)
    diseased = [s.slice_image(i) for i in (5, 6)]
    for crop, flag in zip(out["unlabelled"], flags):
        assert flag == any(np.allclose(crop, d, atol=1e-5) for d in diseased)
