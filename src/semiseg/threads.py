"""CPU threads for training and prediction: how many, and how idle OpenMP threads wait.

Two settings decide how torch's CPU kernels share a machine with other work (issue 20,
measured in docs/benchmarks.md "Training under contention"):

* **The OpenMP wait policy.** torch's CPU kernels run in OpenMP parallel regions. Between
  regions GNU OpenMP's idle threads *spin* (300,000 iterations by default) before they sleep. On
  an otherwise idle machine that saves a wake-up; when another process computes, the spinning
  threads take the CPU from the threads that do the work, and a training step slows far more than
  a fair share would. ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once. OpenMP reads
  it once, when torch's ``libgomp`` loads, so :func:`import_torch` (called first thing by
  ``import semiseg``) sets it for that moment only, unless the user chose a policy
  (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or torch was imported before semiseg.
* **The number of intra-op threads.** torch defaults to the machine's physical cores, which can
  be more CPUs than the process may use (``taskset``, a container's CPU quota): threads beyond
  those only queue. :func:`default_threads` is the smaller of torch's default and
  :func:`available_cpus`; the CLI sets it (:func:`configure_threads`), the napari worker sets its
  own (one thread by default, so the viewer keeps a core).
Lowering the thread count further when other processes run (to the CPUs they leave free) was
measured and not kept: slower in every scenario (docs/benchmarks.md).

This module imports no torch at module level, so it can run before torch loads.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

__all__ = ["available_cpus", "configure_threads", "default_threads", "import_torch"]

#: Environment variables through which a user chooses the OpenMP wait behaviour themselves.
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Environment variables through which a user chooses torch's thread count themselves.
THREADS_ENV = ("OMP_NUM_THREADS", "TORCH_NUM_THREADS")
#: torch's intra-op threads when :func:`import_torch` first saw torch (its default, unless the
#: user had changed it), so that :func:`default_threads` does not depend on earlier calls.
_torch_threads_at_import: int | None = None


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota.

    Parameters
    ----------
    cgroup_root : path
        Where the cgroup file system is mounted (a parameter for the tests).

    Returns
    -------
    int
        At least 1.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        n = os.cpu_count() or 1
    quota = _cgroup_cpus(Path(cgroup_root))
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def default_threads() -> int:
    """torch intra-op threads for a CLI run: torch's default (physical cores, or what
    ``OMP_NUM_THREADS`` says), never more than :func:`available_cpus`."""
    torch = import_torch()
    return max(1, min(_torch_threads_at_import or torch.get_num_threads(), available_cpus()))


def configure_threads() -> int:
    """Set torch's intra-op threads to :func:`default_threads` and return the count.

    A user's own ``OMP_NUM_THREADS`` / ``TORCH_NUM_THREADS`` is kept as it is.
    """
    torch = import_torch()
    if not any(os.environ.get(k) for k in THREADS_ENV):
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` inside the block only (child processes started later do not
    inherit it)."""
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def import_torch():
    """Import torch with the passive OpenMP wait policy unless the user chose one.

    Returns
    -------
    module
        ``torch``. Without effect on the wait policy when torch was imported already (its OpenMP
        runtime read the environment then) or the user set one of :data:`WAIT_ENV`.
    """
    global _torch_threads_at_import
    if "torch" in sys.modules or any(k in os.environ for k in WAIT_ENV):
        import torch
    else:
        with _env("OMP_WAIT_POLICY", "PASSIVE"):
            import torch
    if _torch_threads_at_import is None:
        _torch_threads_at_import = torch.get_num_threads()
    return torch

