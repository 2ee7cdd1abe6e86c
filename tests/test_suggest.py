"""Slice suggestions: TTA inverses, the benefit score, diverse ranking, trained models, CLI."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import semiseg
from semiseg.cli import main
from semiseg.data import HEALTHY, UNKNOWN, InputError, Normaliser
from semiseg.engine import run
from semiseg.model import Model
from semiseg.suggest import (
    TTA_TRANSFORMS,
    annotated_slices,
    iter_uncertainty,
    rank_slices,
    slice_density,
    slice_descriptors,
    slice_scores,
    suggest_slices,
    tta_forward,
    tta_inverse,
    uncertainty_slices,
    uncertainty_volume,
)

from ._util import Pointwise


# ----------------------------------------------------------------------------- helpers
class Positional(Pointwise):
    """Not equivariant: the prediction depends on the column, so TTA must change it."""

    name = "positional-test"

    def predict(self, x):
        ramp = torch.linspace(-2, 2, x.shape[-1], device=x.device)
        p1 = torch.sigmoid(self.gain * x[:, :1] + ramp)
        return {"probabilities": torch.cat([1 - p1, p1], 1)}


def pointwise_model(cls=Pointwise, axis=0) -> Model:
    # Normaliser mapping -1 -> -1 and 1 -> 1: the image is fed to the method unchanged.
    return Model(cls(1, 2), Normaliser((-1.0,), (1.0,)), axis)


def discs(seed: int, n: int = 10, size: int = 32):
    """Bright discs (one per slice) on a dark noisy background, with their truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(10, 22, 2)
        r = rng.uniform(5, 8)
        truth[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    image = truth.astype(np.float32) + rng.normal(0, 0.1, truth.shape).astype(np.float32)
    return image, truth


@pytest.fixture(scope="module")
def trained():
    """A tiny supervised U-Net trained on slices 2 and 7 of the disc volume."""
    torch.set_num_threads(1)
    image, truth = discs(0)
    labels = np.zeros_like(truth)
    labels[[2, 7]] = truth[[2, 7]]
    model = semiseg.train(
        image, labels, params={"features": (8, 16), "lr": 3e-3},
        config=semiseg.TrainConfig(steps=150, crop=32, batch_size=4, seed=0), device="cpu",
    )
    return model, image, labels


def tiny_params(cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls.Params)}
    params = {"features": (8, 16)}
    if "unique_channels" in names:
        params["unique_channels"] = 4
    return params


# ----------------------------------------------------------------------------- TTA
@pytest.mark.parametrize("transform", TTA_TRANSFORMS)
def test_tta_inverse_round_trip(transform):
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)  # non-square
    assert torch.equal(tta_inverse(tta_forward(x, transform), transform), x)
    u = x[:, 0]  # (B, H, W) maps are inverted the same way
    assert torch.equal(tta_inverse(tta_forward(u, transform), transform), u)


def test_tta_transforms_are_the_8_distinct_symmetries():
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    outs = {tuple(tta_forward(x, t).flatten().tolist()) for t in TTA_TRANSFORMS}
    assert len(outs) == 8
    assert TTA_TRANSFORMS[0] == (0, False)


def test_tta_is_exact_for_an_equivariant_model():
    # A pixelwise model commutes with every flip/rotation: TTA must give back the plain map,
    # also for odd-sized slices that get padded; a wrong inverse would scramble pixels.
    x = np.random.default_rng(0).normal(size=(3, 1, 13, 10)).astype(np.float32)
    method = Pointwise(1, 2)
    u0, p0 = uncertainty_slices(method, x, tile_size=None)
    u1, p1 = uncertainty_slices(method, x, tta=True, tile_size=None)
    np.testing.assert_allclose(u1, u0, atol=1e-6)
    np.testing.assert_allclose(p1, p0, atol=1e-6)
    assert u0.shape == (3, 13, 10) and p0.shape == (3, 2, 13, 10)


def test_tta_changes_a_position_dependent_model():
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype(np.float32)
    method = Positional(1, 2)
    u0, _ = uncertainty_slices(method, x, tile_size=None)
    u1, _ = uncertainty_slices(method, x, tta=True, tile_size=None)
    assert np.abs(u1 - u0).max() > 0.05


