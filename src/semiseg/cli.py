"""Command-line interface: ``semiseg VERB ...`` (also ``python -m semiseg``).

Bad input exits with code 2 and one line on stderr, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show: flags,
    empty repeatable options and options without a default (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or not action.help:
            return action.help
        return super()._get_help_string(action)


#: Where ``semiseg demo`` writes without a folder argument (relative to the working directory).
DEMO_DIR = "demo-output"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .engine import TrainConfig

    p.add_argument("--method", help="registered method (see `semiseg methods`; default: supervised, "
                                    "or the model's with --continue-from)")
    p.add_argument(
        "--weak", metavar="WEAK.csv",
        help="per-slice weak tags: CSV with the header slice,diseased (1 diseased, 0 healthy); "
             "healthy-tagged slices count as annotated (all background)",
    )
    p.add_argument("--steps", type=int, default=300, help="optimisation steps")
    p.add_argument(
        "--minutes", type=float,
        help="wall-clock budget: training stops at --steps or --minutes, whichever comes first "
             "(default: no time limit)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="training crops per step")
    p.add_argument("--crop", type=int, help="side of the square training crops and prediction windows, in pixels "
                   "(default: the continued model's, else the slice's smaller side up to 160, on the CPU "
                   "less for methods with costlier steps, 96 for 3D methods)")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="slicing axis of (Z, Y, X)")
    p.add_argument(
        "--context", type=int, metavar="N",
        help="neighbouring slices on each side fed as extra channels (2.5D) "
             f"(default: the continued model's, else {TrainConfig.context})",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: CUDA, else MPS, else the CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed (crops, augmentation, initial weights)")
    p.add_argument(
        "--anneal", type=float, metavar="SHARE",
        help="share of the run, at its end, over which the learning rate falls to 0 "
             f"(0 keeps it constant) (default: {TrainConfig.anneal})",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="method hyperparameter, repeatable (see `semiseg methods --params`)",
    )
    p.add_argument(
        "--preset", default="auto", choices=("auto", "cpu", "paper"),
        help="model sizes of a new model: cpu (minutes on a laptop CPU), paper (the paper's, for a "
             "GPU); auto: paper on CUDA, else cpu. --param values win",
    )
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--compile", action="store_true", help="compile the networks with torch.compile (GPU runs)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="semiseg", description="Annotation-efficient segmentation of image volumes."
    )
    parser.add_argument("--version", action="version", version=f"napari-semiseg {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}".strip(),
                              formatter_class=_HelpFormatter)

    p = verb("sample", "write a synthetic sample volume",
             "Writes image.tif, labels.tif (K annotated slices), truth.tif and weak.csv into OUT_DIR.")
    p.add_argument("out_dir", help="folder to write into (created if missing)")
    p.add_argument("--kind", default="phantom", choices=("phantom", "nuclei", "digits"), help="which sample")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    p.add_argument("--labelled", type=int, default=5, help="annotated slices K")

    p = verb(
        "train", "train a model on an image and sparse labels",
        "The labels mark a few painted slices (1..K classes, 0 background); MODEL gets the "
        "trained model and MODEL.runs a copy of every run (see `semiseg runs`).",
    )
    p.add_argument("image", help="image volume (Z, Y, X) or (C, Z, Y, X): .tif/.tiff, .zarr or .npy")
    p.add_argument(
        "labels",
        help="labels of the image's (Z, Y, X) shape, integer classes 1..K painted on a few slices, "
             "0 elsewhere: .tif/.tiff, .zarr or .npy",
    )
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="model file to write (.pt); an existing one is replaced only on success")
    p.add_argument("--continue-from", metavar="MODEL", help="continue training this model (its own method)")
    p.add_argument(
        "--init-from", metavar="MODEL",
        help="start a new --method model from this model's segmentation weights (a warm start: "
             "refine a supervised model with a semi-supervised method)",
    )
    p.add_argument("--runs-dir", metavar="DIR", help="where to keep each run's model (default: MODEL.runs)")
    p.add_argument("--no-runs", action="store_true", help="do not keep a snapshot of this run")
    p.add_argument(
        "--planes", metavar="PLANES.csv",
        help="fully annotated slices in any plane: CSV with columns axis,index (axis 0, 1, 2 of "
             "(Z, Y, X)); only the listed slices count as annotated, so a sagittal slice does not "
             "mark the axial slices it crosses (default: the slices along --axis holding labels)",
    )
    _add_train_options(p)

    p = verb("predict", "predict a mask with a trained model")
    p.add_argument("model", help="model file (.pt) from `semiseg train`")
    p.add_argument("image", help="image volume with the model's channels: .tif/.tiff, .zarr or .npy")
    p.add_argument("-o", "--output", required=True, metavar="MASK", help=".tif/.tiff/.zarr/.npy")
    p.add_argument("--prob", metavar="PATH", help="also write class probabilities (K, Z, Y, X)")
    p.add_argument("--residual", metavar="PATH", help="residual image (translation methods)")
    p.add_argument("--healthy", metavar="PATH", help="healthy translation (translation methods)")
    p.add_argument("--tumours", metavar="PATH", help="sampled tumours (K, Z, Y, X)")
    p.add_argument("--n-samples", type=int, default=3, help="samples per slice for --tumours")
    p.add_argument("--batch-size", type=int, default=8, help="slices (or windows) per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: CUDA, else MPS, else the CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed of --tumours")
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="dask scheduler for chunked zarr prediction: a dask.distributed address "
        "(tcp://HOST:8786), 'threads' (default) or 'synchronous'",
    )

    p = verb("evaluate", "per-class Dice of a prediction against the truth")
    p.add_argument("pred", help="predicted mask")
    p.add_argument("truth", help="true labels of the same shape")
    p.add_argument("--ignore-slices-of", metavar="LABELS", help="leave out slices annotated here")

    p = verb("runs", "list the stored training runs of a model")
    p.add_argument("model", help="model file (.pt)")
    p.add_argument("--runs-dir", metavar="DIR", help="runs folder (default: MODEL.runs)")

    p = verb("rollback", "restore a stored run onto the model file")
    p.add_argument("model", help="model file (.pt)")
    p.add_argument("run_id", help="run id, a unique prefix, 'latest' or -N (N-th last)")
    p.add_argument("--runs-dir", metavar="DIR", help="runs folder (default: MODEL.runs)")

    p = verb("suggest", "which unannotated slices to label next, best first")
    p.add_argument("model", help="model file (.pt)")
    p.add_argument("image", help="image volume")
    p.add_argument("labels", help="labels (the slices holding labels are annotated)")
    p.add_argument("-n", type=int, default=3, help="number of suggestions")
    p.add_argument("--weak", metavar="WEAK.csv", help="weak tags; slices tagged healthy count as annotated")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips/rotations, 8x slower)")
    p.add_argument("--spacing", type=float, default=2.0, help="diversity length scale in slices (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: CUDA, else MPS, else the CPU")

    p = verb("methods", "list the training methods")
    p.add_argument("--params", action="store_true", help="also list each method's hyperparameters")

    p = verb(
        "demo", "sample, train, predict and evaluate on the bundled phantom",
        "Prints the Dice on the unannotated slices and writes the sample, mask.tif and model.pt "
        "into OUT_DIR.",
    )
    p.add_argument("out_dir", nargs="?", default=DEMO_DIR, help="folder to write into (created if missing)")
    p.add_argument("--kind", default="phantom", choices=("phantom", "nuclei", "digits"), help="which sample")
    p.add_argument("--labelled", type=int, default=5, help="annotated slices K")
    _add_train_options(p)
    p.set_defaults(steps=400, minutes=4.0)
    return parser


# ----------------------------------------------------------------------------- helpers
def _read(path: str, what: str, *, lazy: bool = False):
    from .io import read_volume

    return read_volume(path, lazy=lazy)


def _check_output(path: str) -> Path:
    from .io import SUPPORTED_SUFFIXES, _suffix

    out = Path(path)
    if _suffix(out) not in SUPPORTED_SUFFIXES:
        raise CLIError(f"unsupported output type {out.suffix!r} for {out} (use .tif, .zarr or .npy)")
    _check_folder(out)
    return out


def _check_folder(out: Path) -> None:
    import os

    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"output folder is not writable: {parent}")


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


def _progress_bar(total: int, desc: str):
    from .progress import progress_bar

    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 shows progress
    return progress_bar(total, desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=quiet)


def _check_continue(args, model) -> None:
    """Refuse ``--continue-from`` with another ``--method``: it would train the model's method."""
    mine = model.method.name
    if args.method is not None and args.method != mine:
        raise CLIError(
            f"{args.continue_from} holds a {mine!r} model and --continue-from trains it on as {mine!r}; "
            f"to start a {args.method!r} model from its weights use --init-from {args.continue_from}"
        )


