"""The single training loop, written as a generator of :class:`Progress` records.

The GUI, the CLI, benchmarks and tests all drive this same generator: the GUI wraps it in a
worker and stops it by closing it; scripts run it to completion with :func:`run`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable, Generator

import numpy as np
import torch

from . import distributed
from .data import Normaliser, SliceSampler, as_channels, check_context, make_pools, validate_labels
from .device import resolve_device
from .errors import InputError, PredictionError, TrainingError, first_line, is_out_of_memory
from .inference import predict_normalised_slices, predict_normalised_volume
from .methods import get_method
from .methods.base import resolve_preset, state_to_cpu
from .model import Model
from .progress import Progress, progress_bar, run

__all__ = [
    "PredictionError",
    "Progress",
    "TrainConfig",
    "TrainingError",
    "auto_crop",
    "iter_train",
    "resolve_device",
    "run",
    "seed_everything",
    "train",
    "warm_start",
]


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes
    ----------
    steps : int
        Optimisation steps (upper bound when ``minutes`` is set too).
    minutes : float or None
        Wall-clock budget; training stops at whichever of steps/minutes comes first.
    batch_size : int
        Crops per pool per step.
    crop : int or None
        Side of square training crops (and of the prediction windows, see
        :attr:`Model.tile_size`). None (the default) chooses it from the volume with
        :func:`auto_crop`: as much of each slice as a CPU step affords, since an edge defined by
        anatomy (a brain inside its skull) needs the context a small crop of a large slice lacks.
        Training on from a model keeps the model's crop.
    seed : int
        Seeds weights, sampling and augmentation: the same seed gives the same weights.
    axis : int
        Slicing axis of ``(Z, Y, X)``.
    preview_every : float
        Seconds between previews (when a preview slice is given).
    report_every : int
        Steps between progress records without preview.
    clock : {"wall", "process"}
        What ``minutes`` measures: wall-clock time, or this process's CPU time (fair budgets for
        benchmarks that share a machine).
    compile : bool or str
        Compile the networks with :func:`torch.compile` (``True``: the default ``inductor``
        backend; a string names another backend). Off by default: compiling takes a while and
        pays off on GPUs over long runs.
    cache_mb : float
        Memory budget of the normalised-slice cache (LRU), so volumes larger than memory can be
        sampled lazily from zarr/dask.
    anneal : float
        Share of the run, at its end, over which every learning rate falls to zero along a half
        cosine (0 keeps them constant). The run's length is whichever of ``steps`` and
        ``minutes`` binds, so a time budget anneals too. Each call anneals anew: training on
        from a model starts again at the method's learning rate.
    context : int
        Neighbouring slices on each side fed with every slice as extra channels (2.5D input,
        reflected at the volume's ends; see :func:`semiseg.data.context_indices`). It becomes a
        property of the model: training on from a model needs the model's context. Needs at
        least ``context + 1`` slices; methods that generate images take no context.
    """

    steps: int = 300
    minutes: float | None = None
    batch_size: int = 8
    crop: int | None = None
    seed: int = 0
    axis: int = 0
    preview_every: float = 2.0
    report_every: int = 1
    clock: str = "wall"
    compile: bool | str = False
    cache_mb: float = 1024.0
    anneal: float = 0.0
    context: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise InputError("steps must be at least 1")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError("minutes must be positive")
        if self.batch_size < 1 or (self.crop is not None and self.crop < 8):
            raise InputError("batch_size must be >= 1 and crop >= 8")
        if self.axis not in (0, 1, 2):
            raise InputError("axis must be 0, 1 or 2")
        if self.clock not in ("wall", "process"):
            raise InputError("clock must be 'wall' or 'process'")
        if self.cache_mb < 0:
            raise InputError("cache_mb must be >= 0")
        if not 0 <= self.anneal <= 1:
            raise InputError("anneal must be between 0 and 1")
        self.context = check_context(self.context)


