"""Annotated planes: CSV round trip, voxel mask, pools and the model's history."""

from __future__ import annotations

import numpy as np
import pytest

import semiseg
from semiseg.data import InputError, make_pools
from semiseg.model import Model
from semiseg.planes import (
    annotated_voxel_mask,
    as_planes,
    describe_planes,
    planes_from_labels,
    read_planes_csv,
    validate_planes,
    write_planes_csv,
)

from ._util import TINY_PARAMS


def _axial_and_sagittal(shape=(6, 10, 12), axial=(1,), sagittal=4):
    """Labels painted on axial slices ``axial`` and on the whole sagittal slice ``sagittal``."""
    lab = np.zeros(shape, np.uint8)
    for z in axial:
        lab[z, 2:5, 3:6] = 1
    lab[:, 3:7, sagittal] = 1
    return lab


def test_csv_round_trip_sorts_and_deduplicates(tmp_path):
    path = write_planes_csv(tmp_path / "planes.csv", [(2, 40), (0, 3), [0, 12], (0, 3)])
    assert path.read_text().splitlines() == ["axis,index", "0,3", "0,12", "2,40"]
    assert read_planes_csv(path) == ((0, 3), (0, 12), (2, 40))
    assert [p.name for p in tmp_path.iterdir()] == ["planes.csv"]  # atomic: no temp file left
    write_planes_csv(path, [])
    assert read_planes_csv(path) == ()


def test_csv_accepts_blank_lines_extra_columns_and_spaces(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("index, axis ,note\n5,1,coronal\n\n7,0,\n")
    assert read_planes_csv(path) == ((0, 7), (1, 5))


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"slice,diseased\n0,1\n", "expected a CSV with the header 'axis,index'"),
        (b"", "not a planes file"),
        (b"hello, I am text\n", "not a planes file"),
        (b"\xff\xfe\x00binary\x89PNG", "not a text file"),
        (b"axis,index\n0,x\n", "line 2: bad row 0,x"),
        (b"axis,index\n0\n", "bad row"),
        (b"axis,index\n3,0\n", "axis must be 0, 1 or 2"),
        (b"axis,index\n1,-2\n", "index must be >= 0"),
    ],
    ids=["weak-csv", "empty", "text", "binary", "bad-value", "short-row", "bad-axis", "negative"],
)
def test_bad_csv_is_one_line_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_planes_csv(path)
    msg = str(err.value)
    assert fragment in msg and str(path) in msg and "\n" not in msg


def test_missing_csv(tmp_path):
    with pytest.raises(InputError, match="cannot read planes"):
        read_planes_csv(tmp_path / "nope.csv")


def test_validate_names_the_pair_and_the_shape():
    assert validate_planes([(1, 9), (0, 0)], (6, 10, 12)) == ((0, 0), (1, 9))
    with pytest.raises(InputError) as err:
        validate_planes([(0, 1), (1, 10)], (6, 10, 12), source="p.csv")
    msg = str(err.value)
    assert msg.startswith("p.csv: ") and "1,10" in msg and "(6, 10, 12)" in msg and "0..9" in msg
    for bad in ([(0, 1, 2)], [("a", 1)], [(0.5, 1)], [(5, 0)]):
        with pytest.raises(InputError):
            validate_planes(bad, (6, 10, 12))


def test_annotated_voxel_mask_unions_the_planes_of_every_axis():
    shape = (5, 6, 7)
    mask = annotated_voxel_mask(shape, [(0, 1), (2, 3), (1, 0), (0, 1)])
    assert mask.shape == shape and mask.dtype == bool
    assert mask[1].all() and mask[:, :, 3].all() and mask[:, 0].all()
    # |Z=1| + |X=3| + |Y=0| - pairwise overlaps + the one voxel in all three
    assert mask.sum() == 42 + 30 + 35 - 6 - 7 - 5 + 1
    expected = np.zeros(shape, bool)
    expected[1] = expected[:, :, 3] = expected[:, 0] = True
    np.testing.assert_array_equal(mask, expected)
    assert not annotated_voxel_mask(shape, []).any()
    with pytest.raises(InputError, match="outside the volume"):
        annotated_voxel_mask(shape, [(2, 7)])