def _train(image, labels, tags, args, model=None, planes=None, init_from=None):
    from .engine import TrainConfig, iter_train
    from .methods import get_method
    from .progress import run

    method = model.method.name if model is not None else (args.method or "supervised")
    if model is None:
        get_method(method)  # unknown names fail before any work
    params = _parse_params(args.param)
    config = TrainConfig(
        steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
        crop=args.crop, seed=args.seed, axis=args.axis, compile=args.compile,
        **({} if args.anneal is None else {"anneal": args.anneal}),
        **_context_option(args, model or init_from),
    )
    gen = iter_train(
        image, labels, tags=tags, method=method, params=params or None, config=config,
        model=model, device=args.device, amp=not args.no_amp,
        planes=planes, init_from=init_from, preset=args.preset,
    )
    # Run the first step (input validation) before opening a progress bar.
    first = next(gen)
    with _progress_bar(config.steps, f"train {method}") as update:
        update(first)
        return run(gen, update)


def _context_option(args, model) -> dict:
    """``TrainConfig`` keyword for ``--context``: given, the model's when continuing or
    starting from one, or none."""
    if args.context is not None:
        return {"context": args.context}
    return {} if model is None else {"context": model.context}


def _predict(model, image, *, batch_size, outputs=(), probabilities=False):
    from .inference import iter_predict_volume
    from .progress import run

    n = image.shape[-3 + model.axis] if len(image.shape) >= 3 else 0
    gen = iter_predict_volume(
        model, image, batch_size=batch_size, outputs=outputs, probabilities=probabilities
    )
    next(gen)  # input validation happens before the first record: no bar for bad input
    with _progress_bar(n, "predict") as update:
        return run(gen, update)


