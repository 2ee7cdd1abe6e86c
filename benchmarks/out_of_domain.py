"""Out-of-domain check of SemanticGAN (Li et al., CVPR 2021) against the supervised U-Net.

The paper's main claim is that a generative model of image-label pairs, segmenting by GAN
inversion, generalises beyond the training domain better than a discriminative network. This
script trains ``semantic-gan`` and ``supervised`` on the phantom (K annotated slices) under the
same CPU budget, then scores hard Dice on the unannotated slices of the *same* volume under three
conditions: as trained, with inverted contrast (``max + min - image``) and blurred (Gaussian,
in-plane sigma). The model's normalisation (fitted on the training image) is applied unchanged,
as a user would apply a saved model to a new scan.

SemanticGAN is scored twice: encoder initialisation only (the paper's "Ours-NO") on every
unannotated slice, and with ``--tto-steps`` of test-time optimisation ("Ours") on an evenly
spaced subset of ``--tto-slices`` of the unannotated slices holding tumour (inversion costs seconds per slice on a CPU); the
subset rows give every method's Dice on the same subset.

Example
-------
::

    python benchmarks/out_of_domain.py --minutes 5 --tto-steps 20 --tto-slices 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def conditions(image: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """The evaluation images: original, inverted contrast, in-plane Gaussian blur."""
    from scipy import ndimage as ndi

    img = image.astype(np.float32)
    return {
        "original": img,
        "inverted": np.float32(img.max() + img.min()) - img,
        f"blur(sigma={sigma:g})": ndi.gaussian_filter(img, (0, sigma, sigma)).astype(np.float32),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred == 1, truth == 1
    d = p.sum() + t.sum()
    return 1.0 if d == 0 else float(2 * (p & t).sum() / d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU (process) minutes per method")
    ap.add_argument("--k", type=int, default=5, help="annotated slices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=1.5, help="blur sigma in pixels")
    ap.add_argument("--tto-steps", type=int, default=20)
    ap.add_argument("--tto-slices", type=int, default=12, help="slices scored with test-time optimisation")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="semantic-gan parameter")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "out_of_domain.json")
    args = ap.parse_args(argv)

    import torch

    import semiseg
    from semiseg.inference import predict_volume

    torch.set_num_threads(1)
    sample = semiseg.make_phantom(args.seed, labelled=args.k)
    keep = np.setdiff1d(np.arange(len(sample.truth)), sample.annotated)
    # TTO subset: evenly spaced unannotated slices that hold tumour (Dice is about the tumour).
    cand = keep[sample.truth[keep].reshape(len(keep), -1).any(1)]
    subset = cand[np.round(np.linspace(0, len(cand) - 1, min(args.tto_slices, len(cand)))).astype(int)]
    sg_params = dict(p.split("=", 1) for p in args.param)
    config = semiseg.TrainConfig(
        steps=10**6, minutes=args.minutes, clock="process", seed=args.seed,
        batch_size=args.batch_size, crop=args.crop,
    )
    models, info = {}, {}
    for method, params in (("supervised", {}), ("semantic-gan", sg_params)):
        t0, c0 = time.perf_counter(), time.process_time()
        models[method] = semiseg.train(sample.image, sample.labels, method=method, params=params or None, config=config, device="cpu")
        h = models[method].history[-1]
        info[method] = {"steps": h["steps"], "cpu_s": round(time.process_time() - c0, 1),
                        "wall_s": round(time.perf_counter() - t0, 1), "losses": h["losses"]}
        print(method, json.dumps(info[method]), flush=True)

    rows = []
    timing = {}
    for cond, img in conditions(sample.image, args.sigma).items():
        row = {"condition": cond}
        for method, model in models.items():
            label = "semantic-gan (encoder only)" if method == "semantic-gan" else method
            if method == "semantic-gan":
                model.method.params.tto_steps = 0
            c0 = time.process_time()
            mask = predict_volume(model, img, probabilities=False)["mask"]
            timing.setdefault(label, []).append((time.process_time() - c0) / len(img))
            row[label] = dice(mask[keep], sample.truth[keep])
            row[label + " @subset"] = dice(mask[subset], sample.truth[subset])
        if args.tto_steps > 0:
            m = models["semantic-gan"]
            m.method.params.tto_steps = args.tto_steps
            c0 = time.process_time()
            mask = predict_volume(m, img[subset], probabilities=False)["mask"]
            timing.setdefault(f"semantic-gan (TTO {args.tto_steps})", []).append((time.process_time() - c0) / len(subset))
            m.method.params.tto_steps = 0
            row[f"semantic-gan (TTO {args.tto_steps}) @subset"] = dice(mask, sample.truth[subset])
        rows.append(row)
        print(json.dumps(row), flush=True)

    cols = [c for c in rows[0] if c != "condition"]
    lines = ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['condition']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print()
    print(f"Hard Dice of class 1; all = {len(keep)} unannotated slices, @subset = {len(subset)} of them "
          f"(slices {subset.tolist()}); K = {args.k}, {args.minutes} CPU min per method, 1 thread.")
    print("\n".join(lines))
    print()
    for label, ts in timing.items():
        print(f"prediction CPU seconds per 128x128 slice, {label}: {np.mean(ts):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "train": info,
                                    "rows": rows, "subset": subset.tolist(),
                                    "predict_cpu_s_per_slice": {k: float(np.mean(v)) for k, v in timing.items()}},
                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