#: Largest crop side :func:`auto_crop` chooses for ``supervised`` and 2D methods no costlier: a
#: 160² step costs about 2.8 times a 96² one, which keeps the default run (300 steps) within
#: about 2 CPU-minutes on one thread.
AUTO_CROP_2D = 160
#: The same for 3D methods, whose patches are ``patch_depth`` slices deep.
AUTO_CROP_3D = 96
#: Step budget of a costlier 2D method, as the side of the ``supervised`` crop that costs as
#: much: 141² is 1.22 times a 128² step, 0.5 s where ``supervised`` takes 0.41 s at 128² on one
#: thread (the issue-19 target and measurement, ``benchmarks/train_speed.py``).
COSTLY_STEP_SIDE = 141
#: Smallest automatic crop the step budget may choose: at 80 instead of 96 ``translation`` and
#: ``cyclegan`` lost 0.04 and 0.08 Dice on the phantom at 5 CPU-minutes (issue 19 benchmark), so a
#: method too costly for 96 keeps 96 and its longer step.
MIN_COSTLY_CROP = 96


def auto_crop(slice_shape: tuple[int, int], spatial_dims: int = 2, step_cost: float = 1.0) -> int:
    """Crop side for slices of ``slice_shape`` ``(H, W)``: the smaller side rounded down to a
    multiple of 16 (at least 16), at most a cap.

    nnU-Net sizes its 2D patches to cover the typical slice as far as memory allows; here the
    CPU time of a step is the limit. A 96² crop of a 224² MRI slice sees a part of the head,
    often mostly air, and cannot tell the brain's edge from the scalp's (issue 16 benchmark).

    Parameters
    ----------
    slice_shape : (H, W) tuple of int
    spatial_dims : int
        3 for methods on 3D patches: cap :data:`AUTO_CROP_3D`.
    step_cost : float
        CPU time of the method's step relative to ``supervised``'s at the same crop
        (:attr:`semiseg.methods.base.Method.step_cost`; 1 on a GPU). ``supervised`` and
        methods no costlier are capped at :data:`AUTO_CROP_2D`. A step's time grows with the
        crop's area, so a costlier method is capped at ``COSTLY_STEP_SIDE / sqrt(step_cost)``:
        its step then costs at most what a ``supervised`` step at 141² does (about 0.5 s on
        one thread; issue 19 benchmark), but the cap is never below :data:`MIN_COSTLY_CROP`.
    """
    if spatial_dims == 3:
        cap = AUTO_CROP_3D
    elif step_cost <= 1.0:
        cap = AUTO_CROP_2D
    else:
        cap = max(MIN_COSTLY_CROP, COSTLY_STEP_SIDE / math.sqrt(float(step_cost)))
    return int(max(16, min(cap, min(slice_shape)) // 16 * 16))


def lr_factor(done: float, anneal: float) -> float:
    """Learning-rate multiplier when the share ``done`` of a run is over.

    1 until ``1 - anneal`` of the run, then a half cosine down to 0 at its end.
    """
    start = 1.0 - anneal
    if anneal <= 0 or done <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - start) / anneal)))


def _scale_learning_rates(method, factor: float) -> None:
    # The method's own rate is kept as ``initial_lr`` (torch's scheduler convention), which
    # is saved with the optimiser state.
    for opt in method.opts.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


def _reset_learning_rates(method) -> None:
    """Undo any annealing, including one a model was saved in the middle of (autosave)."""
    for opt in method.opts.values():
        for group in opt.param_groups:
            if "initial_lr" in group:
                group["lr"] = group["initial_lr"]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code that uses the legacy API
    torch.manual_seed(seed)


def _prepare_inputs(image, labels, tags, axis, *, planes=None):
    image = as_channels(image)
    labels = validate_labels(labels, tuple(image.shape[1:]))
    pools = make_pools(labels, tags, axis=axis, planes=planes)
    return image, labels, pools