def _load_tags(path, labels, axis):
    if path is None:
        return None
    from .data import read_weak_csv

    return read_weak_csv(path, np.asarray(labels).shape[axis])


def _load_planes(path, labels):
    """Planes of ``--planes`` checked against the labels' shape (None without the option)."""
    if path is None:
        return None
    from .planes import read_planes_csv, validate_planes

    planes = read_planes_csv(path)
    if np.ndim(labels) != 3:
        return planes  # the labels' own error comes first (make_pools checks the planes later)
    return validate_planes(planes, np.shape(labels), source=path)


def _planes_note(run) -> str:
    """``"  planes: axial 3, 5; sagittal 40"`` for a run that recorded its planes, else ``""``."""
    last = run.history[-1] if run.history else {}
    if last.get("planes") is None:
        return ""
    from .planes import describe_planes

    return f"  planes: {describe_planes(last['planes'])}"


# ----------------------------------------------------------------------------- verbs
def cmd_sample(args) -> int:
    from .data import write_weak_csv
    from .io import write_volumes
    from .synthetic import make_sample

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a folder")
    if args.labelled < 0:
        raise CLIError("--labelled must be >= 0")
    _check_folder(out)
    s = make_sample(args.kind, seed=args.seed, labelled=args.labelled)
    out.mkdir(exist_ok=True)
    write_volumes([(out / "image.tif", s.image), (out / "labels.tif", s.labels), (out / "truth.tif", s.truth)])
    write_weak_csv(out / "weak.csv", s.tags)
    print(f"wrote {args.kind} sample {s.image.shape} with {len(s.annotated)} annotated slices to {out}")
    return 0


