"""Data-parallel training on several GPUs or machines with ``torch.distributed``.

Launch the ordinary CLI under ``torchrun``::

    torchrun --nproc-per-node 4 -m semiseg train image.zarr labels.tif -o model.pt

Every process (rank) runs the same training loop on its own stream of random crops; before
each optimiser step the gradients of every network are averaged across ranks (the all-reduce
that :class:`torch.nn.parallel.DistributedDataParallel` performs), so all ranks keep identical
weights. This works for every method without wrapping its networks, because all methods step
through :meth:`semiseg.methods.base.Method.optimise`. Buffers (e.g. batch-norm statistics) are
broadcast from rank 0 after every step, as DDP does with ``broadcast_buffers=True``. Rank 0 alone
writes files and prints progress.

With ``N`` ranks each step sees ``N x batch_size`` crops per pool. A single process (no
``torchrun``, or ``WORLD_SIZE=1``) trains exactly as without this module.

References
----------
.. [1] S. Li et al., "PyTorch Distributed: experiences on accelerating data parallel
   training", VLDB 2020.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import distributed as dist

from .device import resolve_device

__all__ = [
    "all_reduce_gradients",
    "any_true",
    "broadcast_buffers",
    "broadcast_parameters",
    "cleanup",
    "init_from_env",
    "is_active",
    "is_main",
    "max_value",
    "rank",
    "rank_seed",
    "world_size",
]

#: Environment variables set by torchrun (and by the SLURM recipe in docs/scaling.md).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files and prints progress (rank 0)."""
    return rank() == 0


def init_from_env(device: str | torch.device = "auto", *, timeout_s: float = 1800) -> torch.device:
    """Join the process group described by torchrun's environment, if any.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` it initialises
    the default process group (NCCL on CUDA, Gloo on CPU) with the ``env://`` rendezvous and
    selects GPU ``LOCAL_RANK``. Without those variables (or with one rank) it does nothing.

    Parameters
    ----------
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps`` as for training.
    timeout_s : float
        Collective timeout.

    Returns
    -------
    torch.device
        The device this rank trains on.

    Raises
    ------
    ValueError
        On inconsistent variables (rank outside the world, MPS with several ranks).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dev
    r = int(os.environ.get("RANK", "0"))
    if not 0 <= r < world:
        raise ValueError(f"RANK={r} is outside WORLD_SIZE={world}")
    if dev.type == "mps":
        raise ValueError("distributed training supports CUDA and CPU, not MPS")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    return dev


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int | None = None, world: int | None = None) -> int:
    """Seed of ``rank``'s sampling stream, derived from the base ``seed``.

    With one rank this is ``seed`` itself, so single-process training is unchanged; with
    several, each rank gets an independent stream (``numpy.random.SeedSequence`` spawn keys).
    """
    rank = globals()["rank"]() if rank is None else rank
    world = world_size() if world is None else world
    if world <= 1:
        return int(seed)
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(rank),))
    return int(ss.generate_state(1, np.uint32)[0])


def _flat_all_reduce(tensors: list[torch.Tensor], *, average: bool) -> None:
    """All-reduce a list of tensors in place with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    n = world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        if average:
            flat /= n
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_gradients(opt_or_params) -> None:
    """Average the gradients of an optimiser's parameters across ranks.

    Parameters that received no gradient on some ranks take zeros there (so every rank
    computes the same update); parameters without a gradient on every rank keep ``None``, as in
    a single process. No-op without an active process group.

    Parameters
    ----------
    opt_or_params : torch.optim.Optimizer or iterable of Parameter
    """
    if not is_active():
        return
    if isinstance(opt_or_params, torch.optim.Optimizer):
        params = [p for g in opt_or_params.param_groups for p in g["params"]]
    else:
        params = list(opt_or_params)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = []
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            live.append(p.grad)
    if live:
        _flat_all_reduce(live, average=True)


def _tensors(modules: Iterable[torch.nn.Module], what: str) -> list[torch.Tensor]:
    out = []
    for m in modules:
        out += list(m.parameters() if what == "params" else m.buffers())
    return out


def broadcast_parameters(method) -> None:
    """Copy rank 0's parameters and buffers of every network to the other ranks."""
    if not is_active():
        return
    with torch.no_grad():
        for t in _tensors(method.nets.values(), "params") + _tensors(method.nets.values(), "buffers"):
            dist.broadcast(t.data, src=0)


def broadcast_buffers(method) -> None:
    """Copy rank 0's floating-point buffers (norm statistics, running averages) to all ranks."""
    if not is_active():
        return
    bufs = [b for b in _tensors(method.nets.values(), "buffers") if b.is_floating_point()]
    if not bufs:
        return
    with torch.no_grad():
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in bufs:
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in group:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on any rank (e.g. a time budget ran out); plain ``flag`` alone."""
    return max_value(1.0 if flag else 0.0, device) > 0


def max_value(value: float, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` over ranks; plain ``value`` alone."""
    if not is_active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
