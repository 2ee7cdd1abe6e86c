"""A sagittal slice painted beside K axial ones: with and without recorded planes (issue 16).

The phantom's truth is copied into K evenly spaced axial slices and into the whole sagittal
slice that crosses the most tumour. ``supervised`` then trains along Z three ways, for a fixed
number of steps (identical work in every arm):

``axial-only``
    the K axial slices only (no sagittal slice painted): the reference.
``sagittal, no planes``
    the same labels plus the sagittal slice, read as today: every axial slice the sagittal one
    crosses holds labels, so all count as annotated and their unpainted tumour voxels are
    taught as background.
``sagittal, planes``
    the same labels with the planes recorded (``planes=...``): only the K axial slices are
    annotated; a 2D method ignores the sagittal slice.

Hard Dice of the tumour class on the axial slices that are not among the K, one JSON line per
run appended to ``results/planes.jsonl``; ``--report`` prints the table.

    python benchmarks/planes.py --seeds 0 1 2 --k 3 --steps 150
    python benchmarks/planes.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "planes.jsonl"
ARMS = ("axial-only", "sagittal, no planes", "sagittal, planes")


def run_seed(seed: int, args) -> list[dict]:
    import torch

    import semiseg
    from semiseg.metrics import dice_per_class
    from semiseg.planes import planes_from_labels

    torch.set_num_threads(1)
    s = semiseg.make_phantom(seed, labelled=args.k)
    x = int(np.argmax((s.truth > 0).any(axis=1).sum(axis=0)))  # sagittal slice crossing most tumour
    with_sag = s.labels.copy()
    with_sag[:, :, x] = s.truth[:, :, x]
    planes = (*planes_from_labels(s.labels, 0), (2, x))
    crossed = int((with_sag.reshape(len(with_sag), -1) > 0).any(1).sum())
    rows = []
    for arm in ARMS:
        labels = s.labels if arm == "axial-only" else with_sag
        config = semiseg.TrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        model = semiseg.train(s.image, labels, config=config, device="cpu",
                              planes=planes if arm == "sagittal, planes" else None)
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        mask = semiseg.predict_volume(model, s.image, probabilities=False)["mask"]
        dice = dice_per_class(mask, s.truth, classes=[1], exclude_slices=s.annotated)[1]
        h = model.history[-1]
        row = {
            "arm": arm, "seed": seed, "k": args.k, "sagittal_x": x, "dice": round(float(dice), 4),
            "annotated_slices": len(h["annotated_slices"]), "slices_holding_labels": crossed,
            "steps": h["steps"], "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
            "batch_size": args.batch_size, "crop": args.crop, "threads": 1,
            "loadavg": round(os.getloadavg()[0], 2), "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| arm | seeds | annotated slices (mean) | Dice, unannotated axial slices (mean ± sd) | per seed |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        d = np.array([r["dice"] for r in rs])
        per = ", ".join(f"{r['seed']}: {r['dice']:.3f}" for r in rs)
        lines.append(f"| {arm} | {len(rs)} | {np.mean([r['annotated_slices'] for r in rs]):.1f} | "
                     f"{d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} | {per} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=3, help="annotated axial slices")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        return 0
    for seed in args.seeds:
        run_seed(seed, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