def cmd_train(args) -> int:
    from .model import Model
    from .runs import default_runs_dir, save_run

    if args.continue_from and args.init_from:
        raise CLIError("give --continue-from (train the model on) or --init-from (start a new model from it), not both")
    out = Path(args.output)
    _check_folder(out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir(out)
    if not args.no_runs:
        _check_folder(runs_dir / "run.pt" if runs_dir.is_dir() else runs_dir)
    image = _read(args.image, "image", lazy=True)
    labels = _read(args.labels, "labels")
    tags = _load_tags(args.weak, labels, args.axis)
    planes = _load_planes(args.planes, labels)
    from . import distributed

    distributed.init_from_env(args.device)  # joins torchrun's process group, if any
    rank = distributed.rank()
    try:
        model = init = None
        if args.continue_from:
            model = Model.load(args.continue_from, device=_device(args.device))
            _check_continue(args, model)
        elif args.init_from:
            init = Model.load(args.init_from, device=_device(args.device))
        model = _train(image, labels, tags, args, model=model, planes=planes, init_from=init)
    finally:
        if distributed.is_active():
            distributed.cleanup()
    if rank != 0:
        return 0  # rank 0 alone writes files and prints
    model.history[-1]["inputs"] = {
        k: str(Path(v).resolve()) for k, v in (("image", args.image), ("labels", args.labels), ("weak", args.weak),
                                          ("planes", args.planes)) if v
    }
    model.save(out)
    kept = "" if args.no_runs else f"; run {save_run(model, out, runs_dir, copy_of=out).run_id} kept in {runs_dir}"
    h = model.history[-1]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in h["losses"].items())
    print(f"trained {h['method']} for {h['steps']} steps in {h['seconds']:.1f} s ({losses}){_cap_note(h)}; "
          f"saved {out}{kept}")
    return 0


def cmd_runs(args) -> int:
    from .runs import current_run, default_runs_dir, list_runs

    folder = Path(args.runs_dir) if args.runs_dir else default_runs_dir(args.model)
    runs = list_runs(args.model, folder)
    if not runs:
        print(f"no runs stored for {args.model} (looked in {folder})")
        return 0
    cur = current_run(args.model, folder)
    for r in runs:
        mark = "*" if cur is not None and r.run_id == cur.run_id else " "
        print(f"{mark} {r.describe()}{_planes_note(r)}")
    if cur is not None:
        print(f"* = the run {args.model} holds now")
    return 0


def cmd_rollback(args) -> int:
    from .runs import rollback

    run = rollback(args.model, args.run_id, args.runs_dir)
    print(f"restored run {run.run_id} ({run.method}, {run.steps} steps) onto {args.model}")
    return 0


def _device(name):
    from .device import resolve_device

    return resolve_device(name)


def cmd_predict(args) -> int:
    from .inference import sample_tumours
    from .io import write_volumes
    from .model import Model

    mask_path = _check_output(args.output)
    extra = {"residual": args.residual, "healthy": args.healthy}
    for p in [args.prob, args.tumours, *extra.values()]:
        if p:
            _check_output(p)
    model = Model.load(args.model, device=_device(args.device))
    outputs = [k for k, v in extra.items() if v]
    missing = [k for k in outputs if k not in model.method.outputs]
    if missing or (args.tumours and not model.method.can_sample):
        what = ", ".join(missing + (["tumours"] if args.tumours and not model.method.can_sample else []))
        raise CLIError(f"method {model.method.name!r} does not produce: {what}")
    if args.n_samples < 1:
        raise CLIError("--n-samples must be >= 1")
    image = _read(args.image, "image", lazy=True)
    if _chunked(args, image, outputs):
        return _predict_chunked(model, image, args, extra, outputs)
    res = _predict(model, image, batch_size=args.batch_size, outputs=outputs, probabilities=bool(args.prob))
    if args.tumours:
        from .data import as_channels

        n = as_channels(image).shape[model.axis + 1]
        samples = [sample_tumours(model, image, i, args.n_samples, seed=args.seed + i) for i in range(n)]
        tumours = np.stack(samples, axis=1 + model.axis)
    items = [(mask_path, res["mask"])]
    if args.prob:
        items.append((args.prob, res["probabilities"]))
    items += [(extra[k], res[k]) for k in outputs]
    if args.tumours:
        items.append((args.tumours, tumours))
    written = [str(p) for p in write_volumes(items)]  # all or nothing
    fg = float((res["mask"] > 0).mean())
    print(f"wrote {', '.join(written)} (foreground {100 * fg:.2f} % of voxels)")
    return 0


