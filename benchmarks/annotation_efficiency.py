"""Annotation efficiency: Dice on unannotated slices vs the number K of annotated slices.

Trains each method for a fixed budget on a synthetic sample with K annotated slices and scores
the prediction on every other slice. Results are appended, one JSON line per run, so runs can be
split across sessions; ``--report`` aggregates them into a Markdown table and a plot.

Examples
--------
Supervised at K = 1, 3, 5, 10 with a 60 s wall-clock budget::

    python benchmarks/annotation_efficiency.py --methods supervised --samples phantom \
        --k 1 3 5 10 --seeds 0 1 2 --minutes 1 --clock wall

Every method, fixed CPU budget (process time, fair on a shared machine)::

    python benchmarks/annotation_efficiency.py --k 1 3 5 --seeds 0 1 2 --minutes 2 --clock process

    python benchmarks/annotation_efficiency.py --report

2.5D input: ``--context 1`` gives the networks each slice's two neighbours as extra channels
(``TrainConfig.context``)::

    python benchmarks/annotation_efficiency.py --methods supervised --samples phantom --k 5 \
        --minutes 3 --clock process --threads 1 --context 1

Upper bound: ``--every-slice-labelled`` trains on the truth of *every* slice (the slices it is
scored on included) and scores the same slices as a run with K annotated slices. No method that
sees only K annotated slices should beat it at the same budget, so it bounds what any
semi-supervised method can gain over ``supervised``::

    python benchmarks/annotation_efficiency.py --methods supervised --samples phantom --k 5 \
        --minutes 1 --clock process --every-slice-labelled

``--save-models DIR`` keeps each trained model (``DIR/<method>_<sample>_k<K>_<placement>_seed<S>.pt``),
e.g. for the docs figures of the run (``docs/make_screenshots.py --translation-model``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _stats import gap_share, paired_difference

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "annotation_efficiency.jsonl"


def soft_dice(prob_fg: np.ndarray, truth: np.ndarray) -> float:
    """Soft Dice accumulated over the evaluation set (the metric of Vorontsov et al.)."""
    t = truth.astype(np.float64)
    return float(2 * (prob_fg * t).sum() / (prob_fg.sum() + t.sum() + 1e-8))


def error_anatomy(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Split the errors into whole regions and boundaries, slice by slice.

    A truth region (2D connected component in a slice) that the prediction does not touch at all
    is a *missed* region; a predicted region that touches no truth is a *false* region. What is
    left of the false negatives and positives lies on the borders of regions both agree exist,
    where unannotated slices can teach little that the annotated ones have not.
    """
    from scipy import ndimage as ndi

    in_slice = np.zeros((3, 3, 3), bool)
    in_slice[1] = ndi.generate_binary_structure(2, 1)
    t, p = truth.astype(bool), pred.astype(bool)

    def untouched(regions_of: np.ndarray, other: np.ndarray) -> int:
        lab, n = ndi.label(regions_of, structure=in_slice)
        if n == 0:
            return 0
        touched = np.zeros(n + 1, bool)
        touched[np.unique(lab[other & regions_of])] = True
        return int(np.isin(lab, np.flatnonzero(~touched[1:]) + 1).sum())

    return {
        "fn": int((t & ~p).sum()), "fn_in_missed_regions": untouched(t, p),
        "fp": int((p & ~t).sum()), "fp_in_false_regions": untouched(p, t),
        "truth_voxels": int(t.sum()),
    }


