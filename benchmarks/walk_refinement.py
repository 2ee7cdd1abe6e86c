"""Can an intensity-driven random walk give a network's tumours their full extent? (issue 18)

With K annotated slices clustered at one end of the lesions, most of what ``supervised`` misses
on the other slices lies at the borders of tumours it did find: it draws them too small
(``unseen_tumours.py``, docs/benchmarks.md). Self-consistency cannot enlarge a shape; the
image's own edges might. This check refines a trained model's prediction of every unannotated
slice with a 2D random walk (scikit-image) seeded by the network itself: its confident
foreground (probability >= ``--threshold``) as foreground, and background farther than
``band`` pixels from its predicted foreground as background; the band between is decided by
the walk. If the walk recovered the extent, the same refinement would make pseudo-labels for
self-training; if it does not, no such pseudo-labels will.

Train the models first (``annotation_efficiency.py --save-models DIR``), then::

    python benchmarks/walk_refinement.py --model DIR/supervised_phantom_k5_clustered_seed2.pt \
        --sample phantom --seed 2 --k 5 --placement clustered --out results.jsonl

Each row: the model's own Dice on the unannotated slices and the refined one, per band and beta.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def refine_slice(image: np.ndarray, prob: np.ndarray, *, threshold: float, band: float, beta: float) -> np.ndarray:
    """Foreground ``(H, W)`` bool of one slice after the random walk (the prediction when the
    network is confident of no foreground pixel)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import random_walker

    core = prob >= threshold
    predicted = prob >= 0.5
    if not core.any():
        return predicted
    seeds = np.zeros(prob.shape, np.int32)
    seeds[ndi.distance_transform_edt(~predicted) > band] = 1  # far background
    seeds[core] = 2
    return random_walker(image, seeds, beta=beta, mode="cg_j") == 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sample", default="phantom")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--placement", default="clustered", choices=["even", "clustered", "random"])
    p.add_argument("--threshold", type=float, default=0.95, help="confident foreground (self-training's)")
    p.add_argument("--bands", type=float, nargs="+", default=[4, 8, 12, 16], help="pixels")
    p.add_argument("--betas", type=float, nargs="+", default=[130, 500])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import semiseg
    from semiseg.metrics import dice_per_class

    sample = semiseg.make_sample(args.sample, seed=args.seed, labelled=args.k, placement=args.placement)
    res = semiseg.predict_volume(semiseg.Model.load(args.model), sample.image)
    prob = res["probabilities"][1]
    image = np.asarray(sample.image, np.float32)
    image = (image - image.mean()) / image.std()
    annotated = set(sample.annotated)
    unannotated = [z for z in range(len(image)) if z not in annotated]

    def dice(mask):
        return round(float(dice_per_class(mask, sample.truth, classes=[1], exclude_slices=sample.annotated)[1]), 4)

    base = dice(res["mask"])
    for band in args.bands:
        for beta in args.betas:
            mask = res["mask"].copy()
            t0 = time.process_time()
            for z in unannotated:
                mask[z] = refine_slice(image[z], prob[z], threshold=args.threshold, band=band, beta=beta)
            row = {
                "model": args.model.name, "sample": args.sample, "seed": args.seed, "k": args.k,
                "placement": args.placement, "threshold": args.threshold, "band": band, "beta": beta,
                "dice_network": base, "dice_walk": dice(mask),
                "walk_cpu_s": round(time.process_time() - t0, 1), "loadavg": round(os.getloadavg()[0], 2),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