def iter_train(
    image,
    labels,
    *,
    tags=None,
    method: str | None = None,
    params: dict | None = None,
    config: TrainConfig | None = None,
    model: Model | None = None,
    device: str | torch.device = "auto",
    preview_index: Callable[[], int | None] | None = None,
    amp: bool = True,
    should_stop: Callable[[], bool] | None = None,
    planes=None,
    init_from: Model | None = None,
    preset: str = "auto",
) -> Generator[Progress, None, Model]:
    """Train a model, yielding :class:`Progress`; the generator returns the :class:`Model`.

    Parameters
    ----------
    image : (Z, Y, X) or (C, Z, Y, X) array-like
        Raw image (numpy, dask or zarr); it is never modified.
    labels : (Z, Y, X) integer array
        0 = background/unannotated, 1..K classes. Never modified.
    tags : (n_slices,) array of {-1, 0, 1}, optional
        Weak tags along the slicing axis: unknown / healthy / diseased.
    method : str, optional
        Registered method name (default ``supervised``; with ``model``, the model's method:
        naming another one is refused, as training on would silently train the model's).
    params : dict, optional
        Method hyperparameters.
    config : TrainConfig, optional
    model : Model, optional
        Continue training this model (its method, normalisation and optimiser states are kept).
    init_from : Model, optional
        Start a new ``method`` model from this model's segmentation network (a warm start,
        e.g. a semi-supervised method refining a ``supervised`` model): the new model takes
        its normaliser, axis, slice context, classes and network settings (``features``,
        ``norm``), and a fresh optimiser. See :func:`warm_start`.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``mps``.
    preview_index : callable, optional
        Returns the slice to preview (e.g. the viewer's current slice) or None.
    amp : bool
        Mixed precision on CUDA.
    should_stop : callable, optional
        Checked before every step; when it returns True training ends there and the generator
        returns the model trained so far (a GUI's Stop button). Single-process only.
    planes : sequence of (axis, index) pairs, optional
        Fully annotated slices in any plane (:mod:`semiseg.planes`); see
        :func:`semiseg.data.make_pools`. Slices along the training axis that are not listed
        are unlabelled even when labels painted in another plane cross them. The 2D methods
        train on the listed slices of the training axis; the others are kept in the pools
        (``SlicePools.planes``) and the history (``"planes"``). None: the slices holding labels.
    preset : str
        Model sizes of a new model (:data:`semiseg.methods.base.PRESETS`): ``cpu``, ``paper``,
        or ``auto`` (``paper`` on CUDA, else ``cpu``); ``params`` win over it. The history
        records the preset used (ignored when ``model`` is given).

    Raises
    ------
    InputError
        For unusable inputs, before any training; for ``model`` with another ``method``, or
        an ``init_from`` model whose segmentation network does not fit ``method``.
    TrainingError
        When a step produces a non-finite loss or runs out of memory; the model then holds the
        weights from before that step.
    """
    config = config or TrainConfig()
    method = _check_method_choice(method, model, init_from)
    image, labels, pools = _prepare_inputs(image, labels, tags, config.axis, planes=planes)
    dev = resolve_device(device)
    seed_everything(config.seed)
    # Whose crop a run without one keeps: the continued model's, or the one it starts from.
    continued = model if model is not None else init_from
    used = None if model is not None else resolve_preset(preset, dev)
    if used is not None:
        given = dict(params or {})
        params = get_method(method).preset_params(used, params)
        if init_from is not None:  # the network's sizes are the model's it starts from
            params = {k: v for k, v in params.items() if k in given or k not in ("features", "norm")}
        used = f"{used} (auto: {dev.type})" if preset in (None, "auto") else used
    if init_from is not None:
        model = warm_start(init_from, image, pools, config, method=method, params=params, device=dev, amp=amp)
    model = _start_model(image, pools, config, model=model, method=method, params=params, device=dev, amp=amp)
    method_obj = model.method
    if config.crop is None:  # the model's own crop when training on, else one for this volume
        in_plane = [n for d, n in enumerate(image.shape[1:]) if d != config.axis]
        crop = continued.tile_size if continued is not None and continued.tile_size else None
        cost = method_obj.step_cost if dev.type == "cpu" else 1.0  # a GPU affords the largest crop
        crop = crop or auto_crop(tuple(in_plane), getattr(method_obj, "spatial_dims", 2), cost)
        config = dataclasses.replace(config, crop=int(crop))
    _reset_learning_rates(method_obj)
    # Predict as trained: in windows of the training crop (see Model.tile_size).
    model.tile_size = int(config.crop)
    volumetric = getattr(method_obj, "spatial_dims", 2) == 3
    if volumetric:  # and 3D methods in windows of the training patch (Model.volume_window)
        depth = method_obj.patch_depth
        if depth > image.shape[config.axis + 1]:
            raise InputError(
                f"patch depth {depth} of the model exceeds the {image.shape[config.axis + 1]} slices "
                f"of the volume along axis {config.axis}"
            )
        model.window_size = (depth, int(config.crop), int(config.crop))
    if config.compile:
        _compile_nets(method_obj, config.compile)
    multi = distributed.is_active()
    if multi:  # identical start on every rank, averaged gradients, a sampling stream per rank
        distributed.broadcast_parameters(method_obj)
        torch.manual_seed(distributed.rank_seed(config.seed))
    sampler = _make_sampler(image, labels, pools, model, config)
    rng = np.random.default_rng(distributed.rank_seed(config.seed))
    needs = method_obj.batch_needs(config.batch_size)
    budget = _Budget(config, multi)
    start = time.perf_counter()
    smoothed: dict[str, float] = {}
    last_preview = -math.inf
    good_state = state_to_cpu(method_obj.state_dict(), copy=True)
    step = 0
    yield Progress(0, config.steps, {}, 0.0)
    try:
        with method_obj.synchronised(distributed.all_reduce_gradients if multi else None):
            while step < config.steps and not budget.spent() and not (should_stop is not None and should_stop()):
                arrays = _sample(sampler, rng, needs)
                method_obj.progress = min(1.0, budget.done(step))
                if config.anneal:
                    _scale_learning_rates(method_obj, lr_factor(method_obj.progress, config.anneal))
                losses, needs = _guarded_step(
                    method_obj, arrays, good_state, step=step, needs=needs, config=config, device=dev, multi=multi
                )
                if losses is None:  # out of memory: the batch was halved, try again
                    continue
                step += 1
                method_obj.step += 1
                for k, v in losses.items():
                    smoothed[k] = v if k not in smoothed else 0.9 * smoothed[k] + 0.1 * v
                if multi:
                    distributed.broadcast_buffers(method_obj)
                if step % 50 == 0:
                    good_state = state_to_cpu(method_obj.state_dict(), copy=True)
                now = time.perf_counter()
                preview = idx = None
                if preview_index is not None and now - last_preview >= config.preview_every:
                    idx = preview_index()
                    if idx is not None:
                        if volumetric:
                            preview = preview_slab(model, sampler, int(idx))
                        else:
                            preview = preview_slice(model, sampler.slice_image(int(idx)))
                        last_preview = time.perf_counter()
                if preview is not None or step % config.report_every == 0 or step == config.steps:
                    yield Progress(step, config.steps, dict(smoothed), now - start, preview=preview, preview_index=idx)
    finally:
        _reset_learning_rates(method_obj)
        good_state = None
        if dev.type == "cuda":  # hand cached activations back to the driver
            torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        record = _history_record(model, pools, config, dev, steps=step, seconds=seconds, losses=smoothed)
        if used is not None:
            record["preset"] = used
        model.history.append(record)
    return model


