"""Progress of long jobs: the :class:`Progress` record they yield, and the drivers that run them.

Training, prediction and uncertainty maps are generators of :class:`Progress` whose return
value is the result. The GUI wraps them in a worker and stops them by closing them; scripts
run them to completion with :func:`run`, optionally showing a :func:`progress_bar`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np

__all__ = ["Progress", "progress_bar", "run"]


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


def run(gen: Generator[Any, None, Any], callback: Callable[[Any], None] | None = None):
    """Drive a progress generator to completion and return its result."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(item)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str | None = None, *, unit: str = "step", **tqdm_kwargs) -> Iterator[Callable[[Progress], None]]:
    """A tqdm bar as a :func:`run` callback: it shows each record's step and losses.

    Extra keywords go to ``tqdm`` (``file``, ``disable``, ...).

    >>> with progress_bar(10, disable=True) as update:  # doctest: +SKIP
    ...     model = run(iter_train(image, labels), update)
    """
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs) as bar:

        def update(p: Progress) -> None:
            bar.n = p.step
            bar.set_postfix({k: f"{v:.3f}" for k, v in p.losses.items()}, refresh=False)
            bar.refresh()

        yield update
