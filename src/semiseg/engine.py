"""The single training loop, written as a generator of :class:`Progress` records.

The GUI, the CLI, benchmarks and tests all drive this same generator: the GUI wraps it in a
worker and stops it by closing it; scripts run it to completion with :func:`run`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from .data import InputError, Normaliser, SliceSampler, as_channels, make_pools, validate_labels
from .methods import get_method
from .model import Model

__all__ = [
    "PredictionError",
    "Progress",
    "TrainConfig",
    "TrainingError",
    "iter_train",
    "resolve_device",
    "run",
    "seed_everything",
    "train",
]


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss, out of memory); the model keeps its last
    good weights."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report of a long job.

    Attributes
    ----------
    step : int
        Steps (or slices, for prediction) done.
    total : int or None
        Planned steps; None when bounded by time only.
    losses : dict of str to float
        Named losses of the last step (smoothed); names double as plot keys.
    elapsed : float
        Seconds since the job started.
    phase : str
        ``"train"`` or ``"predict"``.
    preview : (Y, X) ndarray or None
        Predicted mask of the preview slice, when one was computed at this step.
    preview_index : int or None
        The slice that ``preview`` shows.
    """

    step: int
    total: int | None
    losses: dict[str, float]
    elapsed: float
    phase: str = "train"
    preview: np.ndarray | None = None
    preview_index: int | None = None

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.step / self.total)


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
    crop : int
        Side of square training crops.
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
    """

    steps: int = 300
    minutes: float | None = None
    batch_size: int = 8
    crop: int = 96
    seed: int = 0
    axis: int = 0
    preview_every: float = 2.0
    report_every: int = 1
    clock: str = "wall"
    compile: bool | str = False
    cache_mb: float = 1024.0
    anneal: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise InputError("steps must be at least 1")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError("minutes must be positive")
        if self.batch_size < 1 or self.crop < 8:
            raise InputError("batch_size must be >= 1 and crop >= 8")
        if self.axis not in (0, 1, 2):
            raise InputError("axis must be 0, 1 or 2")
        if self.clock not in ("wall", "process"):
            raise InputError("clock must be 'wall' or 'process'")
        if self.cache_mb < 0:
            raise InputError("cache_mb must be >= 0")
        if not 0 <= self.anneal <= 1:
            raise InputError("anneal must be between 0 and 1")


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


class PredictionError(TrainingError):
    """Prediction stopped on a fault (out of memory even one slice at a time, non-finite
    output, an error in the network); nothing was written."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports exhausted GPU or host memory."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened for one-line reports."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else MPS, else CPU; errors for unavailable devices."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("MPS was requested but is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code that uses the legacy API
    torch.manual_seed(seed)


def _prepare_inputs(image, labels, tags, axis, channel_axis=None):
    image = as_channels(image, channel_axis=channel_axis)
    labels = validate_labels(labels, tuple(image.shape[1:]))
    pools = make_pools(labels, tags, axis=axis)
    return image, labels, pools


def iter_train(
    image,
    labels,
    *,
    tags=None,
    method: str = "supervised",
    params: dict | None = None,
    config: TrainConfig | None = None,
    model: Model | None = None,
    device: str | torch.device = "auto",
    preview_index: Callable[[], int | None] | None = None,
    amp: bool = True,
    should_stop: Callable[[], bool] | None = None,
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
    method : str
        Registered method name (ignored when ``model`` is given).
    params : dict, optional
        Method hyperparameters.
    config : TrainConfig, optional
    model : Model, optional
        Continue training this model (its normalisation is kept).
    device : str
        ``auto``, ``cpu``, ``cuda``, ``mps``.
    preview_index : callable, optional
        Returns the slice to preview (e.g. the viewer's current slice) or None.
    amp : bool
        Mixed precision on CUDA.
    should_stop : callable, optional
        Checked before every step; when it returns True training ends there and the generator
        returns the model trained so far (a GUI's Stop button). Single-process only.

    Raises
    ------
    InputError
        For unusable inputs, before any training.
    TrainingError
        When a step produces a non-finite loss or runs out of memory; the model then holds the
        weights from before that step.
    """
    config = config or TrainConfig()
    image, labels, pools = _prepare_inputs(image, labels, tags, config.axis)
    dev = resolve_device(device)
    seed_everything(config.seed)
    if model is None:
        try:
            normaliser = Normaliser.fit(image)
        except InputError:
            raise
        except Exception as exc:  # corrupt chunks of lazy (zarr) images
            raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
        method_cls = get_method(method)
        if getattr(method_cls, "spatial_dims", 2) == 3:  # the patch and network fit the volume
            params = method_cls.resolve_params(params, tuple(image.shape[1:]), config.axis)
        num_classes = max(2, pools.num_classes)
        net = method_cls(image.shape[0], num_classes, params=params, device=dev, amp=amp)
        model = Model(net, normaliser, config.axis)
    else:
        if model.in_channels != image.shape[0]:
            raise InputError(
                f"model expects {model.in_channels} channel(s), the image has {image.shape[0]}"
            )
        if pools.num_classes > model.num_classes:
            raise InputError(
                f"labels hold {pools.num_classes - 1} classes, the model has {model.num_classes - 1}"
            )
        if model.axis != config.axis:
            raise InputError(f"model was trained along axis {model.axis}, not {config.axis}")
    method_obj = model.method
    _reset_learning_rates(method_obj)
    # Predict as trained: in windows of the training crop (see Method.tile_size).
    method_obj.tile_size = int(config.crop)
    volumetric = getattr(method_obj, "spatial_dims", 2) == 3
    if volumetric:
        depth = method_obj.patch_depth
        if depth > image.shape[config.axis + 1]:
            raise InputError(
                f"patch depth {depth} of the model exceeds the {image.shape[config.axis + 1]} slices "
                f"of the volume along axis {config.axis}"
            )
        method_obj.window_size = (depth, int(config.crop), int(config.crop))
    if config.compile:
        _compile_nets(method_obj, config.compile)
    from . import distributed

    multi = distributed.is_active()
    if multi:  # identical start on every rank, averaged gradients, a sampling stream per rank
        distributed.broadcast_parameters(method_obj)
        method_obj.grad_sync = distributed.all_reduce_gradients
        torch.manual_seed(distributed.rank_seed(config.seed))
    if volumetric:
        from .patches import PatchSampler

        sampler = PatchSampler(
            image, labels, [(config.axis, int(i)) for i in pools.annotated], model.normaliser,
            axis=config.axis, patch=method_obj.window_size, cache_bytes=int(config.cache_mb * 2**20),
        )
    else:
        sampler = SliceSampler(
            image, labels, pools, model.normaliser, axis=config.axis, crop=config.crop,
            cache_bytes=int(config.cache_mb * 2**20),
        )
    rng = np.random.default_rng(distributed.rank_seed(config.seed))
    needs = method_obj.batch_needs(config.batch_size)
    start = time.perf_counter()
    clock = time.perf_counter if config.clock == "wall" else time.process_time
    clock_start = clock()
    deadline = clock_start + 60 * config.minutes if config.minutes else math.inf
    smoothed: dict[str, float] = {}
    last_preview = -math.inf
    good_state = _snapshot(method_obj.state_dict())
    step = 0
    yield Progress(0, config.steps, {}, 0.0)
    try:
        while step < config.steps and not (
            distributed.any_true(clock() >= deadline) if multi and deadline < math.inf else clock() >= deadline
        ) and not (should_stop is not None and should_stop()):
            try:
                arrays = sampler.sample(rng, needs)
            except InputError:
                raise
            except Exception as exc:  # corrupt chunks of lazy (zarr) images show up here
                raise InputError(f"cannot read the image: {type(exc).__name__}: {first_line(exc)}") from None
            batch = {k: method_obj.to_tensor(v) for k, v in arrays.items()}
            if config.anneal:
                done = step / config.steps
                if config.minutes:
                    done = max(done, (clock() - clock_start) / (60 * config.minutes))
                if multi:  # one schedule for every rank
                    done = distributed.max_value(done)
                _scale_learning_rates(method_obj, lr_factor(done, config.anneal))
            try:
                losses = method_obj.training_step(batch)
            except Exception as exc:
                # Any fault in a step (a bug, out of memory, a driver error) leaves the model
                # with its last good weights and surfaces as one TrainingError.
                method_obj.load_state_dict(good_state)
                if isinstance(exc, InputError):
                    raise  # the method found the inputs unusable (e.g. no healthy slices)
                if not is_out_of_memory(exc):
                    raise TrainingError(
                        f"training step {step + 1} failed: {type(exc).__name__}: {first_line(exc)}"
                    ) from exc
                del batch
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if multi:  # ranks must take the same steps: no per-rank batch halving
                    raise TrainingError(
                        f"out of memory on rank {distributed.rank()}; use a smaller --batch-size"
                    ) from None
                if needs and max(needs.values()) > 1:
                    needs = {k: max(1, v // 2) for k, v in needs.items()}
                    import warnings

                    warnings.warn(f"out of memory: batch halved to {needs}", stacklevel=1)
                    continue
                raise TrainingError(
                    f"out of memory even with batch size 1 (crop {config.crop}); "
                    "use a smaller --crop or smaller features"
                ) from None
            if not all(math.isfinite(v) for v in losses.values()):
                method_obj.load_state_dict(good_state)
                bad = ", ".join(k for k, v in losses.items() if not math.isfinite(v))
                raise TrainingError(f"training diverged at step {step + 1} (non-finite loss: {bad})")
            step += 1
            method_obj.step += 1
            for k, v in losses.items():
                smoothed[k] = v if k not in smoothed else 0.9 * smoothed[k] + 0.1 * v
            if multi:
                distributed.broadcast_buffers(method_obj)
            if step % 50 == 0:
                good_state = _snapshot(method_obj.state_dict())
            now = time.perf_counter()
            preview = idx = None
            if preview_index is not None and now - last_preview >= config.preview_every:
                idx = preview_index()
                if idx is not None and volumetric:
                    preview = preview_slab(model, sampler, int(idx))
                elif idx is not None:
                    preview = preview_slice(model, sampler.slice_image(int(idx)))
                    last_preview = time.perf_counter()
            if preview is not None or step % config.report_every == 0 or step == config.steps:
                yield Progress(step, config.steps, dict(smoothed), now - start, preview=preview, preview_index=idx)
    finally:
        method_obj.grad_sync = None
        _reset_learning_rates(method_obj)
        good_state = None
        if dev.type == "cuda":  # hand cached activations back to the driver
            torch.cuda.empty_cache()
        model.history.append(
            {
                "method": method_obj.name,
                "steps": step,
                "seconds": round(time.perf_counter() - start, 2),
                "losses": {k: round(v, 5) for k, v in smoothed.items()},
                "annotated_slices": [int(i) for i in pools.annotated],
                "tagged_healthy": len(pools.healthy),
                "tagged_diseased": len(pools.diseased),
                "config": dataclasses.asdict(config),
                "device": str(dev),
            }
        )
    return model


def _snapshot(state):
    """A copy of a state dict with every tensor on the CPU (keeps GPU memory for training)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_snapshot(v) for v in state)
    return copy.deepcopy(state)


def _compile_nets(method, backend: bool | str) -> None:
    """Compile every network of ``method`` in place (state-dict keys are unchanged)."""
    kwargs = {} if backend is True else {"backend": str(backend)}
    for net in method.nets.values():
        if not getattr(net, "_compiled_call_impl", None):
            net.compile(**kwargs)


def preview_slice(model: Model, normalised: np.ndarray) -> np.ndarray:
    """Predicted ``(H, W)`` mask of one normalised ``(C, H, W)`` slice."""
    from .inference import predict_normalised_slices

    return predict_normalised_slices(model.method, normalised[None])["mask"][0]


def preview_slab(model: Model, sampler, index: int) -> np.ndarray:
    """Predicted ``(H, W)`` mask of slice ``index`` for a 3D method: a slab of window depth
    around it (normalised slices from ``sampler.slice_image``) is predicted in 3D windows and
    its slice ``index`` returned."""
    from .inference import predict_normalised_volume

    n = sampler.labels.shape[0]
    depth = min(n, model.method.window()[0] if model.method.window() else n)
    lo = int(np.clip(index - depth // 2, 0, n - depth))
    slab = np.stack([sampler.slice_image(i) for i in range(lo, lo + depth)], axis=1)
    return predict_normalised_volume(model.method, slab[None])["mask"][0, index - lo]


def run(gen: Generator[Any, None, Any], callback: Callable[[Any], None] | None = None):
    """Drive a progress generator to completion and return its result."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(item)


def train(image, labels, **kwargs) -> Model:
    """Train to completion; same arguments as :func:`iter_train`, plus ``progress`` (bool)."""
    show = kwargs.pop("progress", False)
    gen = iter_train(image, labels, **kwargs)
    if not show:
        return run(gen)
    from tqdm.auto import tqdm

    config = kwargs.get("config") or TrainConfig()
    with tqdm(total=config.steps, unit="step") as bar:

        def update(p: Progress):
            bar.n = p.step
            bar.set_postfix({k: f"{v:.3f}" for k, v in p.losses.items()}, refresh=False)
            bar.refresh()

        return run(gen, update)
