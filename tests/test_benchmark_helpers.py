"""The helpers behind the annotation-efficiency report: the figures in docs/benchmarks.md rest on them."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _stats import gap_share, paired_difference
from annotation_efficiency import error_anatomy, gap_table, paired_table, variant


def test_error_anatomy_splits_missed_regions_from_borders():
    truth = np.zeros((2, 10, 10), bool)
    pred = np.zeros_like(truth)
    truth[0, 1:4, 1:4] = True  # found, one column short: 3 border false negatives
    pred[0, 1:4, 1:3] = True
    pred[0, 0, 1:3] = True  # 2 border false positives, touching the found region
    truth[0, 6:8, 6:8] = True  # missed entirely: 4
    truth[1, 1:4, 1:4] = True  # under a prediction in the slice above only: missed, 9
    pred[1, 8:10, 0:2] = True  # false island: 4
    e = error_anatomy(pred, truth)
    assert e == {"fn": 16, "fn_in_missed_regions": 13, "fp": 6, "fp_in_false_regions": 4, "truth_voxels": 22}


def test_error_anatomy_of_a_perfect_and_an_empty_prediction():
    truth = np.zeros((3, 8, 8), bool)
    truth[1, 2:5, 2:5] = True
    assert error_anatomy(truth, truth) == {
        "fn": 0, "fn_in_missed_regions": 0, "fp": 0, "fp_in_false_regions": 0, "truth_voxels": 9
    }
    e = error_anatomy(np.zeros_like(truth), truth)
    assert e["fn"] == e["fn_in_missed_regions"] == 9 and e["fp"] == 0


def test_variant_names_the_full_supervision_bound():
    row = {"method": "supervised", "params": {}, "anneal": 0.0, "every_slice_labelled": True}
    assert variant(row) == "supervised (every slice labelled)"
    assert variant({**row, "every_slice_labelled": False}) == "supervised"
    assert variant({"method": "mutual-info", "params": {"weight": "0.2"}}) == "mutual-info (weight=0.2)"


def test_paired_difference_interval_brackets_the_mean():
    a, b = np.array([0.9, 0.8, 0.85, 0.95]), np.array([0.85, 0.8, 0.8, 0.9])
    m, lo, hi = paired_difference(a, b)
    assert m == pytest.approx(0.0375)
    assert 0.0 <= lo <= m <= hi <= 0.05 + 1e-12  # the largest paired difference
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)


def test_paired_table_pairs_by_seed():
    def rows(method, dice_by_seed, **extra):
        return [{"method": method, "seed": s, "dice": d, **extra} for s, d in dice_by_seed.items()]

    def key(method):
        return ("phantom", method, 5, 1.0, "process")

    groups = {
        key("supervised"): rows("supervised", {0: 0.80, 1: 0.90, 2: 0.70}),
        # seed 3 has no supervised partner and must be left out of the pairing
        key("bound"): rows("bound", {0: 0.85, 1: 0.95, 2: 0.75, 3: 0.10}),
    }
    table = paired_table(groups)
    assert "| phantom | bound | 5 | 1.0 min process | +0.050 [+0.050, +0.050] | 3/3 seeds |" in table


def test_gap_share_on_hand_made_numbers():
    sup, full = [0.5, 0.6, 0.7], [0.7, 0.8, 0.9]  # a gap of 0.2 on every seed
    half = gap_share([0.6, 0.7, 0.8], sup, full)
    assert half["share"] == pytest.approx(0.5) and half["gap"] == pytest.approx(0.2)
    assert half["low"] == pytest.approx(0.5) and half["high"] == pytest.approx(0.5)
    # a method below supervised recovers a negative share
    assert gap_share([0.45, 0.55, 0.65], sup, full)["share"] == pytest.approx(-0.25)
    # uneven gains: the share is the ratio of the mean gain to the mean gap, inside its interval
    g = gap_share([0.7, 0.6, 0.75], sup, full)
    assert g["share"] == pytest.approx((0.2 + 0.0 + 0.05) / 3 / 0.2)
    assert g["low"] < g["share"] < g["high"] and g["low"] >= 0.0 and g["high"] <= 1.0 + 1e-9


def test_gap_share_of_a_zero_or_tiny_gap_is_undefined():
    sup = [0.5, 0.6, 0.7]
    assert gap_share([0.6, 0.7, 0.8], sup, sup) is None  # zero gap: never divided by zero
    assert gap_share([0.6, 0.7, 0.8], sup, [0.505, 0.605, 0.705]) is None  # below min_gap
    assert gap_share([0.6, 0.7, 0.8], sup, [0.4, 0.5, 0.6]) is None  # the bound below supervised
    with pytest.raises(ValueError):
        gap_share([0.6], sup, sup)


def test_gap_table_pairs_each_method_with_supervised_and_the_bound_of_its_regime():
    def rows(method, dice_by_seed, placement="clustered", **extra):
        return [{"method": method, "seed": s, "dice": d, "params": {}, "anneal": 0.0, "placement": placement,
                 "context": 0, **extra} for s, d in dice_by_seed.items()]

    def key(name):
        return ("phantom", name, 5, 1.0, "process")

    groups = {
        key("supervised (clustered slices)"): rows("supervised", {0: 0.5, 1: 0.6}),
        key("supervised (every slice labelled, clustered slices)"): rows(
            "supervised", {0: 0.7, 1: 0.8, 2: 0.9}, every_slice_labelled=True),
        key("self-training (clustered slices)"): rows("self-training", {0: 0.6, 1: 0.7, 2: 0.1}),
        # another regime's supervised runs must not be the baseline
        key("supervised"): rows("supervised", {0: 0.0, 1: 0.0}, placement="even"),
        key("mean-teacher (clustered slices)"): rows("mean-teacher", {0: 0.5, 1: 0.6}),
    }
    table = gap_table(groups)
    # seed 2 lacks a supervised run: left out
    assert "| self-training (clustered slices) | 5 | 1.0 min process | 0.650 | 0.550 | 0.750 | +50% [+50%, +50%] | 2 |" in table
    assert "| mean-teacher (clustered slices) | 5 | 1.0 min process | 0.550 | 0.550 | 0.750 | +0% [+0%, +0%] | 2 |" in table
    assert "| supervised" not in table.split("\n", 2)[2]  # neither the baseline nor the bound is a row


def test_save_models_keeps_the_scored_model(tmp_path):
    import json

    import annotation_efficiency

    import semiseg

    out, models = tmp_path / "rows.jsonl", tmp_path / "models"
    annotation_efficiency.main([
        "--methods", "supervised", "--samples", "digits", "--k", "2", "--seeds", "1", "--steps", "2",
        "--crop", "32", "--no-whole-slices", "--out", str(out), "--save-models", str(models),
        "--param", "supervised:features=4,8",
    ])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    model = semiseg.load_model(models / "supervised_digits_k2_even_seed1.pt")
    assert model.method.name == "supervised" and model.history[-1]["steps"] == row["steps"] == 2
    # The saved weights are the scored ones: predicting again gives the row's Dice.
    from semiseg.metrics import dice_per_class

    sample = semiseg.make_sample("digits", seed=1, labelled=2)
    mask = semiseg.predict_volume(model, sample.image, probabilities=False)["mask"]
    dice = dice_per_class(mask, sample.truth, classes=[1], exclude_slices=sample.annotated)[1]
    assert round(dice, 4) == row["dice"]


def test_figure_model_refuses_a_model_of_another_method_and_a_missing_figure(tmp_path):
    import table2

    import semiseg

    s = semiseg.make_sample("digits", seed=0, labelled=2)
    model = semiseg.train(s.image, s.labels, method="supervised", params={"features": (4, 8)}, device="cpu",
                          config=semiseg.TrainConfig(steps=1, batch_size=2, crop=16))
    pt = tmp_path / "supervised.pt"
    model.save(pt)
    with pytest.raises(SystemExit, match="holds a supervised model, not translation"):
        table2.main(["--figure", str(tmp_path / "f.png"), "--figure-model", str(pt)])
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(SystemExit):  # argparse's usage error (exit 2)
        table2.main(["--figure-model", str(pt)])


def test_tumour_table_reads_contrast_cut_and_shown_cross_section():
    from unseen_tumours import tumour_table, unseen_contrast_share

    image = np.full((6, 12, 12), 100.0)
    truth = np.zeros(image.shape, np.uint8)
    truth[0:3, 1:4, 1:4] = 1  # bright, largest cross-section 9 on slices 0-2
    truth[1, 2, 2] = 1
    image[truth > 0] = 150.0
    truth[4:6, 7:11, 7:11] = 1  # dark, never on an annotated slice
    image[4:6, 7:11, 7:11] = 50.0
    truth[3, 1, 1] = 1  # a 1-voxel tip of the bright one, on the only annotated slice
    image[3, 1, 1] = 150.0
    annotated = np.zeros(6, bool)
    annotated[3] = True
    rows = tumour_table(image, truth, annotated)
    assert [(r["sign"], r["seen"], r["voxels"]) for r in rows] == [(1, True, 27), (-1, False, 32)]
    assert rows[0]["area_shown"] == pytest.approx(1 / 9)
    assert unseen_contrast_share(rows) == pytest.approx(32 / 59)
    assert np.isnan(unseen_contrast_share([]))


def test_walk_refinement_grows_a_confident_core_to_the_image_edge_and_no_further():
    from walk_refinement import refine_slice

    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2
    image = np.where(disc, 1.0, -1.0) + np.random.default_rng(0).normal(0, 0.05, disc.shape)
    core = (yy - 20) ** 2 + (xx - 20) ** 2 <= 4**2
    prob = np.where(core, 0.99, 0.02)  # a network that found the disc but drew it too small
    grown = refine_slice(image, prob, threshold=0.95, band=8, beta=130)
    assert (grown == disc).mean() > 0.99
    # No confident pixel: the network's own prediction (probability >= 0.5) stands.
    assert refine_slice(image, np.full(disc.shape, 0.6), threshold=0.95, band=8, beta=130).all()
    assert not refine_slice(image, np.full(disc.shape, 0.2), threshold=0.95, band=8, beta=130).any()


def test_crop_zero_trains_at_each_methods_automatic_crop(tmp_path):
    import json

    import annotation_efficiency

    out = tmp_path / "rows.jsonl"
    annotation_efficiency.main([
        "--methods", "supervised", "--samples", "phantom", "--k", "2", "--seeds", "0", "--steps", "1",
        "--crop", "0", "--no-whole-slices", "--out", str(out), "--param", "supervised:features=4,8",
    ])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["crop"] == 128  # the whole 128² phantom slice (auto_crop), not the --crop default 96