def residual_contrast(residual: np.ndarray, truth: np.ndarray, ring: int = 6) -> dict:
    """Mean |residual| inside the tumours and in the organ around them, on diseased slices.

    The surrounding organ is a ring of ``ring`` pixels around each slice's tumours (2 pixels
    away from them, so the blurred tumour border is not counted). Returns
    ``residual_tumour``, ``residual_around`` and their ratio ``residual_ratio``.
    """
    from scipy import ndimage as ndi

    t = truth.astype(bool)
    near = np.zeros((3, 3, 3), bool)
    near[1] = ndi.generate_binary_structure(2, 1)
    around = ndi.binary_dilation(t, near, iterations=ring + 2) & ~ndi.binary_dilation(t, near, iterations=2)
    a = np.abs(residual.reshape(truth.shape).astype(np.float64))
    inside, outside = float(a[t].mean()) if t.any() else 0.0, float(a[around].mean()) if around.any() else 0.0
    return {"residual_tumour": round(inside, 2), "residual_around": round(outside, 2),
            "residual_ratio": round(inside / max(outside, 1e-8), 3)}


def run_one(method, sample_kind, k, seed, args, params, placement=None) -> dict:
    """Train ``method`` on sample ``sample_kind`` (seed) with K annotated slices and score it."""
    return run_regimes(method, sample_kind, [(k, placement or args.placement[0])], seed, args, params)[0]


def run_regimes(method, sample_kind, regimes, seed, args, params) -> list[dict]:
    """Train once and score every ``(k, placement)`` regime: one row each.

    A run with K annotated slices trains on one regime's labels (there must be one regime);
    the upper bound (``--every-slice-labelled``) trains on the truth, which no regime changes
    (the volume depends on the seed alone), so its one model is scored on each regime's
    unannotated slices.
    """
    import torch

    import semiseg

    torch.set_num_threads(args.threads)
    if len(regimes) > 1 and not args.every_slice_labelled:
        raise ValueError("only the upper bound scores one model on several regimes")
    k0, placement0 = regimes[0]
    sample = semiseg.make_sample(sample_kind, seed=seed, labelled=k0, placement=placement0)
    config = semiseg.TrainConfig(
        steps=args.steps, minutes=args.minutes, clock=args.clock, seed=seed,
        batch_size=args.batch_size,
        crop=(args.crop or None) if sample_kind != "digits" else min(args.crop or 48, 48),  # 0: automatic
        anneal=args.anneal, context=args.context,
    )
    tags = sample.tags if args.tags else None
    # The upper bound trains on the full truth but is scored on the slices the K-slice run leaves
    # unannotated (sample.annotated still names those K), so both are scored on the same voxels.
    labels = sample.truth if args.every_slice_labelled else sample.labels
    t0 = time.perf_counter()
    model = semiseg.train(
        sample.image, labels, tags=tags, method=method, params=params or None,
        config=config, device="cpu",
    )
    train_s = time.perf_counter() - t0
    res = semiseg.predict_volume(model, sample.image)
    # The same weights predicting every slice whole, as before prediction used windows of the
    # training crop (semiseg.inference): what the windows are worth.
    whole = None
    if args.whole_slices:
        tile, model.tile_size = model.tile_size, None
        whole = semiseg.predict_volume(model, sample.image, probabilities=False)["mask"]
        model.tile_size = tile
    h = model.history[-1]
    residual_map = None
    if "residual" in model.method.outputs:  # issue 19: does the residual show the lesion?
        residual_map = semiseg.predict_volume(model, sample.image, outputs=("residual",), probabilities=False)["residual"]
    if args.save_models is not None:
        label = "every-slice" if args.every_slice_labelled else f"k{k0}_{placement0}"
        model.save(Path(args.save_models) / f"{method}_{sample_kind}_{label}_seed{seed}.pt")
    rows = []
    for k, placement in regimes:
        scored = sample if (k, placement) == (k0, placement0) else semiseg.make_sample(
            sample_kind, seed=seed, labelled=k, placement=placement)
        if not np.array_equal(scored.truth, sample.truth):
            raise RuntimeError("the sample's volume changed with K or the placement")
        rows.append(score_row(method, sample_kind, k, placement, seed, args, params, scored, res, whole, h, train_s,
                              residual_map=residual_map, crop=model.tile_size))
    return rows


