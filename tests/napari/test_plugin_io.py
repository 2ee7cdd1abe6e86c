"""Reader, writers, sample data and the npe2 manifest of the napari plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semiseg.io import read_volume, write_volume
from semiseg.napari import TAGS_KEY
from semiseg.napari._reader import napari_get_reader
from semiseg.napari._writer import write_labels_tiff, write_labels_zarr

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "napari-semiseg"


def test_manifest_copies_identical():
    canonical = ROOT / "napari.yaml"
    packaged = ROOT / "src" / "semiseg" / "napari" / "napari.yaml"
    assert canonical.read_text() == packaged.read_text()


def test_npe2_validate():
    res = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN, "--imports"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _write_ome_zarr(path: Path, data: np.ndarray) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]}
    root.create_array("0", data=data, chunks=(1, *data.shape[1:]))
    root.create_array("1", data=data[:, ::2, ::2], chunks=(1, *data.shape[1:] // np.array(2)))


@pytest.mark.parametrize(
    ("name", "lazy"),
    [("scan.tif", False), ("scan.tiff", False), ("scan.npy", False), ("scan.zarr", True), ("scan.ome.zarr", True)],
)
def test_open_each_format(make_napari_viewer, tmp_path, name, lazy):
    data = (np.arange(5 * 9 * 11) % 251).astype(np.uint16).reshape(5, 9, 11)
    path = tmp_path / name
    if name == "scan.ome.zarr":
        _write_ome_zarr(path, data)
    else:
        write_volume(path, data)
    assert napari_get_reader(str(path)) is not None
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "scan"
    assert layer._type_string == "image"
    assert hasattr(layer.data, "dask") == lazy  # zarr stays lazy
    np.testing.assert_array_equal(np.asarray(layer.data), data)


def test_integer_mask_file_opens_as_labels(make_napari_viewer, tmp_path):
    path = write_volume(tmp_path / "tumour_mask.zarr", np.ones((3, 4, 5), np.uint8))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer._type_string == "labels"


@pytest.mark.parametrize("bad", ["missing.tif", "notes.txt", "broken.zarr", ["a.tif", "b.tif"], None])
def test_get_reader_declines_without_raising(tmp_path, bad):
    if bad == "notes.txt":
        (tmp_path / bad).write_text("x")
    if bad == "broken.zarr":
        (tmp_path / bad).mkdir()
    if isinstance(bad, str):
        bad = str(tmp_path / bad)
    assert napari_get_reader(bad) is None


@pytest.mark.parametrize(("key", "name"), [("phantom", "phantom"), ("digits", "digits")])
def test_open_samples(make_napari_viewer, key, name):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, key)
    image = viewer.layers[name]
    labels = viewer.layers[f"{name} labels"]
    assert image.data.shape == labels.data.shape
    tags = labels.metadata[TAGS_KEY]
    assert tags.shape == (labels.data.shape[0],)
    assert set(np.unique(tags)) <= {-1, 0, 1}
    assert labels.data.any()


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_writers_round_trip(make_napari_viewer, tmp_path, suffix):
    data = np.zeros((4, 6, 7), np.uint8)
    data[1, 2:4, 3:5] = 1
    data[3, 0, 0] = 2
    writer = write_labels_zarr if suffix == ".zarr" else write_labels_tiff
    out = writer(str(tmp_path / f"direct{suffix}"), data, {})
    np.testing.assert_array_equal(read_volume(out[0]), data)
    # Through napari's save machinery with our writer contributions.
    viewer = make_napari_viewer()
    layer = viewer.add_labels(data, name="mask")
    written = layer.save(str(tmp_path / f"via_napari{suffix}"), plugin=PLUGIN)
    assert written
    np.testing.assert_array_equal(read_volume(written[0]), data)


@pytest.mark.parametrize("suffix", [".zarr", ".tiff"])
def test_export_button_path(sample_viewer, tmp_path, suffix, make_train_widget):
    w = make_train_widget(sample_viewer)
    w.export_combo.setCurrentText("phantom labels")
    (path,) = w.export_mask(tmp_path / f"out{suffix}")
    np.testing.assert_array_equal(read_volume(path), sample_viewer.layers["phantom labels"].data)