def test_default_uncertainty_is_predictive_entropy():
    x = np.zeros((1, 1, 8, 8), np.float32)  # p = 0.5 everywhere -> entropy log 2
    u, _ = uncertainty_slices(Pointwise(1, 2), x, tile_size=None)
    np.testing.assert_allclose(u, np.log(2), rtol=1e-6)


def test_overridden_uncertainty_is_used():
    class Constant(Pointwise):
        name = "constant-test"

        def uncertainty(self, x):
            return torch.full((x.shape[0], *x.shape[2:]), 0.25)

    u, _ = uncertainty_slices(Constant(1, 2), np.zeros((2, 1, 8, 8), np.float32), tta=True, tile_size=None)
    np.testing.assert_allclose(u, 0.25)


# ----------------------------------------------------------------------------- the score
@pytest.mark.parametrize("side", [64, 256])
def test_score_prefers_an_unsure_object_to_background_haze(side):
    # Slice 0: empty slice with faint uncertainty everywhere (p_fg = 0.02).
    # Slice 1: one small unsure object (p_fg = 0.5 on 5x5 pixels), certain elsewhere.
    pfg = np.full((2, side, side), 1e-6)
    pfg[0] = 0.02
    pfg[1, 30:35, 30:35] = 0.5
    probs = np.stack([1 - pfg, pfg], 1)
    ent = -(probs * np.log(probs)).sum(1)
    roi = slice_scores(ent, probs)
    assert roi[1] > roi[0]
    # A plain sum would rank the empty slice first: the region of interest matters.
    plain = ent.reshape(2, -1).sum(1)
    assert plain[0] > plain[1]
    # The haze enters as its mean (slice-size free) and still orders empty slices.
    np.testing.assert_allclose(roi[0], ent[0].mean())
    assert slice_scores(ent, probs, outside_weight=0.0)[0] == 0.0


def test_score_counts_the_margin_around_the_object():
    pfg = np.full((1, 32, 32), 0.01)
    pfg[0, 15, 15] = 0.9
    probs = np.stack([1 - pfg, pfg], 1)
    u = np.ones((1, 32, 32))
    n_disc = int(np.sum(np.add.outer(np.arange(-3, 4) ** 2, np.arange(-3, 4) ** 2) <= 9))
    got = slice_scores(u, probs, margin=3, outside_weight=0.0)
    assert got[0] == pytest.approx(n_disc)


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 0.0}, {"threshold": 1.5}, {"margin": -1}, {"outside_weight": -1.0}]
)
def test_score_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        slice_scores(np.zeros((1, 2, 2)), np.ones((1, 2, 2, 2)) / 2, **kwargs)


# ----------------------------------------------------------------------------- ranking
def test_rank_excludes_and_orders():
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 2.0, 8.0, 4.0, 6.0])
    got = rank_slices(scores, n=3, exclude=[2], spacing=0)
    assert [s.index for s in got] == [7, 4, 9]
    assert [s.mass for s in got] == [8.0, 7.0, 6.0]
    all_ = rank_slices(scores, n=20, exclude=[2], spacing=0)
    assert sorted(s.index for s in all_) == [i for i in range(10) if i != 2]


def test_rank_diversity_skips_a_neighbour_of_similar_score():
    scores = np.zeros(30)
    scores[[10, 11]] = [10.0, 9.9]  # two neighbours, nearly equal
    scores[22] = 9.0  # a distant alternative of similar score
    top = [s.index for s in rank_slices(scores, n=2)]
    assert top == [10, 22]
    assert abs(top[0] - top[1]) > 1
    # Without the penalty the neighbour would come second: the test can fail.
    assert [s.index for s in rank_slices(scores, n=2, spacing=0)] == [10, 11]
    # A clearly better neighbour is still taken.
    scores[11] = 100.0
    assert [s.index for s in rank_slices(scores, n=2)][:1] == [11]


def test_rank_annotated_slices_repel_and_scores_decrease():
    scores = np.ones(20)
    scores[6] = 1.2  # next to the annotated slice 5
    got = rank_slices(scores, n=4, exclude=[5])
    assert got[0].index != 6
    assert all(a.score >= b.score for a, b in itertools.pairwise(got))


def test_rank_ties_spread_out_deterministically():
    got = [s.index for s in rank_slices(np.zeros(21), n=3, exclude=[0])]
    assert got == [20, 10, 5]
    assert got == [s.index for s in rank_slices(np.zeros(21), n=3, exclude=[0])]


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"spacing": -1.0}])
def test_rank_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        rank_slices(np.ones(5), **kwargs)