def score_row(method, sample_kind, k, placement, seed, args, params, sample, res, whole, h, train_s, *,
              residual_map=None, crop=None) -> dict:
    """One result row: the prediction ``res`` scored on the slices ``sample`` leaves unannotated.

    ``crop`` is the side of the training crops (``Model.tile_size``).
    """
    from semiseg.metrics import dice_per_class

    keep = np.ones(len(sample.truth), bool)
    keep[sample.annotated] = False
    hard = dice_per_class(res["mask"], sample.truth, classes=[1], exclude_slices=sample.annotated)[1]
    soft = soft_dice(res["probabilities"][1][keep], sample.truth[keep])
    whole_dice = {}
    if whole is not None:
        d = dice_per_class(whole, sample.truth, classes=[1], exclude_slices=sample.annotated)[1]
        whole_dice = {"dice_whole_slices": round(d, 4)}
    residual = {} if residual_map is None else residual_contrast(residual_map, sample.truth)
    return {**residual,
        "method": method, "sample": sample_kind, "k": k, "seed": seed,
        "dice": round(hard, 4), "soft_dice": round(soft, 4), **whole_dice,
        "errors": error_anatomy(res["mask"][keep] == 1, sample.truth[keep] == 1),
        "steps": h["steps"], "train_seconds": round(train_s, 1), "crop": crop,
        "budget_minutes": args.minutes, "clock": args.clock, "threads": args.threads,
        "tags": bool(args.tags), "params": params, "anneal": args.anneal, "losses": h["losses"],
        "every_slice_labelled": bool(args.every_slice_labelled), "placement": placement,
        "context": args.context, "loadavg": round(os.getloadavg()[0], 2), "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def parse_params(items):
    """``method:key=value`` strings -> {method: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, _, value = item.partition("=")
        method, _, key = head.partition(":")
        if not key or not value:
            raise SystemExit(f"--param expects METHOD:KEY=VALUE, got {item!r}")
        out.setdefault(method, {})[key] = value
    return out


def append_result(path: Path, row: dict) -> None:
    """Print one result and append it to the JSON-lines file."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def variant(row: dict) -> str:
    """Method name plus whatever distinguishes the run from the defaults (params, annealing)."""
    extra = [f"{k}={v}" for k, v in sorted((row.get("params") or {}).items())]
    if row.get("anneal"):
        extra.append(f"anneal {row['anneal']}")
    if row.get("every_slice_labelled"):
        extra.append("every slice labelled")
    if row.get("placement", "even") != "even":
        extra.append(f"{row['placement']} slices")
    if row.get("context"):
        extra.append(f"context {row['context']}")
    return row["method"] + (f" ({', '.join(extra)})" if extra else "")


def group_table(groups: dict[tuple, list[dict]], columns: list[str], cells) -> str:
    """Markdown table with one row per group: ``sample | method | K | budget`` then ``cells``.

    ``cells(key, rows)`` returns the remaining cells of a group's row, or ``None`` to leave the
    group out; a table with no rows is ``""``.
    """
    header = ["sample", "method", "K", "budget", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, rs in sorted(groups.items()):
        row = cells(key, rs)
        if row is not None:
            sample, method, k, budget, clock = key
            lines.append(f"| {sample} | {method} | {k} | {budget} min {clock} | " + " | ".join(row) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def partner_key(key: tuple, row: dict, method: str = "supervised", *, bound: bool = False) -> tuple:
    """The group key of ``method``'s runs in the same regime as ``row`` (sample, K, budget,
    placement, context, annealing; default parameters), or of the full-supervision bound."""
    sample, _, k, budget, clock = key
    partner = {"method": method, "params": {}, "anneal": row.get("anneal"), "every_slice_labelled": bound,
               "placement": row.get("placement", "even"), "context": row.get("context")}
    return (sample, variant(partner), k, budget, clock)


def by_seed(rows: list[dict]) -> dict[int, float]:
    """Dice by seed; a seed measured twice keeps its first run."""
    out: dict[int, float] = {}
    for r in rows:
        out.setdefault(r["seed"], r["dice"])
    return out


def gap_table(groups: dict[tuple, list[dict]], baseline: str = "supervised") -> str:
    """Each method's share of the ``baseline``-to-bound gap (:func:`_stats.gap_share`): the
    bound is ``baseline`` trained on every slice's truth, scored on the same slices; seeds
    without all three runs are left out."""

    def cells(key, rs):
        if rs[0].get("every_slice_labelled") or key[1] == variant({**rs[0], "method": baseline, "params": {}}):
            return None
        base = by_seed(groups.get(partner_key(key, rs[0], baseline), []))
        full = by_seed(groups.get(partner_key(key, rs[0], baseline, bound=True), []))
        mine = by_seed(rs)
        seeds = sorted(set(mine) & set(base) & set(full))
        if len(seeds) < 2:
            return None
        trio = [[d[s] for s in seeds] for d in (mine, base, full)]
        means = [f"{np.mean(v):.3f}" for v in trio]
        g = gap_share(*trio)
        share = "undefined (no gap)" if g is None else f"{g['share']:+.0%} [{g['low']:+.0%}, {g['high']:+.0%}]"
        return [*means, share, str(len(seeds))]

    columns = ["Dice", f"`{baseline}`", "bound", "gap share (mean [95 % interval])", "seeds"]
    return group_table(groups, columns, cells)


def paired_table(groups: dict[tuple, list[dict]], baseline: str = "supervised") -> str:
    """Each method minus ``baseline`` on the same seeds (same volume, same crops drawn first),
    in the same regime (placement, context, annealing).

    Every seed is a different synthetic volume and the seed-to-seed spread is large, so the
    paired difference with a bootstrap interval over seeds is the fair comparison.
    """

    def cells(key, rs):
        method = key[1]
        base = groups.get(partner_key(key, rs[0], baseline))
        if method == baseline or not base or key == partner_key(key, rs[0], baseline):
            return None
        base_by_seed, mine = by_seed(base), by_seed(rs)
        pairs = [(d, base_by_seed[s]) for s, d in mine.items() if s in base_by_seed]
        if len(pairs) < 2:
            return None
        a, b = np.array(pairs).T
        m, lo, hi = paired_difference(a, b)
        return [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]", f"{int((a > b).sum())}/{len(a)} seeds"]

    return group_table(groups, [f"Dice minus `{baseline}` (mean [95 % interval])", "better on"], cells)


def whole_slice_table(groups: dict[tuple, list[dict]]) -> str:
    """Dice of the same weights predicting in windows (``dice``) and whole slices, where recorded."""

    def cells(key, rs):
        rs = [r for r in rs if "dice_whole_slices" in r]
        if not rs:
            return None
        d = np.array([r["dice"] for r in rs])
        w = np.array([r["dice_whole_slices"] for r in rs])
        return [f"{d.mean():.3f} ± {d.std():.3f}", f"{w.mean():.3f} ± {w.std():.3f}", str(len(rs))]

    return group_table(groups, ["windows (default)", "whole slices", "seeds"], cells)


def error_table(groups: dict[tuple, list[dict]]) -> str:
    """Where the errors lie (:func:`error_anatomy`), summed over the seeds that recorded it."""

    def cells(key, rs):
        es = [r["errors"] for r in rs if "errors" in r]
        if not es:
            return None
        tot = {name: sum(e[name] for e in es) for name in es[0]}
        return [
            f"{tot['fn_in_missed_regions']:,} of {tot['fn']:,}",
            f"{tot['fp_in_false_regions']:,} of {tot['fp']:,}",
            f"{tot['truth_voxels']:,}",
            str(len(es)),
        ]

    columns = ["false negatives: in wholly missed regions", "false positives: in wholly false regions",
               "truth voxels", "seeds"]
    return group_table(groups, columns, cells)


def report(path: Path, out_md: Path, out_png: Path) -> str:
    """Aggregate the JSON lines into a Markdown table (mean ± std over seeds) and a plot."""
    rows = load(path)
    if not rows:
        raise SystemExit(f"no results in {path}")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["sample"], variant(r), r["k"], r["budget_minutes"], r["clock"]), []).append(r)
    lines = [
        "| sample | method | K | budget | Dice (mean ± std) | soft Dice | steps | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (sample, method, k, budget, clock), rs in sorted(groups.items()):
        d = np.array([r["dice"] for r in rs])
        s = np.array([r["soft_dice"] for r in rs])
        steps = int(np.mean([r["steps"] for r in rs]))
        lines.append(
            f"| {sample} | {method} | {k} | {budget} min {clock} | {d.mean():.3f} ± {d.std():.3f} "
            f"| {s.mean():.3f} | {steps} | {len(rs)} |"
        )
    table = "\n".join(lines)
    for extra in (paired_table(groups), gap_table(groups), whole_slice_table(groups), error_table(groups)):
        if extra:
            table += "\n\n" + extra
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        samples = sorted({g[0] for g in groups})
        fig, axes = plt.subplots(1, len(samples), figsize=(6 * len(samples), 4), squeeze=False)
        for ax, sample in zip(axes[0], samples):
            methods = sorted({g[1] for g in groups if g[0] == sample})
            for m in methods:
                ks = sorted({g[2] for g in groups if g[0] == sample and g[1] == m})
                means, stds = [], []
                for k in ks:
                    rs = [r for g, v in groups.items() if g[:3] == (sample, m, k) for r in v]
                    d = np.array([r["dice"] for r in rs])
                    means.append(d.mean())
                    stds.append(d.std())
                ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=m)
            ax.set_title(sample)
            ax.set_xlabel("annotated slices K")
            ax.set_ylabel("Dice on unannotated slices")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=90)
    except ImportError:
        pass
    return table