def _chunked(args, image, outputs) -> bool:
    """Whether to predict slab by slab into zarr: whenever every output is a zarr path (from any
    input, lazy or in memory), so that no output is ever held whole in memory."""
    from .io import _suffix

    paths = [args.output, args.prob, *(getattr(args, k) for k in outputs)]
    all_zarr = all(_suffix(Path(p)) == ".zarr" for p in paths if p)
    if args.scheduler and not all_zarr:
        raise CLIError("--scheduler writes zarr: give .zarr paths for the mask and every output")
    return all_zarr


def _predict_chunked(model, image, args, extra, outputs) -> int:
    from .lazy import predict_to_zarr
    from .progress import Progress

    paths = {"mask": args.output, "probabilities": args.prob, **{k: extra[k] for k in outputs}}
    n = image.shape[len(image.shape) - 3 + model.axis]
    with _progress_bar(n, "predict") as update:
        written = predict_to_zarr(
            model, image, paths, batch_size=args.batch_size, scheduler=args.scheduler,
            device=args.device, # slabs may hold fewer slices than the batch: report the share of slabs done
            progress=lambda done, total: update(Progress(round(n * done / total), n, {}, 0.0)),
        )
    names = [str(p) for p in written.values()]
    if args.tumours:
        from .data import as_channels
        from .inference import sample_tumours
        from .io import write_volume

        c = as_channels(image).shape[model.axis + 1]
        samples = [sample_tumours(model, image, i, args.n_samples, seed=args.seed + i) for i in range(c)]
        names.append(str(write_volume(args.tumours, np.stack(samples, axis=1 + model.axis))))
    import dask.array as da

    from .io import open_zarr_array

    fg = float((da.from_zarr(open_zarr_array(written["mask"])) > 0).mean().compute(scheduler="threads"))
    print(f"wrote {', '.join(names)} slab by slab (foreground {100 * fg:.2f} % of voxels)")
    return 0


def cmd_evaluate(args) -> int:
    from .errors import InputError
    from .metrics import dice_per_class

    pred = np.asarray(_read(args.pred, "prediction"))
    truth = np.asarray(_read(args.truth, "truth"))
    for a, what in ((pred, "prediction"), (truth, "truth")):
        if a.dtype.kind not in "uib":
            raise InputError(f"{what} must hold integer labels, got {a.dtype}")
    exclude = None
    if args.ignore_slices_of:
        lab = np.asarray(_read(args.ignore_slices_of, "labels"))
        if lab.shape != truth.shape:
            raise InputError(f"labels shape {lab.shape} differs from truth shape {truth.shape}")
        exclude = np.flatnonzero(lab.reshape(len(lab), -1).any(1))
    try:
        scores = dice_per_class(pred, truth, exclude_slices=exclude)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for c, d in scores.items():
        print(f"class {c}: dice {d:.4f}")
    if scores:
        print(f"mean dice {np.mean(list(scores.values())):.4f}")
    return 0


def cmd_methods(args) -> int:
    import dataclasses

    from .methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        print(f"{name:14s} {cls.summary}")
        if args.params:
            for f in dataclasses.fields(cls.Params):
                print(f"    {f.name} = {f.default if f.default is not dataclasses.MISSING else f.default_factory()}")
    return 0


def _cap_note(h: dict) -> str:
    """``"; the 4-minute cap (--minutes 4) ended training after 96 of 400 steps"`` when the time
    budget, not the step count, ended the run recorded in ``h`` (a history entry), else ``""``."""
    planned, minutes = h["config"]["steps"], h["config"].get("minutes")
    if minutes is None or h["steps"] >= planned:
        return ""
    return (f"; the {minutes:g}-minute cap (--minutes {minutes:g}) ended training after "
            f"{h['steps']} of {planned} steps")


