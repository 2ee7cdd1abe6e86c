"""Small test helpers shared by the test modules."""

from __future__ import annotations

import hashlib

import numpy as np

TINY_PARAMS = {"features": (8, 16)}


def array_hash(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode() + a.dtype.str.encode()).hexdigest()


def file_hash(path) -> str:
    from pathlib import Path

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def random_batch(b: int = 2, side: int = 32, k: int = 3, seed: int = 0) -> dict:
    """A seeded batch of random labelled (with ``k``-class masks) and unlabelled crops."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "labelled": torch.randn(b, 1, side, side, generator=g),
        "mask": torch.randint(0, k, (b, side, side), generator=g),
        "unlabelled": torch.randn(b, 1, side, side, generator=g),
    }
