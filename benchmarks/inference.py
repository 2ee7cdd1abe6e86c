"""Chunked (lazy) prediction of a volume larger than memory: throughput and peak memory.

Phases (each runs in its own process so its peak RSS is its own; ``all`` runs them in turn):

``generate``
    Write a uint16 zarr volume chunk-wise (one uncompressed chunk per slice, so the store is
    ``Z * Y * X * 2`` bytes on disk: 4.2 GB for 2000 x 1024 x 1024).
``ours``
    :func:`semiseg.lazy.predict_to_zarr` from the zarr store to a zarr mask, slab by slab, on
    ``--slices`` slices (0 = all) with the U-Net under test.
``pipeline``
    The same over the whole store with a 1x1-convolution "network": measures the pipeline
    itself (read, normalise, predict, write) and its peak RSS on the full volume.
``floor``
    The network's raw batched forward on in-memory normalised whole slices (a subset, timed and
    extrapolated per voxel): the ceiling any slice-wise pipeline can reach.
``monai``
    The same network through MONAI's ``sliding_window_inference`` (256 x 256 windows, overlap
    0.25) on in-memory slices (a subset, extrapolated per voxel; reading is not timed).
``memory``
    Peak RSS of ``semiseg predict MODEL VOLUME.zarr -o MASK.zarr [--prob PROB.zarr]``, each in a
    fresh process, on zarr stacks of ``--memory-slices`` (default 8 and 32) slices of
    ``--memory-side`` (2048) squared uint16, with a saved model (``--features``) predicting in
    ``--tile`` windows as a model from ``semiseg train --crop TILE`` does. Memory must not grow
    with the number of slices (issue #16).

Every phase prints one JSON line with voxels/s, seconds, peak RSS (``ru_maxrss``) and the load
average. Run on a shared machine: one phase at a time, ``torch.set_num_threads(--threads)``.

Example::

    python benchmarks/inference.py all --dir /tmp/semiseg-bench --shape 2000 1024 1024 \\
        --batch-size 1 --slices 12 --subset 8 --delete
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _model(features, tiny_head=False):
    import torch

    from semiseg.data import Normaliser
    from semiseg.methods import get_method
    from semiseg.model import Model

    torch.manual_seed(0)
    method = get_method("supervised")(1, 2, params={"features": tuple(features)}, device="cpu")
    if tiny_head:
        method.nets["seg"] = torch.nn.Conv2d(1, 2, 1)
    for n in method.nets.values():
        n.eval()
    return Model(method, Normaliser((100.0,), (4000.0,)), 0)


def _report(phase, voxels, seconds, **extra):
    rec = {
        "phase": phase,
        "voxels": int(voxels),
        "seconds": round(seconds, 2),
        "voxels_per_s": round(voxels / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }
    print(json.dumps(rec), flush=True)
    return rec


def generate(args):
    import zarr

    path = Path(args.dir) / "volume.zarr"
    z, y, x = args.shape
    arr = zarr.create_array(
        str(path), shape=(z, y, x), chunks=(1, y, x), dtype="uint16", compressors=None,
        overwrite=True,
    )
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:y, :x]
    base = (1000 + 800 * np.sin(yy / 37.0) * np.cos(xx / 53.0)).astype(np.float32)
    t = time.perf_counter()
    for i in range(0, z, 16):
        n = min(16, z - i)
        noise = rng.integers(0, 400, size=(n, y, x), dtype=np.uint16)
        arr[i : i + n] = (base[None] + 500 * np.sin(i / 50.0)).astype(np.uint16) + noise
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    _report("generate", z * y * x, time.perf_counter() - t, bytes_on_disk=size)


def _open(args):
    from semiseg.io import open_zarr_array

    return open_zarr_array(Path(args.dir) / "volume.zarr")


def ours(args, tiny_head=False):
    import dask.array as da

    from semiseg.lazy import predict_to_zarr

    image = _open(args)
    n = image.shape[0] if (tiny_head or not args.slices) else min(args.slices, image.shape[0])
    src = da.from_zarr(image)[:n]
    model = _model(args.features, tiny_head)
    out = Path(args.dir) / "mask.zarr"
    t = time.perf_counter()
    predict_to_zarr(
        model, src, {"mask": out}, batch_size=args.batch_size, num_workers=args.workers
    )
    dt = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    _report(
        "pipeline" if tiny_head else "ours", n * np.prod(image.shape[1:]), dt, slices=n,
        features=None if tiny_head else list(args.features), batch_size=args.batch_size,
        workers=args.workers, mask_bytes=size,
    )


def _subset(args):
    image = _open(args)
    n = min(args.subset, image.shape[0])
    model = _model(args.features)
    x = model.normaliser(np.asarray(image[:n], np.float32)[:, None], channel_axis=1)
    return model, x


def _to_mask(logits):
    """Softmax + argmax as ``semiseg.inference`` does it (its fast class-axis argmax), so the
    floor and MONAI are not slowed by torch's strided ``argmax(1)`` on CPU."""
    import torch

    from semiseg.inference import _argmax_classes

    return _argmax_classes(torch.softmax(logits, 1))


