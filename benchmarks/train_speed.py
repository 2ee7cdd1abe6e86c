"""Training step time of every registered method, and the share spent in the networks.

Each method trains on the synthetic phantom (with weak tags) through the real engine
(:func:`semiseg.engine.iter_train`) at a fixed batch size and crop on the CPU. A step is the
time between two progress records: sampling and augmentation, host->device transfer, the
method's ``training_step`` and the engine's bookkeeping. Inside it we time

* ``forward``: every outermost ``nn.Module`` call (global module hooks, so ``net.encode(...)``
  style calls count too),
* ``backward``: ``torch.autograd.backward`` and ``torch.autograd.grad``,
* ``optimiser``: ``Optimizer.step`` (global optimiser hooks),

and report ``overhead = 1 - (forward + backward) / step`` (target <= 15 %), i.e. everything that
is not the networks' forward/backward: data, losses outside the networks, optimiser, engine.

Example::

    python benchmarks/train_speed.py --batch-size 8 --crop 96 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


class Timers:
    def __init__(self):
        self.t = {"forward": 0.0, "backward": 0.0, "optimiser": 0.0}
        self.depth = 0
        self._f0 = self._o0 = 0.0

    def install(self):
        from torch.nn.modules import module as M

        def pre(mod, args):
            if self.depth == 0:
                self._f0 = time.perf_counter()
            self.depth += 1

        def post(mod, args, out):
            self.depth -= 1
            if self.depth == 0:
                self.t["forward"] += time.perf_counter() - self._f0

        self.handles = [M.register_module_forward_pre_hook(pre), M.register_module_forward_hook(post)]

        def opt_pre(opt, args, kwargs):
            self._o0 = time.perf_counter()

        def opt_post(opt, args, kwargs):
            self.t["optimiser"] += time.perf_counter() - self._o0

        from torch.optim import optimizer as O

        self.handles += [O.register_optimizer_step_pre_hook(opt_pre), O.register_optimizer_step_post_hook(opt_post)]
        for name in ("backward", "grad"):
            real = getattr(torch.autograd, name)

            def wrapped(*a, _real=real, **k):
                t0 = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    self.t["backward"] += time.perf_counter() - t0

            setattr(torch.autograd, name, wrapped)

    def reset(self):
        for k in self.t:
            self.t[k] = 0.0


def bench_method(name, sample, args, timers):
    import semiseg

    config = semiseg.TrainConfig(
        steps=args.warmup + args.steps, batch_size=args.batch_size, crop=args.crop, seed=0
    )
    gen = semiseg.iter_train(
        sample.image, sample.labels, tags=sample.tags, method=name, config=config, device="cpu"
    )
    next(gen)  # setup (normalisation, networks)
    for _ in range(args.warmup):
        next(gen)
    timers.reset()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(gen)
    total = time.perf_counter() - t0
    for _ in gen:
        pass
    step = total / args.steps
    t = {k: v / args.steps for k, v in timers.t.items()}
    nets = t["forward"] + t["backward"]
    return {
        "method": name,
        "step_s": round(step, 4),
        "forward_s": round(t["forward"], 4),
        "backward_s": round(t["backward"], 4),
        "optimiser_s": round(t["optimiser"], 4),
        "nets_share": round(nets / step, 3),
        "overhead": round(1 - nets / step, 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import semiseg

    sample = semiseg.make_phantom(0, shape=(24, 128, 128), labelled=5)
    timers = Timers()
    timers.install()
    rows = []
    for name in args.methods or semiseg.list_methods():
        row = bench_method(name, sample, args, timers)
        rows.append(row)
        print(json.dumps(row), flush=True)
    worst = max(r["overhead"] for r in rows)
    print(json.dumps({"summary": "max overhead", "value": worst, "target": 0.15,
                      "median_overhead": float(np.median([r["overhead"] for r in rows]))}))


if __name__ == "__main__":
    main()
