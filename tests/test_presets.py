"""Presets (issue 19): ``cpu`` defaults, the papers' sizes as ``paper``, ``auto`` on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import semiseg
from semiseg.engine import TrainConfig
from semiseg.errors import InputError
from semiseg.methods import get_method, list_methods
from semiseg.methods.base import PRESETS, resolve_preset


def _sizes(cls, preset):
    """The preset's parameters, with the steps and 3D patch kept tiny for a test."""
    over = {"patch_depth": 4} if cls.name == "unet3d" else {}
    return cls.preset_params(preset, over)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list_methods())
def test_each_preset_of_each_method_builds_and_trains_two_steps(name, preset):
    cls = get_method(name)
    params = _sizes(cls, preset) if name == "unet3d" else None
    # Instance norms need 2x2 latents: crops of twice the size multiple at least (the paper's
    # translation network halves 5 times).
    crop = max(32, 2 * cls(1, 2, params=cls.preset_params(preset, params)).size_multiple)
    s = semiseg.make_phantom(0, shape=(8, crop, crop), labelled=2, n_tumours=1)
    labels = s.labels.copy()
    model = semiseg.train(
        s.image, s.labels, tags=s.tags, method=name, params=params,
        preset=preset, config=TrainConfig(steps=2, batch_size=2, crop=crop, seed=0), device="cpu",
    )
    assert np.array_equal(s.labels, labels)
    assert model.method.step == 2
    assert model.history[-1]["preset"] == preset
    # The networks are the preset's sizes.
    got = dataclasses.asdict(model.method.params)
    for key, value in cls.presets.get(preset, {}).items():
        assert got[key] == value, (name, preset, key)


def test_paper_preset_differs_from_the_cpu_defaults_where_it_is_declared():
    for name in ("translation", "cyclegan", "pyramid-gan", "semantic-gan", "unet3d"):
        cls = get_method(name)
        paper = cls.parse_params(cls.preset_params("paper"))
        assert paper != cls.Params(), name


def test_auto_is_paper_on_cuda_and_cpu_elsewhere():
    assert resolve_preset("auto", "cuda") == "paper"
    assert resolve_preset(None, "cuda:0") == "paper"
    assert resolve_preset("auto", "cpu") == "cpu"
    assert resolve_preset("auto", "mps") == "cpu"
    assert resolve_preset("paper", "cpu") == "paper"


def test_explicit_params_win_over_the_preset():
    cls = get_method("translation")
    p = cls.preset_params("paper", {"features": (8, 16, 32), "unique_channels": 8})
    assert p["features"] == (8, 16, 32) and p["unique_channels"] == 8
    assert p["disc_scales"] == 3  # the rest is the paper's


def test_auto_on_cpu_is_recorded_in_the_history(tiny_phantom):
    s = tiny_phantom
    model = semiseg.train(
        s.image, s.labels, params={"features": (8, 16)}, config=TrainConfig(steps=1, batch_size=2, crop=32),
        device="cpu",
    )
    assert model.history[-1]["preset"] == "cpu (auto: cpu)"
    # A continued model keeps its sizes: no preset is applied or recorded.
    model = semiseg.train(s.image, s.labels, model=model, preset="paper", config=TrainConfig(steps=1, batch_size=2, crop=32))
    assert "preset" not in model.history[-1] and model.method.params.features == (8, 16)


def test_unknown_preset_is_an_input_error(tiny_phantom):
    s = tiny_phantom
    with pytest.raises(InputError, match="unknown preset 'fast'"):
        semiseg.train(s.image, s.labels, preset="fast", config=TrainConfig(steps=1, batch_size=2, crop=32))


def test_widget_settings_carry_the_preset_to_the_job():
    from semiseg.napari._settings import TrainSettings, make_job

    image = np.zeros((1, 4, 16, 16), np.float32)
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1, 4:8, 4:8] = 1
    job = make_job(TrainSettings(preset="paper"), image, labels, train=True)
    assert job.preset == "paper"
    assert make_job(TrainSettings(), image, labels, train=True).preset == "auto"


def test_cli_preset(tmp_path, capsys):
    from semiseg.cli import build_parser, main
    from semiseg.io import write_volume

    s = semiseg.make_phantom(0, shape=(6, 32, 32), labelled=2, n_tumours=1)
    write_volume(tmp_path / "image.tif", s.image)
    write_volume(tmp_path / "labels.tif", s.labels)
    out = tmp_path / "m.pt"
    args = [str(tmp_path / "image.tif"), str(tmp_path / "labels.tif"), "-o", str(out),
            "--steps", "1", "--batch-size", "2", "--crop", "32"]
    assert main(["train", *args, "--preset", "paper", "--param", "features=8,16"]) == 0
    model = semiseg.Model.load(out)
    assert model.history[-1]["preset"] == "paper" and model.method.params.features == (8, 16)
    with pytest.raises(SystemExit) as exc:
        main(["train", *args, "--preset", "fast"])
    assert exc.value.code == 2
    # The CLI offers exactly the library's presets.
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if "--preset" in a.option_strings)
    assert tuple(train.choices) == ("auto", *PRESETS)
