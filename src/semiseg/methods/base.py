"""The one interface every training method implements, and the method registry."""

from __future__ import annotations

import abc
import contextlib
import copy as _copy
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "BUILTIN_MODULES",
    "PRESETS",
    "Method",
    "MethodParams",
    "get_method",
    "list_methods",
    "predictive_entropy",
    "register_method",
    "resolve_preset",
    "set_requires_grad",
    "state_to_cpu",
]

#: Built-in method modules, in the order the CLI and the widget list them.
BUILTIN_MODULES = (
    "supervised",
    "self_training",
    "autoencoder",
    "mean_teacher",
    "entropy_min",
    "mutual_info",
    "translation",
    "cyclegan",
    "pyramid_gan",
    "semantic_gan",
    "unet3d",
)

#: Named model sizes every method offers: ``cpu`` (the defaults, sized for a laptop CPU:
#: <= 0.5 s per step with one thread, 128^2, batch 8) and ``paper`` (the paper's sizes, for a
#: GPU). ``auto`` (see :func:`resolve_preset`) picks ``paper`` on CUDA and ``cpu`` elsewhere.
PRESETS = ("cpu", "paper")

_loaded = False


def _load_builtin_methods() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``.

    Raises
    ------
    ValueError
        When the name is already taken by another class.
    """
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of every registered method: built-ins in their listed order, then the others."""
    _load_builtin_methods()
    order = {f"{__package__}.{m}": i for i, m in enumerate(BUILTIN_MODULES)}
    # Tests or users may import a method module before the registry: order does not follow.
    return sorted(_REGISTRY, key=lambda n: order.get(_REGISTRY[n].__module__, len(order)))


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name``.

    Raises
    ------
    KeyError
        For unknown names (the message lists the known ones).
    """
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def memory_format_for(net: nn.Module, device_type: str) -> torch.memory_format:
    """The memory layout a network's weights take on a device of type ``device_type``.

    A network that declares its own ``memory_format`` attribute keeps it (3D networks: 2D
    ``channels_last`` does not apply to 5-D weights, and ``channels_last_3d`` speeds up oneDNN's
    3D convolutions on the CPU too). Otherwise ``channels_last`` on CUDA, where it speeds up
    convolutions with tensor cores, and contiguous elsewhere, where it only slows the CPU path.
    """
    own = getattr(net, "memory_format", None)
    if own is not None:
        return own
    return torch.channels_last if device_type == "cuda" else torch.contiguous_format


@dataclasses.dataclass
class MethodParams:
    """Hyperparameters shared by all methods; each method extends this dataclass."""

    lr: float = 1e-3
    features: tuple[int, ...] = (16, 32, 64, 128)


class Method(abc.ABC):
    """A segmentation method: owns its networks and optimisers and trains one step at a time.

    Subclasses set the class attributes, build networks in :meth:`build` and implement
    :meth:`training_step` and :meth:`predict`.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Classes including background (``K + 1``).
    params : dict or MethodParams, optional
        Hyperparameters; unknown keys raise ``ValueError``.
    device : str or torch.device
        Where networks live.
    amp : bool
        Use automatic mixed precision on CUDA (bf16 where supported, else fp16 with a scaler).
    """

    #: Registry name.
    name: ClassVar[str]
    #: One-line description for the CLI and the widget.
    summary: ClassVar[str]
    #: Paper the method follows.
    reference: ClassVar[str] = ""
    #: Hyperparameter dataclass.
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: Extra image outputs of :meth:`predict` besides ``probabilities``: name -> ``"image"``
    #: (intensities, e.g. a healthy translation) or ``"difference"`` (e.g. a residual).
    outputs: ClassVar[dict[str, str]] = {}
    #: Whether :meth:`sample_tumours` is implemented.
    can_sample: ClassVar[bool] = False
    #: Whether the method learns from weak healthy/diseased tags.
    uses_tags: ClassVar[bool] = False
    #: Whether training fails without slices tagged healthy (checked before a job starts).
    needs_healthy: ClassVar[bool] = False
    #: Preset name -> overrides of the ``Params`` defaults (see :data:`PRESETS`). The defaults
    #: are the ``cpu`` preset; a method whose defaults already are the paper's leaves
    #: ``paper`` out (it then means the defaults).
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: 2: networks see single slices ``(B, C, H, W)``; 3: they see ``(B, C, D, H, W)`` patches
    #: (the engine then samples 3D patches and prediction slides 3D windows).
    spatial_dims: ClassVar[int] = 2
    #: CPU time of a training step relative to ``supervised``'s at the same crop and batch (one
    #: thread, measured by ``benchmarks/train_speed.py``, issue 19): the automatic crop on the
    #: CPU shrinks with it so the method's step stays within about 0.5 s, down to a floor of
    #: 96 (:func:`semiseg.engine.auto_crop`; a costlier step stays longer).
    step_cost: ClassVar[float] = 1.0
    #: Whether the method learns from unannotated slices on top of a supervised loss on its
    #: ``seg`` U-Net (so it can refine a model of another method: ``iter_train(init_from=)``).
    semi_supervised: ClassVar[bool] = False
    #: Hyperparameters older versions had and this one dropped, each with what replaced it:
    #: model files that still store them load (:meth:`semiseg.model.Model.load` drops them);
    #: given anew they are refused with that hint.
    retired_params: ClassVar[dict[str, str]] = {}
    #: Values that model files written before a hyperparameter existed meant by its absence
    #: (the behaviour of that version), where they differ from today's defaults
    #: (:meth:`semiseg.model.Model.load` fills them in).
    legacy_params: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        params: dict | MethodParams | None = None,
        device: str | torch.device = "cpu",
        amp: bool = True,
    ):
        if num_classes < 2:
            raise ValueError("num_classes counts background: it must be at least 2")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.params = self.parse_params(params)
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self._scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.step = 0
        #: Share of the current training run that is over, in [0, 1]: of its steps or of its
        #: minutes, whichever binds (set by the engine before every step). Loss weights and
        #: schedules follow it, so a run behaves the same under a step and a time budget.
        self.progress = 0.0
        self._grad_sync: Callable[[torch.optim.Optimizer], None] | None = None
        self.nets: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.build()
        for key, net in self.nets.items():
            self.nets[key] = self._place(net)
        self.make_optimizers()

    def warming_up(self, share: float) -> bool:
        """Whether the run is still in its first ``share`` (of :attr:`progress`): a method with
        a warm-up phase trains on its supervised loss alone until then, so its other losses
        refine a model that already segments."""
        return self.progress < share

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse_params(cls, params: dict | MethodParams | None) -> MethodParams:
        """Validate and return hyperparameters as the method's ``Params`` dataclass."""
        if params is None:
            return cls.Params()
        if isinstance(params, cls.Params):
            return params
        if isinstance(params, MethodParams):
            params = dataclasses.asdict(params)
        names = {f.name for f in dataclasses.fields(cls.Params)}
        retired = [k for k in params if k in cls.retired_params]
        if retired:
            raise ValueError("; ".join(f"{k} is gone: {cls.retired_params[k]}" for k in retired))
        unknown = set(params) - names
        if unknown:
            raise ValueError(
                f"unknown parameter(s) for {cls.name}: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls.Params):
            if f.name in params:
                kwargs[f.name] = coerce_param(f, params[f.name])
        return cls.Params(**kwargs)

    @classmethod
    def preset_params(cls, preset: str, params: dict | MethodParams | None = None) -> dict[str, Any]:
        """The parameters of ``preset`` (one of :data:`PRESETS`) with ``params`` on top:
        explicit parameters always win over the preset's.

        Raises
        ------
        InputError
            For an unknown preset name.
        """
        from ..errors import InputError

        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of: auto, {', '.join(PRESETS)}")
        if isinstance(params, MethodParams):
            params = dataclasses.asdict(params)
        return {**cls.presets.get(preset, {}), **(params or {})}

    @abc.abstractmethod
    def build(self) -> None:
        """Create the networks in ``self.nets``."""

    def make_optimizers(self) -> None:
        """Create ``self.opts``; the default is one Adam over every network."""
        params = [p for net in self.nets.values() for p in net.parameters()]
        self.opts["main"] = torch.optim.Adam(params, lr=self.params.lr)

    def _place(self, net: nn.Module) -> nn.Module:
        return net.to(self.device, memory_format=memory_format_for(net, self.device.type))

    @property
    def size_multiple(self) -> int:
        """Slice sides must be multiples of this (inference pads to it)."""
        return 2 ** (len(self.params.features) - 1)

    def batch_needs(self, batch_size: int) -> dict[str, int]:
        """Pool name -> number of crops this method wants per step."""
        return {"labelled": batch_size}

    def prediction_window(self, tile_size: int | None) -> int | None:
        """Side of the square windows prediction slides over slices larger than it.

        ``tile_size`` is the model's setting (:attr:`semiseg.model.Model.tile_size`, the
        training crop); ``None`` predicts every slice whole. Instance-normalised networks see
        their statistics change with the input's extent, so a whole slice much larger than the
        crops they learnt on is predicted worse than its windows. A method whose networks take
        one window of a fixed size overrides this hook (and then sees one window per
        :meth:`predict` call).
        """
        return tile_size

    @property
    def tile_size(self):
        # The window moved to the model (Model.tile_size): fail loudly on code that still
        # sets it here, where it would silently do nothing.
        raise AttributeError("Method.tile_size moved to Model.tile_size (see Method.prediction_window)")

    @tile_size.setter
    def tile_size(self, value):
        raise AttributeError("Method.tile_size moved to Model.tile_size (see Method.prediction_window)")

    # ------------------------------------------------------------------ training helpers
    def autocast(self):
        """Autocast context: mixed precision on CUDA when ``amp`` is on, a no-op otherwise."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def optimise(self, loss: torch.Tensor, opt: torch.optim.Optimizer, *, retain_graph: bool = False):
        """Zero the optimiser's gradients, back-propagate ``loss`` (scaled for fp16) and step."""
        opt.zero_grad(set_to_none=True)
        self._scaler.scale(loss).backward(retain_graph=retain_graph)
        if self._grad_sync is not None:
            self._grad_sync(opt)
        self._scaler.step(opt)
        self._scaler.update()

    @property
    def grad_sync(self) -> Callable[[torch.optim.Optimizer], None] | None:
        """Called with the optimiser between backward and step (see :meth:`synchronised`)."""
        return self._grad_sync

    @contextlib.contextmanager
    def synchronised(self, grad_sync: Callable[[torch.optim.Optimizer], None] | None) -> Iterator[None]:
        """Call ``grad_sync(opt)`` between every backward and step inside the block.

        The engine passes :func:`semiseg.distributed.all_reduce_gradients` for multi-process
        training (``None`` leaves the gradients alone); the hook is removed on leaving.
        """
        self._grad_sync = grad_sync
        try:
            yield
        finally:
            self._grad_sync = None

    def to_tensor(self, x, dtype=torch.float32) -> torch.Tensor | None:
        if x is None:
            return None
        t = torch.as_tensor(x)
        pin = self.device.type == "cuda" and t.device.type == "cpu"
        if pin:
            t = t.pin_memory()
        t = t.to(self.device, dtype=dtype if t.is_floating_point() else None, non_blocking=pin)
        if t.dim() == 4 and self.device.type == "cuda" and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Networks in eval mode and no autograd, restoring their previous mode after."""
        modes = {k: n.training for k, n in self.nets.items()}
        for n in self.nets.values():
            n.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for k, n in self.nets.items():
                n.train(modes[k])

    def train_mode(self) -> None:
        for n in self.nets.values():
            n.train()

    # ------------------------------------------------------------------ the interface
    @abc.abstractmethod
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Run one optimisation step and return its named losses as floats.

        Parameters
        ----------
        batch : dict of Tensor
            Keys from :meth:`semiseg.data.SliceSampler.sample` (``labelled``, ``mask``,
            ``unlabelled``, ``healthy``, ``diseased``, ...), already on ``self.device``.
        """

    @abc.abstractmethod
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict on normalised slices.

        Parameters
        ----------
        x : (B, C, H, W) Tensor
            Normalised slices, H and W multiples of :attr:`size_multiple`.

        Returns
        -------
        dict
            ``probabilities``: (B, K, H, W) Tensor, plus the method's extra ``outputs``, each
            (B, C, H, W) in normalised intensity units.
        """

    def sample_tumours(self, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        """Return ``(n, B, C, H, W)`` absence->presence translations of ``x``."""
        raise NotImplementedError(f"method {self.name!r} cannot sample")

    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel uncertainty ``(B, H, W)``: predictive entropy by default."""
        return predictive_entropy(self.predict(x)["probabilities"])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Weights, optimiser states and step counter (tensors and plain types only)."""
        return {
            "nets": {k: n.state_dict() for k, n in self.nets.items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "step": self.step,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        missing = set(self.nets) - set(state["nets"])
        if missing and strict:
            raise ValueError(f"model file lacks networks: {', '.join(sorted(missing))}")
        for k, net in self.nets.items():
            if k in state["nets"]:
                net.load_state_dict(state["nets"][k], strict=strict)
        for k, opt in self.opts.items():
            if k in state.get("opts", {}):
                opt.load_state_dict(state["opts"][k])
        self.step = int(state.get("step", 0))
        self.load_extra_state(state.get("extra", {}))

    def start_from(self, seg_state: dict[str, Any]) -> None:
        """Load another model's segmentation U-Net weights into ``nets["seg"]`` (a warm start,
        :func:`semiseg.engine.warm_start`); methods with networks derived from it (a mean
        teacher's teacher) copy them there too.

        Raises
        ------
        KeyError, RuntimeError
            When the method has no ``seg`` network or the weights do not fit it.
        """
        self.nets["seg"].load_state_dict(seg_state)

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state to save beside the networks (plain types and tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`extra_state`."""

    def release(self) -> None:
        """Drop optimisers' state and free cached GPU memory."""
        for opt in self.opts.values():
            opt.state.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_preset(preset: str | None, device: str | torch.device) -> str:
    """The preset a run uses: ``auto`` (or None) is ``paper`` on CUDA and ``cpu`` elsewhere;
    other names pass through (checked by :meth:`Method.preset_params`)."""
    if preset in (None, "auto"):
        return "paper" if torch.device(device).type == "cuda" else "cpu"
    return str(preset)


def predictive_entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy ``-sum_k p_k log p_k`` (nats) of ``(B, K, H, W)`` probabilities, as
    ``(B, H, W)`` float32 (probabilities clamped at 1e-8)."""
    p = p.float().clamp_min(1e-8)
    return -(p * p.log()).sum(1)


def set_requires_grad(nets: nn.Module | Iterable[nn.Module], flag: bool) -> None:
    """Switch the gradients of every parameter of ``nets`` on or off (e.g. freeze the
    discriminators while the generator steps)."""
    for net in [nets] if isinstance(nets, nn.Module) else nets:
        net.requires_grad_(flag)


def state_to_cpu(state, *, copy: bool = False):
    """A state dict (nested dicts, lists, tuples) with every tensor detached on the CPU.

    With ``copy`` every tensor and value is a copy, so the result survives later training
    steps (the engine's last good weights); without, CPU tensors are shared (saving).
    """
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=copy)
    if isinstance(state, dict):
        return {k: state_to_cpu(v, copy=copy) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(state_to_cpu(v, copy=copy) for v in state)
    return _copy.deepcopy(state) if copy else state


def coerce_param(field: dataclasses.Field, value):
    """Convert a CLI/widget string (or number) to the type of a ``Params`` field."""
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if not isinstance(value, str):
        if isinstance(default, tuple):
            return tuple(value)
        return type(default)(value) if default is not None else value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}: expected true/false, got {value!r}")
    if isinstance(default, tuple):
        items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        kind = type(default[0]) if default else int
        return tuple(kind(v) for v in items)
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{field.name}: cannot read {value!r} as {type(default).__name__}") from None