def _check_method_choice(method: str | None, model: Model | None, init_from: Model | None) -> str:
    """The method a run trains: ``method``, else the continued model's, else ``supervised``.

    Raises
    ------
    InputError
        For both ``model`` and ``init_from``, or a continued ``model`` of another method.
    """
    if model is not None and init_from is not None:
        raise InputError("give either model (continue it) or init_from (start a new model from it), not both")
    if model is None:
        return method or "supervised"
    if method is not None and method != model.method.name:
        raise InputError(
            f"the model was trained with {model.method.name!r}: continuing it with {method!r} would train "
            f"{model.method.name!r}; start a {method!r} model from its weights with init_from (CLI --init-from)"
        )
    return model.method.name


def warm_start(init_from: Model, image, pools, config: TrainConfig, *, method: str, params: dict | None,
               device, amp: bool) -> Model:
    """A new ``method`` model whose segmentation network starts from ``init_from``'s.

    The new model takes ``init_from``'s normaliser, axis, slice context and classes, and its
    network settings (``features``, ``norm``) unless ``params`` names them; its other
    networks (a mean teacher's teacher is a copy of the student) and its optimiser start
    anew (:meth:`~semiseg.methods.base.Method.start_from`). Its history keeps
    ``init_from``'s runs, so the model says what it was refined from.

    Raises
    ------
    InputError
        When ``init_from`` does not fit the image, labels, axis or context, when ``params``
        asks for other network settings, or when the two segmentation networks differ.
    """
    source = init_from.method
    _check_fits(init_from, image, pools, config, what="the init_from model")
    method_cls = get_method(method)
    if "seg" not in source.nets:
        raise InputError(f"a {source.name!r} model has no segmentation network to start {method!r} from")
    params = dict(params or {})
    for key in ("features", "norm"):
        mine = getattr(source.params, key, None)
        if mine is None:
            continue
        if key in params:
            theirs = method_cls.parse_params({key: params[key]}).__dict__[key]
            if theirs != mine:
                raise InputError(f"init_from model has {key} {mine}, not {theirs}: leave {key} out to keep the model's")
        params[key] = mine
    if getattr(method_cls, "spatial_dims", 2) != getattr(source, "spatial_dims", 2):
        raise InputError(f"cannot start {method!r} from a {source.name!r} model: one is 2D, the other 3D")
    try:
        net = method_cls(source.in_channels, source.num_classes, params=params, device=device, amp=amp)
    except ValueError as exc:
        raise InputError(first_line(exc)) from None
    try:
        net.start_from(source.nets["seg"].state_dict())
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"cannot start {method!r} from a {source.name!r} model: their segmentation networks differ "
            f"({first_line(exc)[:160]})"
        ) from None
    model = Model(net, init_from.normaliser, init_from.axis, context=init_from.context)
    model.history = [dict(h) for h in init_from.history]
    return model


