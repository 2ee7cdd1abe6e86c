"""Run store: every training run's model file is kept, so any earlier model can be restored.

A run is the model file written at the end of one training run, with its weights, method,
hyperparameters, training settings and the label budget it saw (``Model.history``). Runs live
in a folder beside the output model, ``<model>.runs/<timestamp>-<method>.pt``, or in a folder
the user picks. Rolling back copies a run onto the model path atomically; the model it replaces
is kept as a run first when the store does not hold it yet, so a rollback loses nothing either.

>>> from semiseg.runs import save_run, list_runs, rollback      # doctest: +SKIP
>>> save_run(model, "liver.pt")                                  # doctest: +SKIP
>>> [r.run_id for r in list_runs("liver.pt")]                     # doctest: +SKIP
['20250101-120000.000-supervised']
>>> rollback("liver.pt", "20250101-120000")                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import InputError
from .io import atomic_path
from .model import Model, ModelFileError

__all__ = ["RunInfo", "default_runs_dir", "find_run", "list_runs", "plugin_runs_dir", "rollback", "save_run"]

#: Environment variable that moves the napari plugin's run store (:func:`plugin_runs_dir`).
RUNS_DIR_ENV = "SEMISEG_RUNS_DIR"

_ID_RE = re.compile(r"^\d{8}-\d{6}\.\d{3}-")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One stored run.

    Attributes
    ----------
    run_id : str
        ``<YYYYmmdd-HHMMSS.mmm>-<method>[-n]``: the file name without ``.pt``.
    path : Path
        The run's model file.
    method : str
    steps : int
        Steps of the run's last training session.
    annotated_slices : int
        Label budget: annotated slices the run saw (painted and healthy-tagged ones).
    losses : dict
        Final smoothed losses.
    history : list of dict
        The model's whole training history.
    """

    run_id: str
    path: Path
    method: str
    steps: int
    annotated_slices: int
    losses: dict
    history: list
    #: Of ``annotated_slices``, those tagged healthy (annotated as all background, not painted).
    healthy_tagged: int = 0

    @property
    def painted_slices(self) -> int:
        """Annotated slices the user painted (or listed as planes): not the healthy-tagged."""
        return self.annotated_slices - self.healthy_tagged

    def describe(self) -> str:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items())
        healthy = f", {self.healthy_tagged} healthy-tagged" if self.healthy_tagged else ""
        return (
            f"{self.run_id}  {self.method}  {self.steps} steps  "
            f"{self.painted_slices} painted slices{healthy}  {losses}"
        ).rstrip()