def test_planes_from_labels_is_todays_rule():
    lab = _axial_and_sagittal()
    # Along Z every slice holds labels (the sagittal stroke crosses them all): today's rule.
    assert planes_from_labels(lab, 0) == tuple((0, z) for z in range(6))
    assert planes_from_labels(lab, 2) == ((2, 3), (2, 4), (2, 5))
    assert describe_planes([(0, 1), (2, 4), (0, 3)]) == "axial 1, 3; sagittal 4"
    assert as_planes(np.array([[0, 2], [0, 2]])) == ((0, 2),)


def test_sagittal_slice_does_not_mark_axial_slices_annotated():
    lab = _axial_and_sagittal(axial=(1,), sagittal=4)
    today = make_pools(lab)
    assert today.annotated.tolist() == [0, 1, 2, 3, 4, 5]  # the problem planes solve
    pools = make_pools(lab, planes=[(0, 1), (2, 4)])
    assert pools.annotated.tolist() == [1]
    assert pools.painted.tolist() == [1]
    assert pools.unlabelled.tolist() == [0, 2, 3, 4, 5]
    assert pools.planes == ((0, 1), (2, 4))
    # Crossing slices hold foreground, so they are diseased, but without a full mask.
    assert pools.diseased.tolist() == [0, 1, 2, 3, 4, 5]
    assert pools.diseased_annotated.tolist() == [1]
    assert today.planes is None


def test_planes_along_another_training_axis_and_healthy_tags():
    lab = _axial_and_sagittal(axial=(1,), sagittal=4)
    pools = make_pools(lab, axis=2, planes=[(0, 1), (2, 4)])
    assert pools.annotated.tolist() == [4]  # X=3 and X=5 hold the axial stroke only
    # An empty listed slice is an all-background annotation; healthy tags still count.
    tags = np.full(6, -1)
    tags[5] = 0
    lab2 = lab.copy()
    lab2[:, :, 4] = 0
    pools = make_pools(lab2, tags, planes=[(0, 1), (0, 3)])
    assert pools.annotated.tolist() == [1, 3, 5]
    assert pools.painted.tolist() == [1]
    assert pools.healthy.tolist() == [5]


def test_planes_errors():
    lab = _axial_and_sagittal()
    with pytest.raises(InputError, match="along the training axis 0"):
        make_pools(lab, planes=[(2, 4)])
    with pytest.raises(InputError, match="outside the volume"):
        make_pools(lab, planes=[(0, 1), (1, 10)])
    with pytest.raises(InputError, match="no annotated slice"):
        make_pools(lab, planes=[])


def test_history_records_the_planes_and_survives_save(tiny_phantom, tmp_path):
    s = tiny_phantom
    labels = s.labels.copy()
    x = int(np.argmax((s.truth > 0).any(axis=1).sum(axis=0)))  # the sagittal slice crossing most tumour
    labels[:, :, x] = s.truth[:, :, x]  # painted in full
    planes = (*planes_from_labels(s.labels, 0), (2, x))
    cfg = semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=0)
    model = semiseg.train(s.image, labels, params=TINY_PARAMS, config=cfg, device="cpu", planes=planes)
    h = model.history[-1]
    assert h["planes"] == [list(p) for p in sorted(planes)]
    assert h["annotated_slices"] == s.annotated.tolist()
    model.save(tmp_path / "m.pt")
    assert Model.load(tmp_path / "m.pt").history[-1]["planes"] == h["planes"]
    # The same labels without planes: every slice the sagittal one crosses counts as annotated.
    plain = semiseg.train(s.image, labels, params=TINY_PARAMS, config=cfg, device="cpu")
    assert "planes" not in plain.history[-1]
    assert len(plain.history[-1]["annotated_slices"]) > len(h["annotated_slices"])
