"""Which phantom tumours do the annotated slices show? Evidence for the clustered regime.

A phantom tumour is brighter or darker than the organ (``semiseg.synthetic.make_phantom``).
When the K annotated slices of a placement show tumours of one contrast only, the tumours of
the other contrast are a pattern the labels never showed: a method whose only targets are
the network's own predictions (pseudo-labels, consistency) cannot learn them. This script
lists, per seed, each tumour (3D connected component of the truth), its contrast against the
organ around it, whether an annotated slice cuts it and how much of its largest cross-section
the annotated slices show, and the tumour voxels of the unannotated slices that belong to a
contrast no annotated slice shows.

Example
-------
::

    python benchmarks/unseen_tumours.py --k 5 3 --placement clustered --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi

from semiseg.synthetic import make_phantom


def tumour_table(image: np.ndarray, truth: np.ndarray, annotated: np.ndarray) -> list[dict]:
    """Per tumour: its contrast sign, whether an annotated slice cuts it, unannotated voxels.

    Parameters
    ----------
    image : (Z, Y, X) array
    truth : (Z, Y, X) integer array
        Tumour mask (nonzero = tumour).
    annotated : (Z,) bool array
        Slices the labels show.

    Returns
    -------
    list of dict
        ``sign`` (+1 brighter than a 2-voxel ring around it, -1 darker), ``seen`` (an annotated
        slice cuts it), ``voxels`` (its voxels on unannotated slices), ``area_shown`` (its
        largest cross-section on an annotated slice over its largest on any slice: 1 when the
        labels show its core, near 0 when they show only its tip).
    """
    components, n = ndi.label(truth > 0)
    img = image.astype(np.float64)
    rows = []
    for i in range(1, n + 1):
        blob = components == i
        ring = ndi.binary_dilation(blob, iterations=2) & ~(truth > 0)
        sign = 1 if img[blob].mean() > img[ring].mean() else -1
        area = blob.sum(axis=(1, 2))
        rows.append({
            "sign": sign,
            "seen": bool(annotated[area > 0].any()),
            "voxels": int(blob[~annotated].sum()),
            "area_shown": float(area[annotated].max(initial=0) / area.max()),
        })
    return rows


def unseen_contrast_share(rows: list[dict]) -> float:
    """Share of unannotated tumour voxels in tumours of a contrast no annotated slice shows."""
    shown = {r["sign"] for r in rows if r["seen"]}
    total = sum(r["voxels"] for r in rows)
    unseen = sum(r["voxels"] for r in rows if r["sign"] not in shown)
    return unseen / total if total else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[5])
    p.add_argument("--placement", nargs="+", default=["clustered"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    print("| placement | K | seed | tumours (contrast, share of its largest cross-section an annotated "
          "slice shows, unannotated voxels) "
          "| unannotated tumour voxels of an unshown contrast |")
    print("|---|---|---|---|---|")
    for placement in args.placement:
        for k in args.k:
            for seed in args.seeds:
                s = make_phantom(seed, labelled=k, placement=placement)
                annotated = np.zeros(len(s.truth), bool)
                annotated[s.annotated] = True
                rows = tumour_table(s.image, s.truth, annotated)
                desc = ", ".join(
                    f"{'+' if r['sign'] > 0 else '-'} {r['area_shown']:.0%} {r['voxels']}" for r in rows
                )
                print(f"| {placement} | {k} | {seed} | {desc} | {unseen_contrast_share(rows):.0%} |")


if __name__ == "__main__":
    main()
