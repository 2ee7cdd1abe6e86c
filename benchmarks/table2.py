"""Table II of Vorontsov et al. in miniature: cluttered digits, 1 % annotated, only 9s.

Each method trains on one stack of 48x48 cluttered-digit slices (half presence, half absence)
in which 1 % of the presence slices carry masks, all of them showing the digit 9, for a fixed
CPU-time budget with one torch thread. The score is the Dice of the digit on the presence
slices of a separate stack built from the held-out digits (``split="test"``): soft Dice
accumulated over the whole evaluation set (the paper's metric) and hard Dice of the argmax.

Methods that use weak tags (``uses_tags``) get them; the others get none, so, as in the paper,
the segmentation-only baseline trains on the annotated presence slices only and the
semi-supervised baselines see every other slice as unlabelled. Results are appended, one JSON
line per run; ``--report`` prints the Markdown table beside the paper's numbers.

Examples
--------
::

    python benchmarks/table2.py --methods supervised autoencoder mean-teacher translation \
        --seeds 0 1 2 --minutes 1.5
    python benchmarks/table2.py --report

References
----------
.. [1] E. Vorontsov et al., "Towards annotation-efficient segmentation via image-to-image
   translation", IEEE TMI 2022, Table II and Section IV-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Same --param syntax and result files as the harness (the script folder is on sys.path).
from annotation_efficiency import append_result, parse_params

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "table2.jsonl"

#: Table II, synthetic 48x48 simple (mean, std over three runs).
PAPER = {
    "supervised": (0.61, 0.01),
    "autoencoder": (0.75, 0.01),
    "mean-teacher": (0.83, 0.02),
    "mean_teacher": (0.83, 0.02),
    "translation": (0.84, 0.00),
}


def make_data(args):
    """Training stack (1 % of presence slices annotated, 9s only) and test stack."""
    from semiseg.synthetic import make_digits

    n_presence = round(args.n_train * 0.5)
    k = max(1, round(args.fraction * n_presence))
    train = make_digits(
        args.data_seed, n_slices=args.n_train, clutter=args.clutter, labelled=k,
        labelled_digit=9, split="train",
    )
    test = make_digits(
        args.data_seed + 1000, n_slices=args.n_test, clutter=args.clutter, labelled=0, split="test",
    )
    return train, test


def scores(prob_fg: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Soft Dice accumulated over the set, hard Dice of ``prob_fg > 0.5``."""
    t = truth.astype(np.float64)
    soft = 2 * (prob_fg * t).sum() / (prob_fg.sum() + t.sum() + 1e-8)
    hard = prob_fg > 0.5
    hd = 2 * (hard & (truth > 0)).sum() / (hard.sum() + (truth > 0).sum() + 1e-8)
    return float(soft), float(hd)


