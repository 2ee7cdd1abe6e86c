"""Peers: what users already have, scored exactly like benchmarks/annotation_efficiency.py.

A user who paints K slices can already get the others filled by free tools. Each peer here runs
from its own library on the same synthetic samples, K, placement and slice choices as
``annotation_efficiency.py`` (``semiseg.make_sample(kind, seed, labelled=K, placement=...)``) and
is scored the same way: hard Dice of the foreground on the unannotated slices
(``dice_per_class(..., exclude_slices=sample.annotated)``). The peers:

``interpolation``
    3D Slicer's *Fill between slices*: ITK's ``MorphologicalContourInterpolator`` (package
    ``itk-morphologicalcontourinterpolation``) along the slicing axis, between the painted slices.
    Slices outside the painted range stay empty, as in Slicer.
``random_forest``
    An ilastik-style pixel classifier: ``skimage.feature.multiscale_basic_features`` per slice
    (intensity, edges and texture at sigmas 1, 2, 4, 8, 16, as ilastik's default feature set
    spans 0.3 to 10) and a scikit-learn ``RandomForestClassifier`` (100 trees, one job) trained on
    the annotated slices, healthy-tagged slices as background, pixels subsampled to at most
    ``--rf-samples`` per class.
``random_walk``
    ``skimage.segmentation.random_walker`` in 3D on the normalised image with the sample's voxel
    spacing: painted foreground and background of the annotated slices and every pixel of the
    healthy-tagged slices are seeds, the unannotated slices are not. ``mode="cg_j"`` (conjugate
    gradient with a Jacobi preconditioner: scikit-image's default, no pyamg needed);
    ``beta=--rw-beta``, default 500: scikit-image scales the squared gradients by the data's
    standard deviation, so one beta serves both samples; 500 had the best summed Dice of the
    phantom and nuclei at seed 0, K = 5, even placement among 30, 130 (scikit-image's default),
    500 and 2000 (benchmarks/results/peers_beta_sweep.jsonl). Chosen against the truth, so it
    favours the peer.

Each row records the peer's CPU time (process time, all threads; every peer runs on one).

Examples
--------
The phantom, K = 1, 3, 5, both placements::

    python benchmarks/peers.py --samples phantom --k 1 3 5 --seeds 0 1 2 --placement even
    python benchmarks/peers.py --samples phantom --k 1 3 5 --seeds 0 1 2 --placement clustered

One table with our methods beside the peers (rows of annotation_efficiency result files)::

    python benchmarks/peers.py --report --methods-from benchmarks/results/annotation_efficiency_nuclei.jsonl
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from annotation_efficiency import append_result, error_anatomy, load, soft_dice, variant  # noqa: E402

DEFAULT_OUT = HERE / "results" / "peers.jsonl"
PEERS = ("interpolation", "random_forest", "random_walk")
HEALTHY = 0


def _one_thread(peers) -> None:
    """Peers run on one thread, like the methods' benchmarks; ITK is loaded before timing.

    ITK loads its wrapped modules lazily on first use (about 9 CPU s here), a one-time cost a
    user pays once per session, not per volume, so it is kept out of the peer's CPU time.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "interpolation" in peers:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
        warm = np.zeros((3, 4, 4), np.uint8)
        warm[[0, 2], 1:3, 1:3] = 1
        fill_between_slices(warm)