def default_runs_dir(model_path: str | Path) -> Path:
    """``<model>.runs`` beside the model file."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".runs")


def plugin_runs_dir() -> Path:
    """The napari plugin's run store: ``$SEMISEG_RUNS_DIR`` or ``~/.napari-semiseg/runs``.

    The plugin has no output model file; its runs are kept in this folder alone (pass it as
    ``runs_dir`` with ``model_path=None``).
    """
    return Path(os.environ.get(RUNS_DIR_ENV) or Path.home() / ".napari-semiseg" / "runs")


def _runs_dir(model_path, runs_dir) -> Path:
    if runs_dir is not None:
        return Path(runs_dir)
    if model_path is None:
        raise ValueError("a run store needs a model path or a runs folder")
    return default_runs_dir(model_path)


def save_run(
    model: Model | None,
    model_path: str | Path | None,
    runs_dir: str | Path | None = None,
    *,
    copy_of: str | Path | None = None,
) -> RunInfo:
    """Keep ``model`` as a new run in the store of ``model_path`` (atomic write).

    Parameters
    ----------
    model : Model or None
        The model to keep; None with ``copy_of``.
    model_path : str or Path or None
        The output model the run belongs to (names the default store); None for a store
        without a model file (``runs_dir`` then names it, e.g. :func:`plugin_runs_dir`).
    runs_dir : str or Path, optional
        Store folder; created when missing. Default ``<model>.runs``.
    copy_of : str or Path, optional
        A model file already written for ``model``: its bytes are copied, so the run is
        byte-identical to it (``semiseg runs`` then marks it as the current one).

    Raises
    ------
    InputError
        When the folder cannot be created or written (the store is left as it was).
    """
    folder = _runs_dir(model_path, runs_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the runs folder {folder}: {exc.strerror or exc}") from None
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    cfg = model.config() if model is not None else _read_config(Path(copy_of))
    base = f"{stamp}-{cfg['method']}"
    path, n = folder / f"{base}.pt", 1
    while path.exists():
        n += 1
        path = folder / f"{base}-{n}.pt"
    if copy_of is None:
        model.save(path)
    else:
        try:
            with atomic_path(path) as tmp:
                shutil.copyfile(copy_of, tmp)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return _info(path, cfg)


def run_info(path: str | Path) -> RunInfo:
    """Describe the stored run ``path``.

    Raises
    ------
    ModelFileError
        When the file is not a readable model file.
    """
    path = Path(path)
    return _info(path, _read_config(path))


def _read_config(path: Path) -> dict:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable model file ({type(exc).__name__})") from None
    try:
        return json.loads(payload["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is not a napari-semiseg model file") from None


def _info(path: Path, cfg: dict) -> RunInfo:
    history = cfg.get("history") or []
    last = history[-1] if history else {}
    return RunInfo(
        run_id=path.stem,
        path=path,
        method=cfg.get("method", "?"),
        steps=int(last.get("steps", 0)),
        annotated_slices=len(last.get("annotated_slices", [])),
        losses=dict(last.get("losses", {})),
        history=history,
        healthy_tagged=int(last.get("tagged_healthy", 0)),
    )


def list_runs(model_path: str | Path | None, runs_dir: str | Path | None = None) -> list[RunInfo]:
    """Stored runs of ``model_path`` (None: of the folder ``runs_dir``), oldest first;
    unreadable files are skipped."""
    folder = _runs_dir(model_path, runs_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.pt")):
        if not _ID_RE.match(path.name):
            continue
        try:
            out.append(_info(path, _read_config(path)))
        except ModelFileError:
            continue
    return out


def find_run(model_path: str | Path, run_id: str, runs_dir: str | Path | None = None) -> RunInfo:
    """The run named ``run_id``: a full id, a unique prefix, ``latest``, or ``-N`` (N-th last).

    Raises
    ------
    InputError
        When no run or several runs match.
    """
    runs = list_runs(model_path, runs_dir)
    if not runs:
        raise InputError(f"no runs stored for {model_path} (looked in {_runs_dir(model_path, runs_dir)})")
    if run_id == "latest":
        return runs[-1]
    if re.fullmatch(r"-\d+", run_id):
        k = int(run_id)
        if -k > len(runs) or k == 0:
            raise InputError(f"run {run_id}: only {len(runs)} runs are stored")
        return runs[k]
    exact = [r for r in runs if r.run_id == run_id]
    if exact:
        return exact[0]
    hits = [r for r in runs if r.run_id.startswith(run_id)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise InputError(f"no run {run_id!r}; `semiseg runs {model_path}` lists them")
    raise InputError(f"run {run_id!r} is ambiguous: {', '.join(r.run_id for r in hits)}")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_run(model_path: str | Path, runs_dir: str | Path | None = None) -> RunInfo | None:
    """The stored run whose file is byte-identical to the model file, if any."""
    model_path = Path(model_path)
    if not model_path.is_file():
        return None
    size = model_path.stat().st_size
    same = [r for r in list_runs(model_path, runs_dir) if r.path.stat().st_size == size]
    if not same:
        return None
    digest = _digest(model_path)
    for r in reversed(same):
        if _digest(r.path) == digest:
            return r
    return None


def rollback(model_path: str | Path, run_id: str, runs_dir: str | Path | None = None) -> RunInfo:
    """Restore run ``run_id`` onto ``model_path`` atomically and return it.

    The run file is checked (it must load as a safe model) before anything is written. When the
    current model file is not in the store yet, it is kept as a run first.

    Raises
    ------
    InputError
        For unknown runs, unreadable run files or unwritable folders; nothing changes then.
    """
    model_path = Path(model_path)
    run = find_run(model_path, run_id, runs_dir)
    Model.load(run.path)  # refuses damaged or unsafe files before touching anything
    if model_path.is_file() and current_run(model_path, runs_dir) is None:
        try:
            Model.load(model_path)
            keep = True
        except ModelFileError:
            keep = False  # not a model: nothing worth keeping as a run
        if keep:
            save_run(None, model_path, runs_dir, copy_of=model_path)
    try:
        with atomic_path(model_path) as tmp:
            shutil.copyfile(run.path, tmp)
    except OSError as exc:
        raise InputError(f"cannot write {model_path}: {exc.strerror or exc}") from None
    return run
