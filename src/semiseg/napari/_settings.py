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

from .. import InputError, Model, TrainConfig, get_method
from . import _jobs
from ._layers import is_overlay
from ._session import Running, error_title

__all__ = [
    "ContinueOffer",
    "LayerChoices",
    "TrainSettings",
    "button_states",
    "check_job",
    "checked_images",
    "continue_offer",
    "error_text",
    "export_format",
    "export_name",
    "export_path",
    "layer_choices",
    "make_job",
    "method_summary",
    "model_text",
    "run_label",
    "slice_count",
    "slice_span",
    "start_mode",
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
        Train on from the current model (False: from scratch); only a model of ``method`` is
        ever continued (:func:`start_mode`).
    refine : bool
        Start a new ``method`` model from the current model's segmentation weights (the
        explicit "Refine the current model with <method>" offer, :func:`continue_offer`).
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
    crop: int | None = TrainConfig.crop
    context: int = TrainConfig.context
    seed: int = 0
    device: str = "auto"
    preset: str = "auto"
    continue_model: bool = True
    refine: bool = False
    tta: bool = False

    def config(self, preview_every: float = 2.0, model: Model | None = None) -> TrainConfig:
        """The training budget (a minutes value of 0 means no limit); continuing or refining
        ``model`` (the current one, :func:`start_mode`), its slice context."""
        continued = start_mode(self, model) != "scratch"
        return TrainConfig(
            steps=self.steps,
            minutes=self.minutes or None,
            batch_size=self.batch_size,
            crop=self.crop,
            context=model.context if continued else self.context,
            seed=self.seed,
            preview_every=preview_every,
        )


def model_text(model: Model | None) -> str:
    """What the current model is, for the line beside the Continue checkbox:
    ``"current model: supervised · 300 steps"`` (steps of its own method's runs; a refined
    model names what it started from)."""
    if model is None:
        return "no model yet: training starts from scratch"
    name = model.method.name
    history = model.history or []
    steps = sum(int(h.get("steps", 0)) for h in history if h.get("method") == name)
    text = f"current model: {name} · {steps} steps"
    before = [h.get("method") for h in history if h.get("method") != name]
    return text + (f" · refined from {before[-1]}" if before else "")


@dataclasses.dataclass(frozen=True)
class ContinueOffer:
    """What the form offers for training after a run.

    Attributes
    ----------
    can_continue : bool
        The chosen method is the current model's: "Continue" may train it on.
    refine : str or None
        The text of the explicit refine offer ("Refine the current model with <method>"),
        or None when it is not offered.
    model_text : str
        :func:`model_text` of the current model.
    """

    can_continue: bool
    refine: str | None
    model_text: str


def continue_offer(method: str, model: Model | None) -> ContinueOffer:
    """Whether the chosen ``method`` can continue the current ``model``, and whether it is
    offered to refine it.

    A model is only ever continued by its own method (continuing a ``supervised`` model
    "with" ``translation`` would train the supervised model on). A semi-supervised method
    chosen after a run of another method whose model has a segmentation U-Net of the same
    dimensionality is offered, explicitly, to start from that model's weights.
    """
    text = model_text(model)
    if model is None or not method:
        return ContinueOffer(False, None, text)
    if method == model.method.name:
        return ContinueOffer(True, None, text)
    cls = get_method(method)
    fits = ("seg" in model.method.nets
            and getattr(cls, "spatial_dims", 2) == getattr(model.method, "spatial_dims", 2))
    refine = f"Refine the current model with {method}" if cls.semi_supervised and fits else None
    return ContinueOffer(False, refine, text)


def start_mode(settings: TrainSettings, model: Model | None) -> str:
    """How Train starts: ``"continue"`` (train the current model on: same method, Continue
    ticked), ``"refine"`` (a new model from its weights: the refine offer taken) or
    ``"scratch"``. Another method never continues a model."""
    offer = continue_offer(settings.method, model)
    if offer.can_continue and settings.continue_model:
        return "continue"
    if offer.refine is not None and settings.refine:
        return "refine"
    return "scratch"


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
    """Which of ``layers`` the form offers; overlays are never inputs. Export offers the
    predictions first (what a user exports), then the other labels layers; never a training
    preview (a one-slice layer)."""
    layers = list(layers)
    images = [ly.name for ly in layers if isinstance(ly, image_type) and not is_overlay(ly)]
    export = [ly.name for ly in layers if isinstance(ly, labels_type) and not ly.name.endswith(" preview")]
    export.sort(key=lambda name: not name.endswith(" prediction"))  # stable: predictions first
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