def main(argv=None) -> int:
    import semiseg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--samples", nargs="+", default=["phantom", "digits"], choices=["phantom", "nuclei", "head", "digits"])
    p.add_argument("--k", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--placement", nargs="+", choices=["even", "clustered", "random"], default=["even"],
                   help="where the K annotated slices lie among the structure-bearing slices (one or more)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=1.0, help="training budget per run")
    p.add_argument("--clock", choices=["wall", "process"], default="process")
    p.add_argument("--steps", type=int, default=100000, help="step cap (the budget usually binds)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96,
                   help="training crop side; 0: each method's automatic crop (engine.auto_crop), its default")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--anneal", type=float, default=0.0,
                   help="share of the budget over which the learning rate falls to 0 (TrainConfig.anneal)")
    p.add_argument("--context", type=int, default=0,
                   help="neighbouring slices on each side as extra channels (TrainConfig.context)")
    p.add_argument("--no-tags", dest="tags", action="store_false", help="hide weak tags from methods")
    p.add_argument("--every-slice-labelled", action="store_true",
                   help="upper bound: train on the truth of every slice, score the slices a K-slice run leaves")
    p.add_argument("--no-whole-slices", dest="whole_slices", action="store_false",
                   help="skip the second prediction (whole slices instead of windows) and its Dice")
    p.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                   help="save each trained model in DIR (<method>_<sample>_k<K>_<placement>_seed<S>.pt)")
    p.add_argument("--report", action="store_true", help="aggregate results and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out, args.out.with_suffix(".md"), args.out.with_suffix(".png")))
        return 0
    methods = args.methods or semiseg.list_methods()
    params = parse_params(args.param)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_models is not None:
        args.save_models.mkdir(parents=True, exist_ok=True)
    regimes = [(k, pl) for pl in args.placement for k in args.k]
    for sample in args.samples:
        if args.every_slice_labelled:  # one model per seed, scored on every regime
            for seed in args.seeds:
                for m in methods:
                    for row in run_regimes(m, sample, regimes, seed, args, params.get(m, {})):
                        append_result(args.out, row)
            continue
        for k, placement in regimes:
            for seed in args.seeds:
                for m in methods:
                    append_result(args.out, run_one(m, sample, k, seed, args, params.get(m, {}), placement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