def cmd_demo(args) -> int:
    from .data import write_weak_csv
    from .io import write_volumes
    from .metrics import dice_per_class
    from .synthetic import make_sample

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a folder")
    _check_folder(out)
    s = make_sample(args.kind, seed=args.seed, labelled=args.labelled)
    print(f"sample: {args.kind} {s.image.shape}, {len(s.annotated)} annotated slices {s.annotated.tolist()}")
    model = _train(s.image, s.labels, s.tags, args)
    res = _predict(model, s.image, batch_size=8)
    out.mkdir(exist_ok=True)
    write_volumes(
        [(out / n, a) for n, a in (("image.tif", s.image), ("labels.tif", s.labels),
                                   ("truth.tif", s.truth), ("mask.tif", res["mask"]))]
    )
    write_weak_csv(out / "weak.csv", s.tags)
    model.save(out / "model.pt")
    scores = dice_per_class(res["mask"], s.truth, classes=[1], exclude_slices=s.annotated)
    h = model.history[-1]
    print(f"trained {h['method']} for {h['steps']} steps in {h['seconds']:.1f} s on {h['device']}{_cap_note(h)}")
    if _cap_note(h):
        print("  (a busy machine: fewer steps, a lower Dice; README.md gives the expected figures)")
    print(f"dice on unannotated slices: {scores[1]:.4f}")
    print(f"wrote {out / 'mask.tif'}, {out / 'model.pt'} and the sample")
    return 0


def cmd_suggest(args) -> int:
    from .data import as_channels, validate_labels
    from .model import Model
    from .progress import run
    from .suggest import iter_uncertainty, suggest_slices

    if args.n < 1:
        raise CLIError("-n must be >= 1")
    if args.batch_size < 1 or args.spacing < 0:
        raise CLIError("--batch-size must be >= 1 and --spacing >= 0")
    model = Model.load(args.model, device=_device(args.device))
    image = _read(args.image, "image", lazy=True)
    labels = validate_labels(_read(args.labels, "labels"), tuple(as_channels(image).shape[1:]))
    tags = _load_tags(args.weak, labels, model.axis)
    gen = iter_uncertainty(model, image, tta=args.tta, batch_size=args.batch_size)
    first = next(gen)
    with _progress_bar(first.total, "uncertainty") as update:
        result = run(gen, update)
    found = suggest_slices(model, None, labels, n=args.n, tags=tags, spacing=args.spacing, result=result)
    if not found:
        print("every slice is annotated: nothing to suggest", file=sys.stderr)
        return 0
    print(_suggestion_table(found, model.axis))
    return 0


def _suggestion_table(found, axis: int) -> str:
    """The suggestions under a header: slice index, score relative to the best, score, mass
    (:class:`semiseg.suggest.Suggestion`)."""
    best = found[0].score or 1.0
    rows = [f"{'slice':>5s}  {'relative':>8s}  {'score':>10s}  {'mass':>10s}   "
            f"(slices along axis {axis}, best first; relative = score / best score)"]
    rows += [f"{s.index:5d}  {s.score / best:8.2f}  {s.score:10.4g}  {s.mass:10.4g}" for s in found]
    return "\n".join(rows)


COMMANDS = {
    "suggest": cmd_suggest,
    "sample": cmd_sample,
    "train": cmd_train,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "methods": cmd_methods,
    "demo": cmd_demo,
    "runs": cmd_runs,
    "rollback": cmd_rollback,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 training fault, 2 bad input)."""
    from .errors import InputError, PredictionError, TrainingError
    from .threads import configure_threads

    args = build_parser().parse_args(argv)
    configure_threads()  # threads no more than the CPUs this process may use (semiseg.threads)
    try:
        return COMMANDS[args.verb](args)
    except (CLIError, InputError) as exc:
        print(f"semiseg {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown method names
        print(f"semiseg {args.verb}: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad hyperparameters and the like
        print(f"semiseg {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        what = "prediction" if isinstance(exc, PredictionError) else "training"
        print(f"semiseg {args.verb}: {what} failed: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"semiseg {args.verb}: out of memory (try a smaller image or batch size)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"semiseg {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
