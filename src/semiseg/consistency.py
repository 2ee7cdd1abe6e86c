"""Building blocks of the consistency-based semi-supervised methods.

Invertible spatial transforms with exact inverses, the neighbourhood mutual information of
Peng et al., pixel-wise KL divergence and entropy, the mean-teacher weight average and the
sigmoid ramp-up. Everything works on ``(N, C, H, W)`` tensors of class probabilities unless
stated otherwise.

References
----------
.. [1] J. Peng, M. Pedersoli, C. Desrosiers, "Mutual information deep regularization for
   semi-supervised segmentation", MIDL 2020.
.. [2] A. Tarvainen, H. Valpola, "Mean teachers are better role models: weight-averaged
   consistency targets improve semi-supervised deep learning results", NeurIPS 2017.
.. [3] C. S. Perone, J. Cohen-Adad, "Deep semi-supervised segmentation with weight-averaged
   consistency targets", DLMIA 2018.
.. [4] X. Ji, J. F. Henriques, A. Vedaldi, "Invariant information clustering for unsupervised
   image classification and segmentation", ICCV 2019.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Dihedral",
    "check_shares",
    "clamped_noise",
    "ema_decay",
    "ema_decay_for_run",
    "ema_update",
    "joint_distribution",
    "mutual_information",
    "mutual_information_from_joint",
    "pixel_entropy",
    "pixel_kl",
    "progress_weight",
    "random_dihedral",
    "random_intensity",
    "sigmoid_rampup",
    "unlabelled_count",
    "unsupervised_weight",
]

EPS = 1e-8


# ----------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Dihedral:
    """One element of the dihedral group D4 per sample: ``k`` quarter turns, then an optional
    left-right flip. These are the invertible spatial transforms of a pixel grid that need no
    interpolation, so ``invert(apply(x))`` equals ``x`` exactly.

    Attributes
    ----------
    k : tuple of int
        Quarter turns (0..3) of each sample, counter-clockwise in the (H, W) plane.
    flip : tuple of bool
        Whether each sample is then flipped along W.

    Examples
    --------
    >>> t = Dihedral((1, 2), (True, False))
    >>> x = torch.arange(32.).reshape(2, 1, 4, 4)
    >>> torch.equal(t.invert(t.apply(x)), x)
    True
    """

    k: tuple[int, ...]
    flip: tuple[bool, ...]

    def __post_init__(self):
        if len(self.k) != len(self.flip):
            raise ValueError("k and flip need one entry per sample")
        if any(int(k) not in (0, 1, 2, 3) for k in self.k):
            raise ValueError("k must hold quarter turns in 0..3")

    def __len__(self) -> int:
        return len(self.k)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != len(self):
            raise ValueError(f"expected a (N={len(self)}, C, H, W) tensor, got {tuple(x.shape)}")
        if x.shape[-1] != x.shape[-2] and any(k % 2 for k in self.k):
            raise ValueError("odd quarter turns need square inputs")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform each sample of ``x`` (N, C, H, W)."""
        self._check(x)
        out = []
        for xi, k, f in zip(x, self.k, self.flip):
            y = torch.rot90(xi, int(k), dims=(-2, -1))
            out.append(y.flip(-1) if f else y)
        return torch.stack(out)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` exactly (flip back, then turn back)."""
        self._check(y)
        out = []
        for yi, k, f in zip(y, self.k, self.flip):
            yi = yi.flip(-1) if f else yi
            out.append(torch.rot90(yi, -int(k), dims=(-2, -1)))
        return torch.stack(out)


def random_dihedral(n: int, *, square: bool = True, generator: torch.Generator | None = None) -> Dihedral:
    """Draw ``n`` random :class:`Dihedral` transforms (only half turns when not ``square``)."""
    k = torch.randint(0, 4, (n,), generator=generator)
    if not square:
        k = (k // 2) * 2
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return Dihedral(tuple(int(v) for v in k), tuple(bool(v) for v in flip))


def clamped_noise(x: torch.Tensor, std: float, clamp: float) -> torch.Tensor:
    """Return ``x`` plus Gaussian noise of ``std``, each value clipped to ``[-clamp, clamp]``.

    The input perturbation of the mean-teacher target in [2]_ and [3]_.
    """
    if std <= 0:
        return x
    noise = torch.randn_like(x) * std
    if clamp > 0:
        noise = noise.clamp(-clamp, clamp)
    return x + noise


def random_intensity(
    x: torch.Tensor, *, contrast: float = 0.25, shift: float = 0.25, noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A photometric perturbation of each sample of ``x`` (N, C, H, W): ``a x + b + n`` with a
    contrast ``a`` drawn in ``[1 - contrast, 1 + contrast]`` and a shift ``b`` in
    ``[-shift, shift]`` per sample (and channel), plus Gaussian noise ``n`` of ``noise_std``.

    The intensity part of the strong view of FixMatch-style self-training (normalised
    intensity units); it moves no pixel, so labels of ``x`` are labels of the result.
    """
    n, c = x.shape[:2]
    shape = (n, c) + (1,) * (x.dim() - 2)
    u = torch.rand((2, *shape), generator=generator).to(x.device, x.dtype)
    a = 1.0 + contrast * (2 * u[0] - 1)
    b = shift * (2 * u[1] - 1)
    out = a * x + b
    if noise_std > 0:
        out = out + noise_std * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return out


# ----------------------------------------------------------------------------- information
def pixel_entropy(p: torch.Tensor, *, normalise: bool = False) -> torch.Tensor:
    """Mean over pixels of the entropy ``-sum_c p log p`` of (N, C, H, W) probabilities (nats).

    With ``normalise`` the entropy is divided by ``log C`` so that it lies in [0, 1].
    """
    p = p.float()
    h = -(p * p.clamp_min(EPS).log()).sum(1)
    if normalise:
        h = h / math.log(p.shape[1])
    return h.mean()


def pixel_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``KL(p || q) = sum_c p (log p - log q)``; (N, C, H, W) inputs.

    Eq. (8) of [1]_ with ``p = f(x)`` and ``q = T^-1 f(T x)``.
    """
    p, q = p.float(), q.float()
    return (p * (p.clamp_min(EPS).log() - q.clamp_min(EPS).log())).sum(1).mean()


def joint_distribution(p1: torch.Tensor, p2: torch.Tensor, *, radius: int = 1, symmetric: bool = True) -> torch.Tensor:
    """Joint class distributions of each pixel of ``p1`` and its neighbours in ``p2``.

    One 2D convolution computes the table of every displacement (Eq. (6) of [1]_): the batch
    of ``p1`` becomes channels and ``p2`` becomes the kernel, so
    ``conv2d(p1.permute(1, 0, 2, 3), p2.permute(1, 0, 2, 3), padding=radius)`` sums
    ``p1[n, a, i + dy, j + dx] * p2[n, b, i, j]`` over samples and pixels for every
    displacement ``(dy, dx)`` in ``[-radius, radius]^2`` (zero outside the image).

    Parameters
    ----------
    p1, p2 : (N, C, H, W) Tensor
        Class probabilities.
    radius : int
        Neighbourhood half size: ``(2 r + 1)^2`` displacements (3x3 for ``r = 1``, as in [1]_).
    symmetric : bool
        Symmetrise each table, ``(P + P^T) / 2``, as in [4]_.

    Returns
    -------
    (2r+1, 2r+1, C, C) Tensor
        ``P[dy + r, dx + r, a, b]``, each table summing to one.
    """
    if p1.shape != p2.shape or p1.dim() != 4:
        raise ValueError(f"p1 and p2 must be (N, C, H, W) of the same shape, got {tuple(p1.shape)}, {tuple(p2.shape)}")
    if radius < 0:
        raise ValueError("radius must be >= 0")
    joint = F.conv2d(p1.float().permute(1, 0, 2, 3), p2.float().permute(1, 0, 2, 3), padding=radius)
    joint = joint.permute(2, 3, 0, 1)  # (D, D, C, C)
    joint = joint / joint.sum((-2, -1), keepdim=True).clamp_min(EPS)
    if symmetric:
        joint = (joint + joint.transpose(-1, -2)) / 2
    return joint


def mutual_information_from_joint(joint: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) of joint tables ``(..., C, C)`` summing to one, Eq. (7) of [1]_."""
    pi = joint.sum(-1, keepdim=True)
    pj = joint.sum(-2, keepdim=True)
    log_ratio = joint.clamp_min(EPS).log() - pi.clamp_min(EPS).log() - pj.clamp_min(EPS).log()
    return (joint * log_ratio).sum((-2, -1))


def mutual_information(p1: torch.Tensor, p2: torch.Tensor, *, radius: int = 1) -> torch.Tensor:
    """Neighbourhood mutual information averaged over displacements, Eq. (5) of [1]_.

    Parameters
    ----------
    p1, p2 : (N, C, H, W) Tensor
        Class probabilities, e.g. ``f(x)`` and ``T^-1 f(T x)``.
    radius : int
        Displacements ``[-r, r]^2``; ``r = 0`` compares each pixel with itself only.

    Returns
    -------
    scalar Tensor
        Mean MI in nats (maximise it: the loss is its negative).
    """
    return mutual_information_from_joint(joint_distribution(p1, p2, radius=radius)).mean()


# ----------------------------------------------------------------------------- mean teacher
def ema_decay(step: int, alpha: float, *, warmup: bool = True) -> float:
    """Teacher decay after ``step`` updates: ``min(1 - 1/(step + 1), alpha)`` ([2]_), or the
    constant ``alpha`` without ``warmup`` (Vorontsov et al.)."""
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be in [0, 1]")
    return min(1.0 - 1.0 / (step + 1), alpha) if warmup else alpha


def ema_decay_for_run(step: int, progress: float, alpha: float, *, warmup: bool = True,
                      horizon: float = 0.0) -> float:
    """Teacher decay after ``step`` updates when the share ``progress`` of the run is over.

    :func:`ema_decay`, and with ``horizon > 0`` at most ``1 - 1 / (horizon * N)``, where
    ``N = step / progress`` is the run's expected length in steps: the teacher then averages
    over about the last ``horizon`` of the run, whatever its budget. A fixed ``alpha`` averages
    over ``1 / (1 - alpha)`` steps (100 for 0.99), more than a short run's whole second half,
    so its teacher lags the student it is meant to lead; under a long budget the cap is above
    ``alpha`` and changes nothing.
    """
    decay = ema_decay(step, alpha, warmup=warmup)
    if horizon > 0 and progress > 0 and step > 0:
        window = max(1.0, horizon * step / progress)
        decay = min(decay, 1.0 - 1.0 / window)
    return decay


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for every parameter; buffers
    (e.g. batch-norm statistics) are copied from the student."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1]; 1 when ``length <= 0``.

    The consistency-weight ramp-up of [2]_.
    """
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def unsupervised_weight(step: int, warmup: int, rampup: int) -> float:
    """Schedule of an unsupervised loss weight: 0 for the first ``warmup`` steps (supervised
    only, so the predictions the term works on mean something and no compute is spent on it),
    then :func:`sigmoid_rampup` over ``rampup`` steps, then 1."""
    if step < warmup:
        return 0.0
    return sigmoid_rampup(step - warmup, rampup)


def progress_weight(progress: float, warmup: float, rampup: float) -> float:
    """Schedule of an unsupervised loss weight over the run's progress (share done, in [0, 1]):
    0 in the first ``warmup`` share (supervised only), then ``exp(-5 (1 - t)^2)`` over the next
    ``rampup`` share (``t`` from 0 to 1, the ramp of [2]_), then 1.

    Following the share of the run rather than the step count, the schedule is the same under a
    step budget and a time budget (:attr:`semiseg.methods.base.Method.progress`).
    """
    if progress < warmup:
        return 0.0
    if rampup <= 0:
        return 1.0
    t = min(max((progress - warmup) / rampup, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def check_shares(**shares: float) -> None:
    """Raise ``ValueError`` unless every named schedule share lies in [0, 1]."""
    bad = [k for k, v in shares.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"{', '.join(bad)} must lie in [0, 1] (a share of the run)")


def unlabelled_count(batch_size: int, ratio: float) -> int:
    """Unannotated crops per step: ``ratio * batch_size``, at least 1.

    Raises
    ------
    ValueError
        For a ratio that is not positive.
    """
    if ratio <= 0:
        raise ValueError("unlabelled_ratio must be positive")
    return max(1, round(batch_size * ratio))