def floor(args):
    import torch

    model, x = _subset(args)
    net = model.method.nets["seg"]
    with torch.no_grad():
        net(torch.from_numpy(x[:1]))  # warm-up
        t = time.perf_counter()
        for s in range(0, len(x), args.batch_size):
            _to_mask(net(torch.from_numpy(x[s : s + args.batch_size])))
        dt = time.perf_counter() - t
    _report("floor", x.size, dt, slices=len(x), extrapolated=True, batch_size=args.batch_size)


def monai(args):
    import torch
    from monai.inferers import sliding_window_inference

    model, x = _subset(args)
    net = model.method.nets["seg"]
    with torch.no_grad():
        net(torch.from_numpy(x[:1, :, :256, :256]))  # warm-up
        t = time.perf_counter()
        for s in range(0, len(x), args.batch_size):
            logits = sliding_window_inference(
                torch.from_numpy(x[s : s + args.batch_size]), roi_size=(256, 256),
                sw_batch_size=args.sw_batch, predictor=net, overlap=0.25,
            )
            _to_mask(logits)
        dt = time.perf_counter() - t
    _report("monai", x.size, dt, slices=len(x), extrapolated=True, roi=256, overlap=0.25,
            batch_size=args.batch_size, sw_batch_size=args.sw_batch)


_CLI = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from semiseg.cli import main
t = time.perf_counter()
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def memory(args):
    import zarr

    root = Path(args.dir)
    side = args.memory_side
    model_path = root / "memory-model.pt"
    model = _model(args.features)
    model.method.tile_size = args.tile or None
    model.save(model_path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    base = (1000 + 800 * np.sin(yy / 37.0) * np.cos(xx / 53.0)).astype(np.float32)
    for n in args.memory_slices:
        vol = root / f"memory-{n}.zarr"
        arr = zarr.create_array(str(vol), shape=(n, side, side), chunks=(1, side, side), dtype="uint16",
                                overwrite=True)
        for i in range(n):
            arr[i] = (base + rng.integers(0, 400, size=(side, side))).astype(np.uint16)
        for prob in (False, True):
            argv = ["predict", str(model_path), str(vol), "-o", str(root / "memory-mask.zarr"),
                    "--batch-size", str(args.batch_size)]
            if prob:
                argv += ["--prob", str(root / "memory-prob.zarr")]
            done = subprocess.run([sys.executable, "-c", _CLI, str(args.threads), *argv],
                                  check=True, capture_output=True, text=True)
            rec = json.loads(done.stdout.strip().splitlines()[-1])
            out = {
                "phase": "memory", "slices": n, "side": side, "outputs": "mask+prob" if prob else "mask",
                "features": list(args.features), "tile": args.tile, "batch_size": args.batch_size,
                "seconds": rec["seconds"], "voxels_per_s": round(n * side * side / rec["seconds"]),
                "peak_rss_mb": rec["peak_rss_mb"], "loadavg": [round(x, 2) for x in os.getloadavg()],
                "command": "semiseg " + " ".join(argv),
            }
            print(json.dumps(out), flush=True)
            for name in ("memory-mask.zarr", "memory-prob.zarr"):
                shutil.rmtree(root / name, ignore_errors=True)
        shutil.rmtree(vol, ignore_errors=True)


PHASES = {"memory": memory, "generate": generate, "ours": ours, "pipeline": lambda a: ours(a, True), "floor": floor, "monai": monai}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=[*PHASES, "all"])
    p.add_argument("--dir", default="/tmp/semiseg-bench")
    p.add_argument("--shape", type=int, nargs=3, default=(2000, 1024, 1024))
    p.add_argument("--features", type=int, nargs="+", default=(8, 16))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--slices", type=int, default=16, help="slices for 'ours' (0: whole volume)")
    p.add_argument("--subset", type=int, default=8, help="slices timed for floor and monai")
    p.add_argument("--sw-batch", type=int, default=16, help="MONAI windows per forward")
    p.add_argument("--workers", type=int, default=1, help="dask threads for 'ours'")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--memory-slices", type=int, nargs="+", default=(8, 32), help="volumes for 'memory'")
    p.add_argument("--memory-side", type=int, default=2048, help="slice side for 'memory'")
    p.add_argument("--tile", type=int, default=256, help="prediction window of 'memory' (0: whole slices)")
    p.add_argument("--delete", action="store_true", help="remove the volume at the end of 'all'")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.phase != "all":
        PHASES[args.phase](args)
        return
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("all", "--delete")]
    try:
        for phase in ("generate", "pipeline", "ours", "floor", "monai"):
            subprocess.run([sys.executable, __file__, phase, *rest], check=True)
    finally:
        if args.delete:
            shutil.rmtree(Path(args.dir) / "volume.zarr", ignore_errors=True)


if __name__ == "__main__":
    main()
