"""Cost of predicting slices whole vs in windows of the training crop (CPU time per slice).

Random-weight supervised U-Nets (the cost does not depend on the weights) predict in-memory
normalised slices through :func:`semiseg.inference.predict_normalised_slices`, once with
``tile_size=None`` (whole slices) and once per window size (overlap 1/4, Gaussian blending).

Example::

    python benchmarks/window_speed.py --side 1024 --slices 2 --windows 96 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    import torch

    from semiseg.inference import predict_normalised_slices
    from semiseg.methods import get_method

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--windows", nargs="+", type=int, default=[96, 256])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((args.slices, 1, args.side, args.side)).astype(np.float32)
    for features in [(8, 16), (16, 32, 64, 128)]:
        method = get_method("supervised")(1, 2, params={"features": features})
        for tile in [None, *args.windows]:
            predict_normalised_slices(method, x[:1, :, :128, :128], tile_size=tile)  # warm-up
            t0 = time.process_time()
            predict_normalised_slices(method, x, tile_size=tile)
            per_slice = (time.process_time() - t0) / args.slices
            print(json.dumps({
                "features": list(features), "window": tile, "side": args.side,
                "cpu_seconds_per_slice": round(per_slice, 3), "threads": args.threads,
                "loadavg": round(os.getloadavg()[0], 2),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