def run_one(method: str, seed: int, train, test, args, params: dict) -> dict:
    import torch

    import semiseg
    from semiseg.methods import get_method
    from semiseg.methods.base import resolve_preset

    torch.set_num_threads(args.threads)
    cls = get_method(method)
    tags = train.tags if cls.uses_tags else None
    device = getattr(args, "device", "cpu")
    preset = getattr(args, "preset", "cpu")
    # 48x48 slices; a network with more halvings (the paper preset of translation: 32) trains
    # on crops padded up to its size multiple.
    multiple = cls(1, 2, params=cls.preset_params(resolve_preset(preset, device), params)).size_multiple
    config = semiseg.TrainConfig(
        steps=args.steps, minutes=args.minutes, clock=getattr(args, "clock", "process"), seed=seed,
        batch_size=args.batch_size, crop=-(-48 // multiple) * multiple,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    model = semiseg.train(
        train.image, train.labels, tags=tags, method=method, params=params or None,
        config=config, device=device, preset=preset,
    )
    train_cpu = time.process_time() - c0
    train_wall = time.perf_counter() - t0
    res = semiseg.predict_volume(model, test.image, batch_size=64)
    presence = test.tags == 1
    soft, hard = scores(res["probabilities"][1][presence], test.truth[presence])
    h = model.history[-1]
    return {
        "method": method, "seed": seed, "soft_dice": round(soft, 4), "dice": round(hard, 4),
        "steps": h["steps"], "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1),
        "budget_cpu_minutes": args.minutes, "batch_size": args.batch_size, "threads": args.threads,
        "annotated": len(train.annotated), "n_train": args.n_train, "n_test": args.n_test,
        "clutter": args.clutter, "tags": tags is not None, "params": params, "losses": h["losses"],
        "device": h["device"], "preset": h.get("preset"), "crop": config.crop, "clock": config.clock,
        "loadavg": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    if not rows:
        return f"no results in {path}"
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r["budget_cpu_minutes"], r["batch_size"], json.dumps(r["params"], sort_keys=True))
        groups.setdefault(key, []).append(r)
    lines = [
        "| method | params | CPU budget | steps | soft Dice | hard Dice | paper (48x48 simple) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, budget, bs, params), rs in groups.items():
        soft = np.array([r["soft_dice"] for r in rs])
        hard = np.array([r["dice"] for r in rs])
        steps = round(float(np.mean([r["steps"] for r in rs])))
        ref = PAPER.get(method)
        ref_s = f"{ref[0]:.2f} ({ref[1]:.2f})" if ref else "-"
        p = ", ".join(f"{k}={v}" for k, v in json.loads(params).items()) or "defaults"
        lines.append(
            f"| {method} | {p} | {budget} min x1 thread, batch {bs} | {steps} | "
            f"{soft.mean():.3f} ({soft.std():.3f}) | {hard.mean():.3f} ({hard.std():.3f}) | {ref_s} |"
        )
    seeds = ", ".join(sorted({str(r["seed"]) for r in rows}))
    lines.append(f"\nmean (std) over the runs with seeds {seeds}; soft Dice accumulated over the test set")
    return "\n".join(lines)


def figure(path: Path, args, params: dict) -> str:
    """Train ``translation`` on the phantom (weak tags, K annotated slices), or load
    ``args.figure_model``, and draw, for a few diseased slices: input, healthy translation,
    residual, segmentation, sampled tumours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import semiseg
    from semiseg.inference import sample_tumours

    torch.set_num_threads(args.threads)
    s = semiseg.make_phantom(0, labelled=args.figure_k)
    config = semiseg.TrainConfig(
        steps=args.steps, minutes=args.minutes, clock="process", seed=0,
        batch_size=args.batch_size, crop=args.figure_crop,
    )
    if args.figure_model:  # the model of a benchmark run (annotation_efficiency.py --save-models)
        model = semiseg.load_model(args.figure_model)
        if model.method.name != "translation":
            raise SystemExit(f"{args.figure_model} holds a {model.method.name} model, not translation")
        budget = f"model {Path(args.figure_model).name}"
    else:
        model = semiseg.train(s.image, s.labels, tags=s.tags, method="translation", params=params or None,
                              config=config, device="cpu")
        budget = f"{args.minutes} CPU-min"
    res = semiseg.predict_volume(model, s.image, outputs=("healthy", "residual"))
    diseased = np.flatnonzero(s.tags == 1)
    unannotated = np.setdiff1d(diseased, s.annotated)
    area = s.truth.reshape(len(s.truth), -1).sum(1)
    picks = sorted(unannotated[np.argsort(area[unannotated])[-6:]][::2].tolist())
    cols = ["input", "healthy (x_PA)", "residual", "segmentation", "sample 1", "sample 2", "sample 3"]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2 * len(cols), 2 * len(picks)))
    lo, hi = np.percentile(s.image, [1, 99.5])
    for r, i in enumerate(picks):
        samples = sample_tumours(model, s.image, i, 3, seed=i)
        rmax = np.abs(res["residual"][i]).max() + 1e-6
        panels = [
            (s.image[i], {"cmap": "gray", "vmin": lo, "vmax": hi}),
            (res["healthy"][i], {"cmap": "gray", "vmin": lo, "vmax": hi}),
            (res["residual"][i], {"cmap": "coolwarm", "vmin": -rmax, "vmax": rmax}),
            (s.image[i], {"cmap": "gray", "vmin": lo, "vmax": hi}),
            *[(samples[j], {"cmap": "gray", "vmin": lo, "vmax": hi}) for j in range(3)],
        ]
        for c, (img, kw) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, **kw)
            if c == 3:
                ax.contour(s.truth[i], levels=[0.5], colors="yellow", linewidths=0.8)
                ax.contour(res["mask"][i], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(f"slice {i}", fontsize=9)
    h = model.history[-1]
    fig.suptitle(
        f"translation on the phantom, K={len(s.annotated)} annotated slices, {h['steps']} steps "
        f"({budget}); segmentation: red = prediction, yellow = truth", fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    from semiseg.metrics import dice_per_class

    d = dice_per_class(res["mask"], s.truth, classes=[1], exclude_slices=s.annotated)[1]
    return f"wrote {path}: slices {picks}, {h['steps']} steps, Dice on unannotated slices {d:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["supervised", "autoencoder", "mean-teacher", "translation"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=1.5, help="CPU minutes (process time) per run")
    p.add_argument("--steps", type=int, default=100000, help="step cap (the budget usually binds)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-train", type=int, default=2000, help="training slices (half presence)")
    p.add_argument("--n-test", type=int, default=400, help="test slices (half presence)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of presence slices annotated")
    p.add_argument("--clutter", type=int, default=8, help="8: simple task, 24: hard")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", action="store_true")
    p.add_argument("--figure", type=Path, metavar="PNG", help="train translation on the phantom and draw")
    p.add_argument("--figure-k", type=int, default=5, help="annotated phantom slices for --figure")
    p.add_argument("--figure-crop", type=int, default=64)
    p.add_argument("--figure-model", type=Path, metavar="PT",
                   help="draw --figure from this saved translation model instead of training one")
    args = p.parse_args(argv)
    if args.figure_model and not args.figure:
        p.error("--figure-model draws --figure: give --figure PNG too")
    if args.report:
        print(report(args.out))
        return 0
    params = parse_params(args.param)
    if args.figure:
        print(figure(args.figure, args, params.get("translation", {})))
        return 0
    train, test = make_data(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for m in args.methods:
            append_result(args.out, run_one(m, seed, train, test, args, params.get(m, {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