def test_annotated_slices_counts_labels_and_healthy_tags():
    labels = np.zeros((5, 4, 4), np.uint8)
    labels[1, 0, 0] = 1
    tags = np.array([UNKNOWN, UNKNOWN, HEALTHY, 1, UNKNOWN])
    assert annotated_slices(labels, tags).tolist() == [False, True, True, False, False]
    assert annotated_slices(labels).tolist() == [False, True, False, False, False]


# ----------------------------------------------------------------------------- volumes
def test_uncertainty_volume_shape_axis_and_lazy_input(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    lazy = zarr.create_array(tmp_path / "im.zarr", shape=image.shape, chunks=(1, 9, 11), dtype="f4")
    lazy[:] = image
    for axis in (0, 2):
        model = pointwise_model(axis=axis)
        u = uncertainty_volume(model, image, batch_size=3)
        assert u.shape == image.shape and u.dtype == np.float32
        p = 1 / (1 + np.exp(-4 * image))
        np.testing.assert_allclose(u, -(p * np.log(p) + (1 - p) * np.log(1 - p)), atol=1e-5)
        np.testing.assert_array_equal(uncertainty_volume(model, lazy, batch_size=3), u)


def test_iter_uncertainty_reports_progress():
    image = np.zeros((5, 8, 8), np.float32)
    steps = []
    res = run(iter_uncertainty(pointwise_model(), image, batch_size=2), lambda p: steps.append(p.step))
    assert steps == [0, 2, 4, 5]
    assert res.mass.shape == (5,)


def test_slice_descriptors_are_area_means():
    x = np.arange(2 * 1 * 32 * 32, dtype=np.float32).reshape(2, 1, 32, 32)
    d = slice_descriptors(x, side=16)
    assert d.shape == (2, 256) and d.dtype == np.float32
    np.testing.assert_allclose(d[0, 0], x[0, 0, :2, :2].mean())
    np.testing.assert_allclose(d[1, -1], x[1, 0, -2:, -2:].mean())


def test_slice_density_of_identical_slices_is_one_and_outliers_are_lower():
    same = np.ones((6, 4))
    np.testing.assert_array_equal(slice_density(same), np.ones(6))
    assert slice_density(np.ones((1, 4))).tolist() == [1.0]
    d = np.zeros((7, 4))
    d[:6] += np.arange(6)[:, None] * 0.01  # a tight cluster of six slices
    d[6] = 5.0  # and one unlike any other
    dens = slice_density(d)
    assert dens.max() == 1.0 and np.all(dens > 0)
    assert dens[6] < 0.5 * dens[:6].min()
    # Analytic case: two points at squared distance s; bandwidth = median positive = s, so
    # each point's density is (1 + exp(-1/2)) / 2, scaled to 1.
    np.testing.assert_allclose(slice_density(np.array([[0.0], [3.0]])), [1.0, 1.0])


def test_density_weight_demotes_an_atypical_slice_of_equal_uncertainty():
    from semiseg.suggest import UncertaintyResult

    n = 9
    mass = np.ones(n)
    mass[[2, 8]] = 5.0  # two equally uncertain slices
    desc = np.zeros((n, 4), np.float32)
    desc[8] = 10.0  # slice 8 looks like no other slice (e.g. an end slice of the scan)
    res = UncertaintyResult(np.zeros((n, 4, 4), np.float32), mass, 0, None, desc)
    labels = np.zeros((n, 4, 4), np.uint8)
    labels[5, 0, 0] = 1
    plain = suggest_slices(_AxisModel(), None, labels, n=2, result=res)
    weighted = suggest_slices(_AxisModel(), None, labels, n=2, density_weight=1, result=res)
    assert {plain[0].index, plain[1].index} == {2, 8}  # mass alone cannot tell them apart
    assert weighted[0].index == 2 and weighted[0].score > weighted[1].score
    with pytest.raises(InputError):
        suggest_slices(_AxisModel(), None, labels, density_weight=-1, result=res)


class _AxisModel:
    axis = 0


def test_suggest_with_a_trained_model(trained):
    model, image, labels = trained
    clean = suggest_slices(model, image, labels, n=8)
    got = [s.index for s in clean]
    assert len(got) == 8 and not {2, 7} & set(got)  # annotated slices excluded
    assert got == [s.index for s in suggest_slices(model, image, labels, n=8)]  # deterministic
    tags = np.full(10, UNKNOWN)
    tags[[0, 9]] = HEALTHY
    tagged = [s.index for s in suggest_slices(model, image, labels, n=10, tags=tags)]
    assert sorted(tagged) == [1, 3, 4, 5, 6, 8]
    # Corrupt a patch of slice 4 to intensities between background and disc: the model is
    # unsure there, and slice 4 must come first.
    bad = image.copy()
    bad[4, 8:24, 8:24] = 0.5 + np.random.default_rng(1).normal(0, 0.1, (16, 16))
    res = run(iter_uncertainty(model, bad))
    assert res.mass[4] > 1.5 * np.delete(res.mass, 4).max()
    assert suggest_slices(model, bad, labels, n=3)[0].index == 4
    assert suggest_slices(model, bad, labels, n=3, tta=True)[0].index == 4


def test_suggest_rejects_mismatched_labels(trained):
    model, image, labels = trained
    with pytest.raises(InputError):
        suggest_slices(model, image, labels[:5])
    with pytest.raises(InputError):
        suggest_slices(model, image, labels, n=0)
    with pytest.raises(InputError):
        suggest_slices(model, image, labels, tags=np.zeros(3))


def test_suggest_returns_nothing_when_all_annotated():
    image = np.zeros((3, 8, 8), np.float32)
    labels = np.ones((3, 8, 8), np.uint8)
    assert suggest_slices(pointwise_model(), image, labels) == []


@pytest.mark.parametrize("name", semiseg.list_methods())
def test_suggest_works_with_every_registered_method(name):
    cls = semiseg.get_method(name)
    model = Model(cls(1, 2, params=tiny_params(cls)), Normaliser((0.0,), (1.0,)))
    image = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 5:9, 5:9] = 1
    got = suggest_slices(model, image, labels, n=3)
    assert len(got) == 3
    assert all(0 <= s.index < 6 and s.index != 1 and np.isfinite(s.score) for s in got)
    assert len({s.index for s in got}) == 3


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_files(trained, tmp_path_factory):
    model, image, labels = trained
    d = tmp_path_factory.mktemp("cli")
    semiseg.write_volume(d / "image.tif", image)
    semiseg.write_volume(d / "labels.tif", labels)
    model.save(d / "model.pt")
    (d / "weak.csv").write_text("slice,diseased\n0,0\n9,0\n")
    return d


