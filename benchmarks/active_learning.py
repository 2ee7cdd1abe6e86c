"""Active learning: does labelling the suggested slice beat evenly spaced or random slices?

Simulates a user on a synthetic sample (``semiseg.make_phantom`` / ``semiseg.make_digits``):
start from 1 annotated slice (the middle slice holding foreground), then add one slice per
round, up to ``--max-slices``, chosen by

``suggest``
    the top slice of :func:`semiseg.suggest.suggest_slices` with the current model (its
    defaults: uncertainty mass, ``density_weight=0``);
``suggest+density``
    the same with ``density_weight=1``: uncertainty mass times information density (tried, see
    docs/benchmarks-active-learning.md);
``even``
    the middle of the largest gap between annotated slices (the volume ends count as gaps),
    i.e. labels spread evenly through the stack;
``random``
    a uniformly random unannotated slice (seeded).

The chosen slice gets its truth copied in; when it holds no foreground the simulated user tags
it *healthy* instead (a free all-background annotation, as in the widget). After each choice the
supervised U-Net *continues from its current weights* for a fixed CPU budget (``--minutes`` of
process time per round, one thread), as the napari widget does when the user retrains after
painting a slice: round 5 has seen 5 budgets in total, the same for every strategy. The first
round's model is shared by all strategies.

Dice (hard, foreground) is reported two ways each round:

``dice``
    on the slices that strategy has not annotated (what the user gets for the rest of the
    volume);
``dice_common``
    on the slices *no* strategy has annotated in that seed and round, the same voxels for all
    three, so strategies that annotate the hardest slices do not gain by removing them from
    their own evaluation set.

Results are appended as JSON lines (one per sample, seed); ``--report`` writes the Markdown
table and the plot.

Examples
--------
The documented run (about 15 CPU-minutes)::

    python benchmarks/active_learning.py --samples phantom digits --seeds 0 1 2 --minutes 0.15
    python benchmarks/active_learning.py --report
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _stats import paired_difference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "active_learning.jsonl"
STRATEGIES = ("suggest", "suggest+density", "even", "random")


def pick_even(annotated: np.ndarray, n: int) -> int:
    """Middle of the largest gap between annotated slices (virtual ends at -1 and n)."""
    pts = np.concatenate([[-1], np.flatnonzero(annotated), [n]])
    gaps = np.diff(pts)
    j = int(np.argmax(gaps))
    i = int(pts[j] + gaps[j] // 2)
    if annotated[i]:  # cannot happen for a gap >= 2; defensive
        i = int(np.flatnonzero(~annotated)[0])
    return i


def pick(strategy: str, model, image, labels, tags, annotated, rng, args) -> int:
    from semiseg.suggest import suggest_slices

    if strategy in ("suggest", "suggest+density"):
        weight = args.density_weight if strategy == "suggest" else 1.0
        return suggest_slices(
            model, image, labels, n=1, tags=tags, spacing=args.spacing, density_weight=weight
        )[0].index
    if strategy == "even":
        return pick_even(annotated, len(annotated))
    if strategy == "random":
        return int(rng.choice(np.flatnonzero(~annotated)))
    raise ValueError(strategy)


def run_seed(kind: str, seed: int, args) -> dict:
    import torch

    import semiseg
    from semiseg.data import HEALTHY, UNKNOWN
    from semiseg.metrics import dice_per_class
    from semiseg.suggest import annotated_slices

    torch.set_num_threads(1)
    sample = semiseg.make_sample(kind, seed=seed, labelled=1)
    truth, image = sample.truth, sample.image
    n = len(truth)
    crop = args.crop if kind == "phantom" else min(args.crop, 48)
    params = {"features": tuple(args.features)}

    def config(round_):
        return semiseg.TrainConfig(
            steps=10**6, minutes=args.minutes, clock="process", seed=seed * 100 + round_,
            crop=crop, batch_size=args.batch_size,
        )

    def train(labels, tags, model, round_):
        t0 = time.process_time()
        model = semiseg.train(
            image, labels, tags=tags, method="supervised", params=params, config=config(round_),
            model=model, device="cpu",
        )
        return model, time.process_time() - t0

    labels0 = sample.labels.copy()
    tags0 = np.full(n, UNKNOWN, np.int8)
    model0, cpu0 = train(labels0, tags0, None, 1)
    strategies = tuple(args.strategies)
    state = {
        s: {"model": copy.deepcopy(model0), "labels": labels0.copy(),
            "tags": tags0.copy(), "picks": [int(i) for i in sample.annotated]}
        for s in strategies
    }
    rng = {s: np.random.default_rng([seed, 7]) for s in strategies}
    rounds = []
    cpu = {"train": cpu0, "suggest": 0.0, "predict": 0.0}
    for k in range(1, args.max_slices + 1):
        if k > 1:
            for s in strategies:
                st = state[s]
                done = annotated_slices(st["labels"], st["tags"])
                t0 = time.process_time()
                i = pick(s, st["model"], image, st["labels"], st["tags"], done, rng[s], args)
                if s in ("suggest", "suggest+density"):
                    cpu["suggest"] += time.process_time() - t0
                if truth[i].any():
                    st["labels"][i] = truth[i]
                else:
                    st["tags"][i] = HEALTHY
                st["picks"].append(i)
                st["model"], c = train(st["labels"], st["tags"], st["model"], k)
                cpu["train"] += c
        done = {s: annotated_slices(state[s]["labels"], state[s]["tags"]) for s in strategies}
        common = np.flatnonzero(np.any(list(done.values()), axis=0))
        row = {"k": k}
        for s in strategies:
            t0 = time.process_time()
            mask = semiseg.predict_volume(state[s]["model"], image, probabilities=False)["mask"]
            cpu["predict"] += time.process_time() - t0
            own = dice_per_class(mask, truth, classes=[1], exclude_slices=np.flatnonzero(done[s]))[1]
            com = dice_per_class(mask, truth, classes=[1], exclude_slices=common)[1]
            row[s] = {"dice": round(own, 4), "dice_common": round(com, 4), "picks": list(state[s]["picks"])}
        rounds.append(row)
        print(
            f"{kind} seed {seed} k={k}: "
            + ", ".join(f"{s} {row[s]['dice']:.3f}/{row[s]['dice_common']:.3f}" for s in strategies),
            file=sys.stderr, flush=True,
        )
    return {
        "sample": kind, "seed": seed, "rounds": rounds, "minutes_per_round": args.minutes,
        "clock": "process", "threads": 1, "features": list(args.features), "crop": crop,
        "batch_size": args.batch_size, "spacing": args.spacing, "density_weight": args.density_weight,
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "loadavg": round(os.getloadavg()[0], 2), "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in runs:
        if "uncertainty" in r["rounds"][0]:
            # Runs made while density weighting was the default named the strategies
            # "suggest" (density weight 1) and "uncertainty" (weight 0, today's default).
            for row in r["rounds"]:
                row["suggest+density"] = row.pop("suggest")
                row["suggest"] = row.pop("uncertainty")
            r["density_weight"] = 0.0
    return runs


def pool(paths: list[Path]) -> list[dict]:
    """Runs of every file, one per (sample, seed): the first file that has a seed wins.

    ``FILE:SAMPLE[,SAMPLE]`` takes only those samples' runs from a file (e.g. older runs whose
    other sample was measured with a different prediction path).
    """
    seen, runs = set(), []
    for spec in paths:
        path, _, only = str(spec).partition(":")
        samples = set(only.split(",")) if only else None
        for r in load(Path(path)):
            key = (r["sample"], r["seed"])
            if samples is not None and r["sample"] not in samples:
                continue
            if key not in seen:
                seen.add(key)
                runs.append(r)
    return runs


def report(paths: list[Path], out_md: Path, out_png: Path, command: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = pool(paths)
    if not runs:
        raise SystemExit(f"no results in {', '.join(map(str, paths))}")
    samples = sorted({r["sample"] for r in runs}, key=lambda s: ("phantom", "digits").index(s))
    lines = []
    fig, axes = plt.subplots(2, len(samples), figsize=(5 * len(samples), 7), squeeze=False, sharex=True)
    colours = {"suggest": "#d62728", "suggest+density": "#ff9896", "even": "#1f77b4", "random": "#7f7f7f"}
    for col, sample in enumerate(samples):
        rs = sorted((r for r in runs if r["sample"] == sample), key=lambda r: r["seed"])
        # Some runs skipped the density ablation: each strategy is summarised over the runs
        # that have it, and its seed count is shown when that is not all of them.
        strategies = [s for s in STRATEGIES if any(s in r["rounds"][0] for r in rs)]
        having = {s: [r for r in rs if s in r["rounds"][0]] for s in strategies}
        names = [s if len(having[s]) == len(rs) else f"{s} ({len(having[s])} seeds)" for s in strategies]
        seeds = [r["seed"] for r in rs]
        ks = [row["k"] for row in rs[0]["rounds"]]
        lines.append(f"### {sample} ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n")
        for row_i, metric in enumerate(("dice", "dice_common")):
            title = "own unannotated slices" if metric == "dice" else "slices no strategy annotated"
            lines.append(f"Dice on {title} (mean ± std over seeds):\n")
            lines.append("| annotated slices | " + " | ".join(names) + " |")
            lines.append("|---|" + "---|" * len(strategies))
            ax = axes[row_i][col]
            for s in strategies:
                d = np.array([[r["rounds"][i][s][metric] for i in range(len(ks))] for r in having[s]])
                ax.errorbar(ks, d.mean(0), yerr=d.std(0), label=s, color=colours[s], marker="o", capsize=3)
            for i, k in enumerate(ks):
                cells = []
                for s in strategies:
                    d = np.array([r["rounds"][i][s][metric] for r in having[s]])
                    cells.append(f"{d.mean():.3f} ± {d.std():.3f}")
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
            ax.set_title(f"{sample}: Dice on {title}", fontsize=10)
            ax.set_xlabel("annotated slices")
            ax.set_ylabel("Dice")
            ax.set_xticks(ks)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        # Paired over seeds: every strategy of a seed starts from the same volume and model.
        lines.append(
            "Paired difference *suggest* minus each baseline, own-slices Dice: mean over seeds "
            "[bootstrap 95 % interval], and the seeds where *suggest* beats both:\n"
        )
        lines.append("| annotated slices | suggest - even | suggest - random | wins over both |")
        lines.append("|---|---|---|---|")
        for i, k in enumerate(ks[1:], start=1):
            cells = []
            for o in ("even", "random"):
                m, lo, hi = paired_difference(
                    [r["rounds"][i]["suggest"]["dice"] for r in rs], [r["rounds"][i][o]["dice"] for r in rs]
                )
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            wins = sum(
                all(r["rounds"][i]["suggest"]["dice"] > r["rounds"][i][o]["dice"] for o in ("even", "random"))
                for r in rs
            )
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {wins}/{len(rs)} |")
        lines.append("")
        lines.append(f"Slices picked per seed ({' | '.join(strategies)}):\n")
        for r in rs:
            last = r["rounds"][-1]
            lines.append(
                f"- seed {r['seed']}: " + " | ".join(str(last[s]["picks"]) if s in last else "-" for s in strategies)
            )
        lines.append("")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    cpu = sum(sum(r["cpu_seconds"].values()) for r in runs) / 60
    r0 = runs[0]
    head = (
        f"Budget: {r0['minutes_per_round']} CPU-minute(s) of training per round ({r0['clock']} clock, "
        f"{r0['threads']} thread), continuing from the current weights; supervised U-Net "
        f"features={tuple(r0['features'])}, batch {r0['batch_size']}, crops {r0['crop']} (digits <= 48); "
        f"suggestion spacing {r0['spacing']}, density weight {r0.get('density_weight', 0.0)}. "
        f"Total CPU time {cpu:.1f} min.\n\nCommand:\n\n"
        f"    {command}\n"
    )
    intro = (
        "# Benchmark: active learning with slice suggestions\n\n"
        "A simulated user starts from 1 annotated slice and adds one slice per round (truth copied "
        "in; an empty slice is tagged healthy instead), chosen by **suggest** (the top slice of "
        "`semiseg.suggest.suggest_slices` with the current model, default settings), **suggest+density** "
        "(the same with `density_weight=1`), **even** (middle of the largest "
        "gap between annotated slices) or **random**. After each slice the supervised U-Net "
        "continues training from its current weights for a fixed CPU budget. Generated by "
        "`benchmarks/active_learning.py` (its docstring has the details).\n\n"
        "![Dice per round](img/active_learning.png)\n\n"
    )
    text = intro + head + "\n" + "\n".join(lines)
    out_md.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", nargs="+", default=["phantom", "digits"], choices=["phantom", "digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=0.15, help="CPU minutes of training per round")
    p.add_argument("--max-slices", type=int, default=5)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="strategies to simulate (default: all)")
    p.add_argument("--features", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--spacing", type=float, default=2.0, help="diversity length scale of suggest_slices")
    p.add_argument("--density-weight", type=float, default=0.0,
                   help="density exponent of the 'suggest' strategy (the library default, 0); "
                        "'suggest+density' uses 1")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", action="store_true", help="aggregate --out into the Markdown table and plot")
    p.add_argument("--pool", nargs="*", default=[], metavar="FILE[:SAMPLE,...]",
                   help="more result files pooled into the report (a seed already in an earlier file is "
                        "skipped); FILE:SAMPLE,... takes only those samples from FILE")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks-active-learning.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "active_learning.png")
    p.add_argument("--command", default="", help="command line recorded in the report")
    args = p.parse_args(argv)
    if args.report:
        print(report([args.out, *args.pool], args.md, args.png, args.command))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major: every finished seed covers all samples
        for kind in args.samples:
            res = run_seed(kind, seed, args)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