def _check_fits(model: Model, image, pools, config: TrainConfig, *, what: str = "model") -> None:
    """Raise InputError unless ``model`` fits the image's channels, the labels' classes and
    the run's axis and slice context."""
    context = check_context(config.context, image.shape[config.axis + 1])
    if model.in_channels != image.shape[0]:
        raise InputError(f"{what} expects {model.in_channels} channel(s), the image has {image.shape[0]}")
    if pools.num_classes > model.num_classes:
        raise InputError(f"labels hold {pools.num_classes - 1} classes, {what} has {model.num_classes - 1}")
    if model.axis != config.axis:
        raise InputError(f"{what} was trained along axis {model.axis}, not {config.axis}")
    if model.context != context:
        raise InputError(f"{what} was trained with context {model.context}, not {context}")


def _start_model(image, pools, config: TrainConfig, *, model, method, params, device, amp) -> Model:
    """A new model fitted to ``image`` (its normaliser, a fresh ``method``), or ``model``
    checked against the inputs when training continues.

    Raises
    ------
    InputError
        On an unreadable image, a context the image is too short for, or a model that does not
        fit the image, labels, axis or context.
    """
    context = check_context(config.context, image.shape[config.axis + 1])
    if model is not None:
        _check_fits(model, image, pools, config, what="the model")
        return model
    try:
        normaliser = Normaliser.fit(image)
    except InputError:
        raise
    except Exception as exc:  # corrupt chunks of lazy (zarr) images
        raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
    method_cls = get_method(method)
    if getattr(method_cls, "spatial_dims", 2) == 3:  # the patch and network fit the volume
        if context:
            raise InputError(f"method {method!r} sees 3D patches and takes no slice context (use context 0)")
        params = method_cls.resolve_params(params, tuple(image.shape[1:]), config.axis)
    if context and (method_cls.outputs or method_cls.can_sample):
        raise InputError(f"method {method!r} generates images and takes no slice context (use context 0)")
    num_classes = max(2, pools.num_classes)
    net = method_cls(image.shape[0] * (2 * context + 1), num_classes, params=params, device=device, amp=amp)
    return Model(net, normaliser, config.axis, context=context)