def test_cli_suggest_prints_slices_best_first(cli_files, capsys):
    d = cli_files
    assert main(["suggest", str(d / "model.pt"), str(d / "image.tif"), str(d / "labels.tif"), "-n", "4"]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:4] == ["slice", "relative", "score", "mass"]  # columns: see test_cli
    assert len(lines) == 4
    idx = [int(line.split()[0]) for line in lines]
    scores = [float(line.split()[2]) for line in lines]
    assert not {2, 7} & set(idx)
    assert scores == sorted(scores, reverse=True)
    args = ["suggest", str(d / "model.pt"), str(d / "image.tif"), str(d / "labels.tif"), "-n", "10"]
    assert main([*args, "--weak", str(d / "weak.csv")]) == 0
    idx = [int(line.split()[0]) for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert sorted(idx) == [1, 3, 4, 5, 6, 8]


@pytest.mark.parametrize(
    "case",
    ["shape", "n", "missing_model", "not_a_model", "bad_csv"],
)
def test_cli_suggest_bad_input(cli_files, tmp_path, capsys, case):
    d = cli_files
    model, image, labels = str(d / "model.pt"), str(d / "image.tif"), str(d / "labels.tif")
    extra = []
    if case == "shape":
        semiseg.write_volume(tmp_path / "small.tif", np.zeros((3, 32, 32), np.uint8))
        labels = str(tmp_path / "small.tif")
    elif case == "n":
        extra = ["-n", "0"]
    elif case == "missing_model":
        model = str(tmp_path / "nope.pt")
    elif case == "not_a_model":
        model = image
    elif case == "bad_csv":
        (tmp_path / "w.csv").write_text("slice,diseased\n99,1\n")
        extra = ["--weak", str(tmp_path / "w.csv")]
    assert main(["suggest", model, image, labels, *extra]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert len(out.err.strip().splitlines()) == 1
    assert out.err.startswith("semiseg suggest: error:")