def button_states(*, busy: bool, model: Model | None, n_runs: int, interruptible: bool = False,
                  method: str | None = None) -> dict[str, bool]:
    """Enabled state of each button (by widget attribute name), plus what is shown:
    ``"sample_row"`` (hidden once a model that cannot sample is current), ``"correct_box"``
    and ``"suggestions_box"`` (only once there is a model: nothing to accept or rank before).

    ``interruptible``: the running job only predicts (e.g. the volume after Stop); Train is
    enabled then, and pressing it cancels that prediction and trains (issue 20 item 4).
    Continue is enabled only for the current model's own ``method`` (None: any)."""
    has_model = model is not None
    can_sample = has_model and bool(model.method.can_sample)
    return {
        "train_button": not busy or interruptible,
        "predict_button": not busy and has_model,
        "stop_button": busy,
        "sample_button": not busy and can_sample,
        "save_button": has_model,
        "load_button": not busy,
        "rollback_button": not busy and n_runs > 0,
        "continue_check": has_model and (method is None or method == model.method.name),
        "sample_row": not has_model or can_sample,
        "correct_box": has_model,
        "suggestions_box": has_model,
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


def check_job(job: _jobs.TrainJob, method_cls, *, axis: int = 0) -> None:
    """The checks the engine would make first, made in the viewer before any worker starts
    (a worker takes seconds to start; issue 20 item 7).

    Labels must fit the image; training needs an annotated slice (or a healthy tag) and,
    for methods that learn from them (:attr:`~semiseg.methods.Method.needs_healthy`), a slice
    tagged healthy. The messages are the engine's own. ``axis``: the training axis (a
    continued model's own).

    Raises
    ------
    InputError
        With one line saying what to fix.
    """
    from ..data import HEALTHY, make_pools, validate_labels

    spatial = tuple(job.image.shape[-3:])
    labels = validate_labels(job.labels, spatial)
    if not job.train:
        return
    make_pools(labels, job.tags, axis=axis, planes=job.planes)
    if method_cls.needs_healthy and (job.tags is None or not (np.asarray(job.tags) == HEALTHY).any()):
        raise InputError(
            f"{method_cls.name} needs slices tagged healthy: tag some tumour-free slices healthy "
            "(Tags dock, Shift-H) or choose another method"
        )


def run_label(info, *, today: str | None = None) -> str:
    """A kept run as the runs list shows it: ``"supervised · 300 steps · 22:01"`` (the date
    is added for runs of another day than ``today``, ``YYYYmmdd``)."""
    stamp = info.run_id[:15]  # YYYYmmdd-HHMMSS
    when = f"{stamp[9:11]}:{stamp[11:13]}" if len(stamp) == 15 and stamp[8] == "-" else info.run_id
    if today is None:
        import time

        today = time.strftime("%Y%m%d")
    if when != info.run_id and stamp[:8] != today:
        when = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {when}"
    return f"{info.method} · {info.steps} steps · {when}"


#: File-dialog filters of the mask export, by format.
EXPORT_FILTERS = {"zarr": "zarr (*.zarr)", "tiff": "TIFF (*.tif *.tiff)"}


def export_name(layer_name: str, fmt: str = "zarr") -> str:
    """Default file name of an exported mask: the layer's name, with ``mask`` added when it
    has none of the words our reader opens as Labels (label, mask, seg)."""
    from ._reader import LABEL_WORDS

    stem = layer_name.strip().replace(" ", "-") or "mask"
    if not any(w in stem.lower() for w in LABEL_WORDS):
        stem += "-mask"
    return stem + (".zarr" if fmt == "zarr" else ".tif")


def export_path(path, selected_filter: str = "") -> str:
    """The path to write: its suffix follows the filter chosen in the file dialog (a
    ``.zarr`` name with the TIFF filter becomes ``.tif``, and back); a path without a known
    suffix gets the filter's."""
    p = Path(path)
    fmt = next((f for f, text in EXPORT_FILTERS.items() if text == selected_filter), None)
    suffix = p.suffix.lower()
    known = suffix in (".zarr", ".tif", ".tiff")
    if fmt is None:
        return str(p if known else p.with_name(p.name + ".zarr"))
    want = ".zarr" if fmt == "zarr" else ".tif"
    if known and export_format(p) == fmt:
        return str(p)
    return str(p.with_suffix(want) if known else p.with_name(p.name + want))


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