def sampler_planes(pools, axis: int) -> list[tuple[int, int]]:
    """The fully annotated planes a 3D method's loss covers (:mod:`semiseg.patches`).

    The planes the user gave (``pools.planes``, any axis: an axial, coronal or sagittal slice
    weights its own voxels), plus the annotated slices along the training axis (the painted
    ones when no planes were given, and the healthy-tagged ones), sorted.
    """
    planes = {(int(axis), int(i)) for i in pools.annotated}
    if pools.planes is not None:
        planes |= {(int(a), int(i)) for a, i in pools.planes}
    return sorted(planes)


def _make_sampler(image, labels, pools, model: Model, config: TrainConfig):
    """Training sampler: 2D crops from the slice pools, or for 3D methods ``(D, H, W)``
    patches through the annotated planes (:class:`semiseg.patches.PatchSampler`)."""
    cache_bytes = int(config.cache_mb * 2**20)
    if getattr(model.method, "spatial_dims", 2) == 3:
        from .patches import PatchSampler

        return PatchSampler(
            image, labels, sampler_planes(pools, config.axis), model.normaliser, axis=config.axis,
            patch=model.window_size, cache_bytes=cache_bytes,
        )
    return SliceSampler(
        image, labels, pools, model.normaliser, axis=config.axis, crop=config.crop, cache_bytes=cache_bytes,
        context=model.context,
    )


class _Budget:
    """The run's time budget: ``config.minutes`` on its clock, agreed by every rank."""

    def __init__(self, config: TrainConfig, multi: bool):
        self.config, self.multi = config, multi
        self.clock = time.perf_counter if config.clock == "wall" else time.process_time
        self.start = self.clock()
        self.deadline = self.start + 60 * config.minutes if config.minutes else math.inf

    def spent(self) -> bool:
        """Whether time is up (on any rank: all ranks stop at the same step)."""
        if self.multi and self.deadline < math.inf:
            return distributed.any_true(self.clock() >= self.deadline)
        return self.clock() >= self.deadline

    def done(self, step: int) -> float:
        """Share of the run that is over after ``step`` steps: of the steps or of the minutes,
        whichever is further (one value for every rank)."""
        done = step / self.config.steps
        if self.config.minutes:
            done = max(done, (self.clock() - self.start) / (60 * self.config.minutes))
        if self.multi:  # one schedule for every rank
            done = distributed.max_value(done)
        return done


def _sample(sampler: SliceSampler, rng: np.random.Generator, needs: dict[str, int]) -> dict:
    """One batch of crops (numpy); faults reading the image are the user's input."""
    try:
        return sampler.sample(rng, needs)
    except InputError:
        raise
    except Exception as exc:  # corrupt chunks of lazy (zarr) images show up here
        raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None