def fill_between_slices(labels: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """3D Slicer's *Fill between slices*: ITK's morphological contour interpolation.

    Parameters
    ----------
    labels : (Z, Y, X) integer ndarray
        Painted slices (nonzero foreground); every other slice empty.
    axis : int
        The numpy axis along which slices are interpolated.

    Returns
    -------
    (Z, Y, X) uint8 ndarray
        1 inside the interpolated foreground; slices outside the painted range stay 0.

    References
    ----------
    Zukić, Vicory, McCormick, Wisse, Gerig, Yushkevich and Aylward, "ND morphological contour
    interpolation", The Insight Journal (2016).
    """
    import itk

    img = itk.image_from_array(np.ascontiguousarray(labels > 0, dtype=np.uint8))
    itk_axis = labels.ndim - 1 - axis  # ITK orders axes x, y, z
    out = itk.morphological_contour_interpolator(img, axis=itk_axis, label=1)
    return (itk.array_from_image(out) > 0).astype(np.uint8)


def _seeds(labels: np.ndarray, annotated: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
    """0 unknown, 1 background, 2 foreground: painted slices whole, healthy-tagged slices as background."""
    seeds = np.zeros(labels.shape, np.uint8)
    if tags is not None:
        seeds[np.asarray(tags) == HEALTHY] = 1
    for i in annotated:
        seeds[i] = np.where(labels[i] > 0, 2, 1)
    return seeds


def slice_features(image: np.ndarray, *, sigma_min: float = 1, sigma_max: float = 16) -> np.ndarray:
    """ilastik-like features of each slice: intensity, edges and texture over several scales.

    Parameters
    ----------
    image : (Z, Y, X) float ndarray

    Returns
    -------
    (Z, Y, X, F) float32 ndarray
    """
    from skimage.feature import multiscale_basic_features

    return np.stack([
        multiscale_basic_features(s, intensity=True, edges=True, texture=True,
                                  sigma_min=sigma_min, sigma_max=sigma_max).astype(np.float32)
        for s in image
    ])


def random_forest(
    image: np.ndarray,
    labels: np.ndarray,
    annotated: np.ndarray,
    tags: np.ndarray | None = None,
    *,
    seed: int = 0,
    n_estimators: int = 100,
    samples_per_class: int = 20000,
) -> tuple[np.ndarray, np.ndarray]:
    """An ilastik-style pixel classifier trained on the annotated (and healthy) slices.

    Parameters
    ----------
    image : (Z, Y, X) float ndarray
        Normalised image.
    labels : (Z, Y, X) integer ndarray
        Painted slices (nonzero foreground, zero background on an annotated slice).
    annotated : ndarray of int
        The painted slices.
    tags : (Z,) int ndarray, optional
        Weak tags; healthy (0) slices train as background.
    seed : int
        Seeds the subsampling and the forest.
    n_estimators : int
    samples_per_class : int
        At most this many training pixels of each class, drawn at random; background is drawn
        half from the painted slices and half from healthy-tagged ones when both exist.

    Returns
    -------
    mask : (Z, Y, X) uint8 ndarray
    prob : (Z, Y, X) float32 ndarray
        Foreground probability.

    References
    ----------
    Berg et al., "ilastik: interactive machine learning for (bio)image analysis", Nature Methods
    16 (2019).
    """
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng([seed, 1613])
    seeds = _seeds(labels, annotated, tags)
    feats = slice_features(image)
    painted = np.zeros(len(labels), bool)
    painted[np.asarray(annotated, int)] = True
    pools = {
        "fg": np.flatnonzero(seeds.ravel() == 2),
        "bg_painted": np.flatnonzero((seeds == 1)[painted].ravel()),
        "bg_healthy": np.flatnonzero((seeds == 1)[~painted].ravel()),
    }
    if len(pools["fg"]) == 0:
        return np.zeros(labels.shape, np.uint8), np.zeros(labels.shape, np.float32)
    # Indices into painted/unpainted sub-volumes back to whole-volume flat indices.
    z_p, z_h = np.flatnonzero(painted), np.flatnonzero(~painted)
    per_slice = int(np.prod(labels.shape[1:]))
    pools["bg_painted"] = z_p[pools["bg_painted"] // per_slice] * per_slice + pools["bg_painted"] % per_slice
    pools["bg_healthy"] = z_h[pools["bg_healthy"] // per_slice] * per_slice + pools["bg_healthy"] % per_slice

    def draw(pool, n):
        return pool if len(pool) <= n else rng.choice(pool, n, replace=False)

    fg = draw(pools["fg"], samples_per_class)
    bg_sources = [p for p in (pools["bg_painted"], pools["bg_healthy"]) if len(p)]
    bg = np.concatenate([draw(p, samples_per_class // len(bg_sources)) for p in bg_sources])
    idx = np.concatenate([fg, bg])
    y = np.concatenate([np.ones(len(fg), np.uint8), np.zeros(len(bg), np.uint8)])
    flat = feats.reshape(-1, feats.shape[-1])
    rf = RandomForestClassifier(n_estimators=n_estimators, n_jobs=1, random_state=seed, class_weight="balanced")
    rf.fit(flat[idx], y)
    prob = np.concatenate([rf.predict_proba(flat[i : i + 262144])[:, 1] for i in range(0, len(flat), 262144)])
    prob = prob.reshape(labels.shape).astype(np.float32)
    return (prob > 0.5).astype(np.uint8), prob


def random_walk(
    image: np.ndarray,
    labels: np.ndarray,
    annotated: np.ndarray,
    tags: np.ndarray | None = None,
    *,
    beta: float = 130.0,
    mode: str = "cg_j",
    spacing: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A 3D random walk seeded from the painted slices (and healthy-tagged slices as background).

    Parameters
    ----------
    image : (Z, Y, X) float ndarray
        Normalised image.
    labels : (Z, Y, X) integer ndarray
    annotated : ndarray of int
    tags : (Z,) int ndarray, optional
    beta : float
        Edge penalty of :func:`skimage.segmentation.random_walker`.
    mode : str
        Its solver.
    spacing : tuple of float, optional
        Voxel spacing ``(Z, Y, X)``.

    Returns
    -------
    mask : (Z, Y, X) uint8 ndarray
    prob : (Z, Y, X) float32 ndarray
        Probability that a walker from the voxel first reaches a foreground seed.

    References
    ----------
    Grady, "Random walks for image segmentation", IEEE TPAMI 28 (2006).
    """
    from skimage.segmentation import random_walker

    seeds = _seeds(labels, annotated, tags)
    if not (seeds == 2).any():
        return np.zeros(labels.shape, np.uint8), np.zeros(labels.shape, np.float32)
    if not (seeds == 1).any():
        return np.ones(labels.shape, np.uint8), np.ones(labels.shape, np.float32)
    prob = random_walker(image.astype(np.float64), seeds, beta=beta, mode=mode,
                         spacing=spacing, return_full_prob=True)[1].astype(np.float32)
    prob = np.clip(prob, 0, 1)  # the solver's tolerance leaves values just outside [0, 1]
    return (prob > 0.5).astype(np.uint8), prob


def run_one(peer: str, sample_kind: str, k: int, seed: int, args) -> dict:
    import semiseg
    from semiseg.data import Normaliser
    from semiseg.metrics import dice_per_class

    sample = semiseg.make_sample(sample_kind, seed=seed, labelled=k, placement=args.placement)
    tags = sample.tags if args.tags else None
    spacing = tuple(getattr(sample, "spacing", (1.0, 1.0, 1.0)))
    c0, t0 = time.process_time(), time.perf_counter()
    image = Normaliser.fit(sample.image[None])(sample.image[None])[0]
    params: dict = {}
    if peer == "interpolation":
        mask = fill_between_slices(sample.labels)
        prob = mask.astype(np.float32)
    elif peer == "random_forest":
        params = {"n_estimators": args.rf_trees, "samples_per_class": args.rf_samples}
        mask, prob = random_forest(image, sample.labels, sample.annotated, tags, seed=seed, **params)
    elif peer == "random_walk":
        params = {"beta": args.rw_beta, "mode": args.rw_mode, "spacing": list(spacing)}
        mask, prob = random_walk(image, sample.labels, sample.annotated, tags,
                                 beta=args.rw_beta, mode=args.rw_mode, spacing=spacing)
    else:
        raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    keep = np.ones(len(sample.truth), bool)
    keep[sample.annotated] = False
    hard = dice_per_class(mask, sample.truth, classes=[1], exclude_slices=sample.annotated)[1]
    return {
        "peer": peer, "sample": sample_kind, "k": k, "seed": seed,
        "dice": round(hard, 4), "soft_dice": round(soft_dice(prob[keep], sample.truth[keep]), 4),
        "errors": error_anatomy(mask[keep] == 1, sample.truth[keep] == 1),
        "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1), "threads": 1,
        "tags": bool(args.tags), "params": params, "placement": args.placement,
        "annotated": sample.annotated.tolist(),
        "loadavg": round(os.getloadavg()[0], 2), "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _mean_sd(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def report(peer_rows: list[dict], method_rows: list[dict]) -> str:
    """One Markdown table: a row per (sample, placement, K), a column per peer and per method.

    Peer cells are ``Dice mean ± sd over seeds (CPU s per run)``; method cells (rows of
    annotation_efficiency result files) are ``Dice mean ± sd`` under a heading naming the
    method variant and its training budget. ``n`` counts the seeds.
    """
    def key(r):
        return (r["sample"], r.get("placement", "even"), r["k"])

    def method_name(r):
        base = variant({**r, "placement": "even"})  # placement has its own column
        return f"{base}, {r['budget_minutes']:g} min {r['clock']}"

    peers = [p for p in PEERS if any(r["peer"] == p for r in peer_rows)]
    # The full-supervision bound after the methods it bounds.
    methods = sorted({method_name(r) for r in method_rows}, key=lambda m: ("every slice labelled" in m, m))
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in peer_rows:
        cells.setdefault(key(r), {}).setdefault(r["peer"], []).append(r)
    for r in method_rows:
        cells.setdefault(key(r), {}).setdefault(method_name(r), []).append(r)
    header = ["sample", "placement", "K", *[f"{p} (CPU s)" for p in peers], *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (sample, placement, k), by in sorted(cells.items()):
        row = [sample, placement, str(k)]
        for p in peers:
            rs = by.get(p, [])
            row.append(f"{_mean_sd([r['dice'] for r in rs])} ({np.mean([r['cpu_seconds'] for r in rs]):.1f} s, n={len(rs)})"
                       if rs else "")
        for m in methods:
            rs = by.get(m, [])
            row.append(f"{_mean_sd([r['dice'] for r in rs])} (n={len(rs)})" if rs else "")
        lines.append("| " + " | ".join(row) + " |")
    spans = []
    for what, rows in (("peers", peer_rows), ("methods", method_rows)):
        loads = [r["loadavg"] for r in rows if "loadavg" in r]
        if loads:
            spans.append(f"{what} {min(loads):.2f} to {max(loads):.2f} (median {np.median(loads):.2f})")
    if spans:
        lines += ["", "Load average (1 min) at the runs: " + "; ".join(spans) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    import semiseg.synthetic as synthetic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--samples", nargs="+", default=["phantom"], choices=list(synthetic.SAMPLE_KINDS))
    p.add_argument("--k", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--placement", choices=list(synthetic.PLACEMENTS), default="even",
                   help="where the K annotated slices lie among the structure-bearing slices")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--no-tags", dest="tags", action="store_false",
                   help="hide weak tags (healthy slices are then no background seeds)")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=20000, help="training pixels per class at most")
    p.add_argument("--rw-beta", type=float, default=500.0,
                   help="random-walk edge penalty (500: best summed Dice of phantom and nuclei, seed 0, K=5)")
    p.add_argument("--rw-mode", default="cg_j")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", action="store_true", help="print the table of --out (and --methods-from) and exit")
    p.add_argument("--methods-from", nargs="+", type=Path, default=[], metavar="FILE",
                   help="annotation_efficiency result files whose rows join the table")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="only these methods' rows of --methods-from (default: all)")
    args = p.parse_args(argv)
    if args.report:
        rows = load(args.out)
        method_rows = [r for f in args.methods_from for r in load(f)
                       if "method" in r and (args.methods is None or r["method"] in args.methods)]
        if not rows and not method_rows:
            raise SystemExit(f"no results in {args.out}")
        print(report(rows, method_rows))
        return 0
    _one_thread(args.peers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for sample in args.samples:
        for k in args.k:
            for seed in args.seeds:
                for peer in args.peers:
                    append_result(args.out, run_one(peer, sample, k, seed, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
