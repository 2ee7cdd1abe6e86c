import json
import os

import numpy as np
import pytest
import tifffile
import zarr

import semiseg
from semiseg.data import InputError
from semiseg.io import atomic_path, read_volume, write_volume
from semiseg.model import Model, ModelFileError

from ._util import file_hash


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".zarr", ".npy"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_volume_round_trip(tmp_path, suffix, dtype):
    data = (np.random.default_rng(0).random((3, 5, 7)) * 200).astype(dtype)
    path = write_volume(tmp_path / f"v{suffix}", data)
    back = read_volume(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, data)


def test_tiff_has_ome_axes(tmp_path):
    write_volume(tmp_path / "v.tif", np.zeros((2, 3, 4, 5), np.uint8))
    with tifffile.TiffFile(tmp_path / "v.tif") as tf:
        assert tf.is_ome
        assert tf.series[0].axes == "CZYX"


def test_zarr_lazy_and_ome_zarr_level0(tmp_path):
    data = np.arange(2 * 4 * 6, dtype=np.uint16).reshape(2, 4, 6)
    write_volume(tmp_path / "a.zarr", data)
    lazy = read_volume(tmp_path / "a.zarr", lazy=True)
    assert isinstance(lazy, zarr.Array)
    root = zarr.open_group(tmp_path / "img.ome.zarr", mode="w", zarr_format=3)
    root.create_array("0", data=data)
    root.create_array("1", data=data[:, ::2, ::2])
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]}
    np.testing.assert_array_equal(read_volume(tmp_path / "img.ome.zarr"), data)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.tif", b"not a tiff at all", "cannot read"),
        ("bad.npy", b"\x93NUMPY garbage", "cannot read"),
        ("bad.png", b"", "unsupported"),
    ],
)
def test_corrupt_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_volume(p)


def test_corrupt_zarr(tmp_path):
    p = tmp_path / "bad.zarr"
    p.mkdir()
    (p / "zarr.json").write_text("{ not json")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "x.tif")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "m.tif"
    write_volume(target, np.ones((2, 3, 3), np.uint8))
    before = file_hash(target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert file_hash(target) == before
    assert os.listdir(tmp_path) == ["m.tif"]


def test_atomic_zarr_replaces_directory(tmp_path):
    write_volume(tmp_path / "m.zarr", np.zeros((2, 3, 3), np.uint8))
    write_volume(tmp_path / "m.zarr", np.ones((2, 3, 3), np.uint8))
    np.testing.assert_array_equal(read_volume(tmp_path / "m.zarr"), 1)
    assert sorted(os.listdir(tmp_path)) == ["m.zarr"]


def test_write_refuses_missing_folder_and_overwrite(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_volume(tmp_path / "nope" / "m.tif", np.zeros((1, 2, 2), np.uint8))
    write_volume(tmp_path / "m.npy", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(InputError, match="exists"):
        write_volume(tmp_path / "m.npy", np.zeros((1, 2, 2), np.uint8), overwrite=False)


def test_model_round_trip(tmp_path, tiny_model, tiny_phantom):
    path = tiny_model.save(tmp_path / "model.pt")
    loaded = Model.load(path)
    assert loaded.config() == tiny_model.config()
    a = semiseg.predict_volume(tiny_model, tiny_phantom.image)
    b = semiseg.predict_volume(loaded, tiny_phantom.image)
    np.testing.assert_array_equal(a["probabilities"], b["probabilities"])


def test_loading_foreign_files_is_clear(tmp_path):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not a napari-semiseg model"):
        Model.load(other)
    text = tmp_path / "x.pt"
    text.write_text(json.dumps({"format": "napari-semiseg-model"}))
    with pytest.raises(ModelFileError, match="not a napari-semiseg model"):
        Model.load(text)
    with pytest.raises(ModelFileError, match="no such model"):
        Model.load(tmp_path / "missing.pt")


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    import torch

    # torch.save pickles arbitrary objects: the file is a valid zip with a malicious pickle.
    torch.save({"format": "napari-semiseg-model", "x": Payload()}, evil, pickle_protocol=2)
    with pytest.raises(ModelFileError, match="refused"):
        Model.load(evil)
    assert not marker.exists()
    # The payload is real: unpickling without the guard runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()