def _guarded_step(
    method, arrays: dict, good_state, *, step: int, needs: dict[str, int], config: TrainConfig, device, multi: bool
):
    """One optimisation step on ``arrays`` that never leaves the model broken.

    Returns ``(losses, needs)``; ``losses`` is None when the step ran out of memory and the
    batch was halved (``needs``) to try again.

    Raises
    ------
    InputError
        When the method finds the inputs unusable (e.g. no healthy slices).
    TrainingError
        On any other fault, out of memory at batch size 1 (or on several ranks) and a
        non-finite loss; the model then holds ``good_state``.
    """
    batch = {k: method.to_tensor(v) for k, v in arrays.items()}
    try:
        losses = method.training_step(batch)
    except Exception as exc:
        # Any fault in a step (a bug, out of memory, a driver error) leaves the model
        # with its last good weights and surfaces as one TrainingError.
        method.load_state_dict(good_state)
        if isinstance(exc, InputError):
            raise  # the method found the inputs unusable (e.g. no healthy slices)
        if not is_out_of_memory(exc):
            raise TrainingError(
                f"training step {step + 1} failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if multi:  # ranks must take the same steps: no per-rank batch halving
            raise TrainingError(
                f"out of memory on rank {distributed.rank()}; use a smaller --batch-size"
            ) from None
        if needs and max(needs.values()) > 1:
            needs = {k: max(1, v // 2) for k, v in needs.items()}
            warnings.warn(f"out of memory: batch halved to {needs}", stacklevel=1)
            return None, needs
        raise TrainingError(
            f"out of memory even with batch size 1 (crop {config.crop}); "
            "use a smaller --crop or smaller features"
        ) from None
    if not all(math.isfinite(v) for v in losses.values()):
        method.load_state_dict(good_state)
        bad = ", ".join(k for k, v in losses.items() if not math.isfinite(v))
        raise TrainingError(f"training diverged at step {step + 1} (non-finite loss: {bad})")
    return losses, needs


def _history_record(
    model: Model, pools, config: TrainConfig, device, *, steps: int, seconds: float, losses: dict
) -> dict:
    """What :attr:`Model.history` keeps of one training run."""
    return {
        "method": model.method.name,
        "steps": steps,
        "seconds": round(seconds, 2),
        "losses": {k: round(v, 5) for k, v in losses.items()},
        "annotated_slices": [int(i) for i in pools.annotated],
        **({} if pools.planes is None else {"planes": [[a, i] for a, i in pools.planes]}),
        "tagged_healthy": len(pools.healthy),
        "tagged_diseased": len(pools.diseased),
        "config": dataclasses.asdict(config),
        "device": str(device),
    }


def _compile_nets(method, backend: bool | str) -> None:
    """Compile every network of ``method`` in place (state-dict keys are unchanged)."""
    kwargs = {} if backend is True else {"backend": str(backend)}
    for net in method.nets.values():
        if not getattr(net, "_compiled_call_impl", None):
            net.compile(**kwargs)


def preview_slice(model: Model, normalised: np.ndarray) -> np.ndarray:
    """Predicted ``(H, W)`` mask of one normalised ``(C * (2 context + 1), H, W)`` slice with
    its context (:meth:`SliceSampler.slice_image`)."""
    return predict_normalised_slices(model.method, normalised[None], tile_size=model.tile_size)["mask"][0]


def preview_slab(model: Model, sampler, index: int) -> np.ndarray:
    """Predicted ``(H, W)`` mask of slice ``index`` for a 3D method: a slab of window depth
    around it (normalised slices from ``sampler.slice_image``) is predicted in 3D windows and
    its slice ``index`` returned."""
    n = sampler.labels.shape[0]
    window = model.volume_window()
    depth = min(n, window[0] if window else n)
    lo = int(np.clip(index - depth // 2, 0, n - depth))
    slab = np.stack([sampler.slice_image(i) for i in range(lo, lo + depth)], axis=1)
    return predict_normalised_volume(model.method, slab[None], window=window)["mask"][0, index - lo]


def train(image, labels, **kwargs) -> Model:
    """Train to completion; same arguments as :func:`iter_train`, plus ``progress`` (bool)."""
    show = kwargs.pop("progress", False)
    gen = iter_train(image, labels, **kwargs)
    if not show:
        return run(gen)
    config = kwargs.get("config") or TrainConfig()
    with progress_bar(config.steps) as update:
        return run(gen, update)
