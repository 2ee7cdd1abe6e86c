"""napari-semiseg: annotation-efficient segmentation of image volumes.

The headless API; it never imports napari or Qt.

>>> import semiseg
>>> s = semiseg.make_sample("phantom", labelled=3)
>>> model = semiseg.train(s.image, s.labels, tags=s.tags, config=semiseg.TrainConfig(steps=5))
>>> out = model.predict(s.image)
>>> out["mask"].shape == s.image.shape
True
"""

__version__ = "0.1.0"

# First, before any module loads torch: idle OpenMP threads sleep instead of spinning, so a
# busy machine does not slow training far beyond a fair share (semiseg.threads, issue 20).
from . import _torchload  # noqa: F401

# isort: split
from . import planes  # noqa: F401 - annotated (axis, index) planes: semiseg.planes.read_planes_csv, ...
from .data import DISEASED, HEALTHY, UNKNOWN, Normaliser, make_pools, read_weak_csv
from .engine import TrainConfig, iter_train, train
from .errors import InputError, ModelFileError, PredictionError, TrainingError
from .inference import iter_predict_volume, predict_volume, sample_tumours
from .io import read_volume, write_volume
from .methods import get_method, list_methods
from .metrics import dice_per_class
from .model import Model, load_model
from .progress import Progress, run
from .synthetic import make_digits, make_head, make_nuclei, make_phantom, make_sample

__all__ = [
    "DISEASED",
    "HEALTHY",
    "UNKNOWN",
    "InputError",
    "Model",
    "ModelFileError",
    "Normaliser",
    "PredictionError",
    "Progress",
    "TrainConfig",
    "TrainingError",
    "__version__",
    "dice_per_class",
    "get_method",
    "iter_predict_volume",
    "iter_train",
    "list_methods",
    "load_model",
    "make_digits",
    "make_head",
    "make_nuclei",
    "make_phantom",
    "make_pools",
    "make_sample",
    "predict_volume",
    "read_volume",
    "read_weak_csv",
    "run",
    "sample_tumours",
    "train",
    "write_volume",
]
