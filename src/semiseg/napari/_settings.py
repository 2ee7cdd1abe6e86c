"""What the Train dock's form means, without Qt: settings, job, layer choices, button states.

The form (:mod:`._train_form`) reads its widgets into a plain :class:`TrainSettings`; the
functions here turn settings into a job (:func:`make_job`), decide which layers the form
offers (:func:`layer_choices`, :func:`checked_images`), which buttons are enabled
(:func:`button_states`) and what the status line says (:func:`start_text`,
:func:`error_text`, :func:`method_summary`). The widget (:mod:`._train`) only applies them,
so each decision is tested without a display (``tests/test_session.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .. import InputError, Model, TrainConfig
from . import _jobs
from ._layers import is_overlay
from ._session import Running, error_title

__all__ = [
    "LayerChoices",
    "TrainSettings",
    "button_states",
    "checked_images",
    "error_text",
    "export_format",
    "layer_choices",
    "make_job",
    "method_summary",
    "slice_count",
    "slice_span",
    "start_text",
    "suggestion_feed",
]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What the form says, as plain values.

    Attributes
    ----------
    images : tuple of str
        The checked image layers: the input channels, in list order.
    labels : str or None
        The labels layer trained on ("" or None: none chosen).
    method : str
    params : dict
        The method's hyperparameters (``ParamsForm.values()``).
    steps, minutes, batch_size, crop, seed
        The budget (``minutes`` None: no time limit).
    context : int
        Neighbouring slices on each side the network sees with each slice
        (:attr:`semiseg.TrainConfig.context`); a continued model keeps its own.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    preset : str
        Model sizes of a new model: ``"auto"``, ``"cpu"`` or ``"paper"``
        (:data:`semiseg.methods.base.PRESETS`).
    continue_model : bool
        Train on from the current model (False: from scratch).
    tta : bool
        Test-time augmentation for the suggestion list's uncertainty pass.
    """

    images: tuple[str, ...] = ()
    labels: str | None = None
    method: str = "supervised"
    params: dict = dataclasses.field(default_factory=dict)
    steps: int = 300
    minutes: float | None = None
    batch_size: int = 8
    crop: int = 96
    context: int = TrainConfig.context
    seed: int = 0
    device: str = "auto"
    preset: str = "auto"
    continue_model: bool = True
    tta: bool = False

    def config(self, preview_every: float = 2.0, model: Model | None = None) -> TrainConfig:
        """The training budget (a minutes value of 0 means no limit); continuing ``model``
        (the current one, when :attr:`continue_model`), its slice context."""
        continued = model is not None and self.continue_model
        return TrainConfig(
            steps=self.steps,
            minutes=self.minutes or None,
            batch_size=self.batch_size,
            crop=self.crop,
            context=model.context if continued else self.context,
            seed=self.seed,
            preview_every=preview_every,
        )


def make_job(settings: TrainSettings, image, labels=None, tags=None, *, planes=None, train: bool,
             preview_every: float = 2.0, model: Model | None = None) -> _jobs.TrainJob:
    """The job ``settings`` describe (the session adds its folders).

    Parameters
    ----------
    image : (C, Z, Y, X) array-like
        The stacked input channels.
    labels : (Z, Y, X) array-like or None
        The labels layer's data; copied here, so the layer itself is never handed to a job.
        Without labels only prediction is possible (the volume gets empty labels, no tags,
        no uncertainty pass).
    tags : (Z,) int8 array or None
    planes : tuple of (axis, index) or None
        The slices painted in any plane (:mod:`semiseg.napari._planes`); None reads the
        annotated slices off the labels.
    model : Model or None
        The current model: continued (``settings.continue_model``), it keeps its slice context.

    Raises
    ------
    InputError
        Training without a labels layer.
    """
    if train and labels is None:
        raise InputError("choose a labels layer with a few annotated slices")
    has_labels = labels is not None
    if has_labels:
        labels = np.array(labels, copy=True)  # snapshot: the layer is never handed over
    else:
        labels = np.zeros(image.shape[1:], np.uint8)
        tags = planes = None
    return _jobs.TrainJob(
        image=image,
        labels=labels,
        tags=tags,
        planes=planes,
        method=settings.method,
        params=dict(settings.params),
        config=settings.config(preview_every, model),
        device=settings.device,
        preset=settings.preset,
        train=train,
        # The suggestion list's pass runs in the worker too, not in the viewer's process.
        uncertainty=has_labels,
        tta=settings.tta,
    )


