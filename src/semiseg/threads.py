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
* **Threads that follow the load.** Even sleeping idle threads lose when the CPUs are shared: a
  parallel region ends when its *last* thread does, and with more runnable threads than CPUs one
  of ours waits for a time slice at every region. :class:`ThreadGovernor` (the CLI's training
  loop calls it between steps) counts the other runnable threads of the machine
  (``/proc/loadavg``) and uses the CPUs they leave free: two threads on an idle 2-core machine,
  one beside one busy process or a second training.

This module imports no torch at module level, so it can run before torch loads.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ThreadGovernor", "available_cpus", "configure_threads", "default_threads", "import_torch"]

#: Environment variables through which a user chooses the OpenMP wait behaviour themselves.
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Environment variables through which a user chooses torch's thread count themselves.
THREADS_ENV = ("OMP_NUM_THREADS", "TORCH_NUM_THREADS")
#: torch's intra-op threads when :func:`import_torch` first saw torch (its default, unless the
#: user had changed it), so that :func:`default_threads` does not depend on earlier calls.
_torch_threads_at_import: int | None = None
#: Whether :func:`import_torch` loaded torch with the passive wait policy (or the user chose it).
_passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


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
    global _torch_threads_at_import, _passive
    if "torch" in sys.modules or any(k in os.environ for k in WAIT_ENV):
        import torch
    else:
        with _env("OMP_WAIT_POLICY", "PASSIVE"):
            import torch
        _passive = True
    if _torch_threads_at_import is None:
        _torch_threads_at_import = torch.get_num_threads()
    return torch


def runnable_threads(path: str | Path = "/proc/loadavg") -> int | None:
    """Threads of the whole machine running or ready to run now (the caller's included), from
    the fourth field of ``/proc/loadavg``; None where that file is missing (not Linux)."""
    try:
        return int(Path(path).read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Adapts torch's intra-op threads, between training steps, to the CPUs other work leaves.

    Call :meth:`step` once per training step, between steps (then this process's OpenMP
    threads sleep, under the passive wait policy, and the caller's thread is its only runnable
    one). Each call reads the machine's runnable threads and keeps an exponential average of
    the *others* (that count less one); every ``every`` calls the thread count becomes the CPUs
    they leave free, between 1 and ``max_threads``.

    Parameters
    ----------
    max_threads : int, optional
        Upper bound (default :func:`default_threads`).
    cpus : int, optional
        CPUs of the machine this process shares (default :func:`available_cpus`).
    every : int
        Steps between changes of the thread count.
    probe : callable
        Returns the runnable threads now, or None (:func:`runnable_threads`; a parameter for
        the tests).
    set_threads : callable
        Sets the thread count (default ``torch.set_num_threads``).

    Attributes
    ----------
    threads : int
        The thread count in force.
    others : float
        The smoothed count of other runnable threads.
    """

    def __init__(
        self,
        max_threads: int | None = None,
        cpus: int | None = None,
        *,
        every: int = 5,
        probe: Callable[[], int | None] = runnable_threads,
        set_threads: Callable[[int], None] | None = None,
    ):
        self.max_threads = max(1, max_threads or default_threads())
        self.cpus = max(1, cpus or available_cpus())
        self.every = max(1, int(every))
        self._probe = probe
        self._set = set_threads or import_torch().set_num_threads
        self._calls = 0
        # Start from a short burst of readings, so the first steps already run with a fitting count.
        readings = []
        for _ in range(8):
            r = probe()
            if r is None:
                break
            readings.append(max(0, r - 1))
            time.sleep(0.002)
        self.others = sum(readings) / len(readings) if readings else 0.0
        self.threads = self._want()
        self._set(self.threads)

    @classmethod
    def for_cli(cls) -> ThreadGovernor | None:
        """The CLI's governor, or None where it would guess wrong: the user fixed the threads
        (``OMP_NUM_THREADS``), idle threads may spin (another wait policy than passive), the
        process sees only part of the machine (affinity or a CPU quota: ``/proc/loadavg`` counts
        the whole host) or there is no ``/proc/loadavg``."""
        if any(os.environ.get(k) for k in THREADS_ENV):
            return None
        if os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper() != "PASSIVE" or not _passive:
            return None
        if available_cpus() != (os.cpu_count() or 1) or runnable_threads() is None:
            return None
        return cls()

    def _want(self) -> int:
        return int(min(self.max_threads, max(1, round(self.cpus - self.others))))

    def step(self) -> int:
        """Read the load once; every ``every`` calls adapt the thread count. Returns it."""
        r = self._probe()
        if r is None:
            return self.threads
        self.others = 0.7 * self.others + 0.3 * max(0, r - 1)
        self._calls += 1
        if self._calls % self.every == 0:
            want = self._want()
            if want != self.threads:
                self.threads = want
                self._set(want)
        return self.threads
