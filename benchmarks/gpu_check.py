"""A GPU check that fits in ten minutes (issue 19).

On a CUDA machine it runs

1. the ``gpu``-marked tests (``pytest -m gpu``),
2. the Table II miniature of Vorontsov et al. (:mod:`table2`: cluttered digits, 1 % of the
   presence slices annotated, 9s only) for ``translation`` and ``supervised``, seed 0, with the
   papers' model sizes (``--preset paper``), each for half of ``--minutes`` of wall-clock time,

and writes the figures (Dice, steps, steps per second) and the peak GPU memory of each run to a
JSON results file. ``--tiny`` runs the same on the CPU with tiny data and budgets, the CPU
preset and a few seconds per method, in under a minute: a check of the script itself, not a
measurement.

Examples
--------
::

    python benchmarks/gpu_check.py                 # on a CUDA machine, ~8 minutes
    python benchmarks/gpu_check.py --tiny          # anywhere, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "gpu_check.json"


def run_gpu_tests(timeout: float) -> dict:
    """``pytest -m gpu`` in a subprocess; its summary line, exit code and duration."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [x for x in proc.stdout.splitlines() if x.strip()]
        summary, rc = (lines[-1] if lines else proc.stderr.strip()[-200:]), proc.returncode
    except subprocess.TimeoutExpired:
        summary, rc = f"timed out after {timeout:.0f} s", 124
    return {"command": " ".join(cmd[1:]), "summary": summary, "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_table2(args, device: str) -> list[dict]:
    """The Table II miniature for each method, seed 0; peak GPU memory per run on CUDA."""
    import torch
    from table2 import make_data, run_one

    t2 = argparse.Namespace(
        steps=args.steps, minutes=args.minutes / len(args.methods), batch_size=args.batch_size,
        threads=args.threads, n_train=args.n_train, n_test=args.n_test, fraction=0.01, clutter=8,
        data_seed=0, device=device, preset=args.preset, clock="wall",
    )
    train, test = make_data(t2)
    rows = []
    for m in args.methods:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = run_one(m, 0, train, test, t2, {})
        row["peak_gpu_memory_mib"] = (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
        )
        row["steps_per_s"] = round(row["steps"] / max(row["train_wall_s"], 1e-9), 2)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "dice", "soft_dice", "steps", "steps_per_s",
                                              "peak_gpu_memory_mib", "preset")}), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny data and budgets: check the script (< 1 min)")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock minutes shared by the Table II runs")
    p.add_argument("--methods", nargs="+", default=["translation", "supervised"])
    p.add_argument("--preset", default="paper", help="model sizes (paper: the papers'; cpu)")
    p.add_argument("--batch-size", type=int, default=20, help="the paper's batch for synthetic data")
    p.add_argument("--steps", type=int, default=10**6, help="step cap (the time budget binds)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-timeout", type=float, default=120.0, help="seconds for the gpu-marked tests")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    import torch

    if args.tiny:
        args.minutes, args.preset, args.batch_size = min(args.minutes, 0.2), "cpu", 4
        args.n_train, args.n_test = 60, 40
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --tiny to check the script on the CPU", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {
        "tiny": args.tiny, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__, "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    result["gpu_tests"] = run_gpu_tests(args.test_timeout)
    print(json.dumps({"gpu_tests": result["gpu_tests"]["summary"]}), flush=True)
    result["table2"] = run_table2(args, device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