@dataclasses.dataclass(frozen=True)
class LayerChoices:
    """The layer names the form offers: input images, labels to train on, labels to export
    (the export list also holds the dock's own overlays, e.g. ``"<image> prediction"``)."""

    images: list[str]
    labels: list[str]
    export: list[str]


def layer_choices(layers: Iterable, image_type: type, labels_type: type) -> LayerChoices:
    """Which of ``layers`` the form offers; overlays are never inputs."""
    layers = list(layers)
    images = [ly.name for ly in layers if isinstance(ly, image_type) and not is_overlay(ly)]
    export = [ly.name for ly in layers if isinstance(ly, labels_type)]
    labels = [ly.name for ly in layers if isinstance(ly, labels_type) and not is_overlay(ly)]
    return LayerChoices(images, labels, export)


def checked_images(names: Sequence[str], checked: Iterable[str]) -> list[bool]:
    """Check state of each offered image after the layer list changed: what was checked stays
    checked; with nothing checked, the first image is."""
    checked = set(checked)
    return [name in checked or (not checked and i == 0) for i, name in enumerate(names)]


def slice_count(layer) -> int:
    """Number of slices (axis -3) of an image layer; 1 for a 2D image."""
    return layer.data.shape[-3] if layer.ndim >= 3 else 1


def slice_span(start, stop, current: int) -> tuple[int, int]:
    """The slices ``(first, last)`` Accept copies: ``start..stop`` in either order, ``start``
    alone when ``stop`` is None, the viewed slice ``current`` when both are None."""
    if start is None:
        start = stop = current
    return tuple(sorted((int(start), int(start if stop is None else stop))))


def method_summary(cls) -> str:
    """One line about a method class: its summary, then what it uses and adds."""
    extra = []
    if cls.uses_tags:
        extra.append("uses weak tags")
    if cls.outputs:
        extra.append("outputs: " + ", ".join(cls.outputs))
    if cls.can_sample:
        extra.append("can sample tumours")
    return cls.summary + (f" ({'; '.join(extra)})" if extra else "")


def button_states(*, busy: bool, model: Model | None, n_runs: int) -> dict[str, bool]:
    """Enabled state of each button (by widget attribute name), plus ``"sample_row"``: whether
    the sampling row is shown (hidden once a model that cannot sample is current)."""
    has_model = model is not None
    can_sample = has_model and bool(model.method.can_sample)
    return {
        "train_button": not busy,
        "predict_button": not busy and has_model,
        "stop_button": busy,
        "sample_button": not busy and can_sample,
        "save_button": has_model,
        "load_button": not busy,
        "rollback_button": not busy and n_runs > 0,
        "continue_check": has_model,
        "sample_row": not has_model or can_sample,
    }


def start_text(running: Running, backend: str) -> str:
    """The status line when a job starts."""
    if running.kind == "sample":
        return f"Sampling {running.job.n} tumours on slice {running.sample_index}..."
    what = "Starting training" if running.kind == "train" else "Starting prediction"
    return what + (" (worker process)" if backend == "process" else " (worker thread)")


def error_text(exc: BaseException, *, has_model: bool) -> str:
    """The status line (and notification) of an error."""
    return f"{error_title(exc)}: {exc}" + (" (the previous model is kept)" if has_model else "")


def suggestion_feed(result: _jobs.JobResult, model: Model | None, model_image: str | None,
                    layer_names: Iterable[str]) -> str | None:
    """What a finished run gives the suggestion list: ``"result"`` (the job's uncertainty
    pass), ``"model"`` (compute the pass) or None (a newer run, or the image layer is gone)."""
    if model is not result.model or model_image not in layer_names:
        return None
    return "result" if result.uncertainty is not None else "model"


def export_format(path) -> str:
    """``"zarr"`` or ``"tiff"`` by the suffix of ``path``.

    Raises
    ------
    InputError
        For any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    raise InputError("export to a .zarr or .tif/.tiff path")
