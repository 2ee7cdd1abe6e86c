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

``--compete`` (issue 20) measures instead how training shares a busy machine: the step time of
``supervised`` alone, beside one competing busy process (a pure-Python loop, one core), and as
one of two trainings started together, each under two thread policies: ``default`` (torch
imported before semiseg: torch's default threads, OpenMP's spinning wait) and ``semiseg`` (what
``semiseg train`` does: ``import semiseg`` loads torch with the passive OpenMP wait policy, then
:func:`semiseg.threads.configure_threads`).
Every training runs in a fresh process (OpenMP reads its wait policy when torch loads), the
scenarios of one policy back to back, the whole sequence ``--repeats`` times::

    python benchmarks/train_speed.py --compete --steps 8 --warmup 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# torch is imported inside the functions, after semiseg where it matters: ``--compete``'s
# children must let ``import semiseg`` load torch (the OpenMP wait policy is read then).
# Same --param syntax as the other harnesses (the script folder is on sys.path).
from annotation_efficiency import parse_params


class Timers:
    def __init__(self):
        self.t = {"forward": 0.0, "backward": 0.0, "optimiser": 0.0}
        self.depth = 0
        self._f0 = self._o0 = 0.0

    def install(self):
        import torch
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
        steps=args.warmup + args.steps, batch_size=args.batch_size, crop=args.crop or None, seed=0
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


class NetTimers:
    """Per-network forward time and per-optimiser backward+step time of one method (issue 19).

    ``forward[net]``: outermost calls into each of ``method.nets`` (module hooks; a network
    called inside another's forward counts for the outer one). ``optimise[opt]``: the time of
    :meth:`semiseg.methods.base.Method.optimise` for each optimiser, i.e. the backward pass of
    the loss that optimiser minimises plus its step. ``step`` minus their sums is the rest:
    losses outside the networks, sampling, engine bookkeeping.
    """

    def __init__(self, method):
        self.forward: dict[str, float] = {}
        self.optimise: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []
        self.handles = []
        for key, net in method.nets.items():
            self.handles.append(net.register_forward_pre_hook(self._pre(key)))
            self.handles.append(net.register_forward_hook(self._post(key)))
        names = {id(o): k for k, o in method.opts.items()}
        real = method.optimise

        def optimise(loss, opt, **kw):
            t0 = time.process_time()
            try:
                return real(loss, opt, **kw)
            finally:
                k = names.get(id(opt), "other")
                self.optimise[k] = self.optimise.get(k, 0.0) + time.process_time() - t0

        method.optimise = optimise
        self._method = method
        self.at: float | None = None
        real_step = method.training_step

        def training_step(batch):
            if self.at is not None:  # time a phase: after any warm-up, at the finest pyramid level
                method.progress = self.at
            return real_step(batch)

        method.training_step = training_step

    def _pre(self, key):
        def pre(mod, args):
            self._stack.append((key, time.process_time()))
        return pre

    def _post(self, key):
        def post(mod, args, out):
            k, t0 = self._stack.pop()
            if not self._stack:
                self.forward[k] = self.forward.get(k, 0.0) + time.process_time() - t0
        return post

    def reset(self):
        self.forward.clear()
        self.optimise.clear()

    def remove(self):
        for h in self.handles:
            h.remove()
        del self._method.optimise
        del self._method.training_step


def profile_method(name, sample, args, params=None, preset="cpu"):
    """One method's mean step time split per network (forward) and per loss (backward + step),
    its progress held at ``args.at`` (0.9: past translation's warm-up, pyramid-gan's finest level).

    Returns a JSON-able dict: ``step_s``, ``forward`` {net: s}, ``optimise`` {optimiser: s},
    ``rest_s`` and the load average.
    """
    import semiseg

    def config(steps):
        return semiseg.TrainConfig(steps=steps, batch_size=args.batch_size, crop=args.crop or None, seed=0)

    # The warm-up run builds the model; the timed run continues it with the timers attached.
    model = semiseg.train(
        sample.image, sample.labels, tags=sample.tags, method=name, config=config(args.warmup),
        device="cpu", params=params, preset=preset,
    )
    timers = NetTimers(model.method)
    timers.at = args.at
    gen = semiseg.iter_train(
        sample.image, sample.labels, tags=sample.tags, config=config(args.steps), model=model, device="cpu"
    )
    next(gen)
    c0 = time.process_time()
    for _ in gen:
        pass
    step = (time.process_time() - c0) / args.steps
    fwd = {k: round(v / args.steps, 4) for k, v in timers.forward.items()}
    opt = {k: round(v / args.steps, 4) for k, v in timers.optimise.items()}
    timers.remove()
    return {
        "method": name, "preset": preset, "at_progress": args.at, "step_s": round(step, 4), "forward": fwd, "optimise": opt,
        "rest_s": round(step - sum(fwd.values()) - sum(opt.values()), 4),
        "batch_size": args.batch_size, "crop": model.tile_size, "auto_crop": not args.crop,
        "threads": args.threads, "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- --compete
#: Thread policies of ``--compete``: what a training process does before it trains.
POLICIES = ("default", "semiseg")


def compete_child(policy: str, args) -> dict:
    """One timed ``supervised`` training in this (fresh) process under ``policy``."""
    if policy == "default":
        import torch  # first: OpenMP loads with its own (spinning) wait policy
    import semiseg
    from semiseg.threads import configure_threads, import_torch

    torch = import_torch()  # loaded by semiseg (policy "default": by the line above)

    if policy != "default":
        configure_threads()
    sample = semiseg.make_phantom(0, shape=(24, 128, 128), labelled=5)
    config = semiseg.TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size,
                                 crop=args.crop, seed=0)
    gen = semiseg.iter_train(sample.image, sample.labels, tags=sample.tags, method="supervised",
                             config=config, device="cpu")
    next(gen)
    for _ in range(args.warmup):
        next(gen)
    times, cpu0 = [], time.process_time()
    t0 = time.perf_counter()
    spin = os.environ.get("OMP_WAIT_POLICY") or ("PASSIVE" if policy == "semiseg" else "spin (GNU default)")
    for _ in range(args.steps):
        next(gen)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    cpu = time.process_time() - cpu0
    for _ in gen:
        pass
    return {"policy": policy, "threads": torch.get_num_threads(), "wait": spin,
            "step_s": round(statistics.median(times), 4),
            "cpu_per_step_s": round(cpu / args.steps, 4)}


def _child_cmd(policy: str, args) -> list[str]:
    return [sys.executable, __file__, "--compete-child", policy, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
            "--crop", str(args.crop)]


def _child_env() -> dict:
    # The policies choose the threads themselves: no inherited OMP_NUM_THREADS or wait policy.
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS", "OMP_WAIT_POLICY",
            "GOMP_SPINCOUNT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _trainings(policy: str, n: int, args) -> list[dict]:
    """``n`` trainings started together; their results."""
    procs = [subprocess.Popen(_child_cmd(policy, args), env=_child_env(), stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"training child failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def compete(args) -> list[dict]:
    """Alone, beside one busy process, two at once: per policy, back to back, ``--repeats``."""
    rows = []
    for rep in range(args.repeats):
        for policy in POLICIES if rep % 2 == 0 else POLICIES[::-1]:
            load = [round(x, 2) for x in os.getloadavg()]
            alone = _trainings(policy, 1, args)[0]
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                beside = _trainings(policy, 1, args)[0]
            finally:
                busy.kill()
                busy.wait()
            pair = _trainings(policy, 2, args)
            pair_step = statistics.mean(r["step_s"] for r in pair)
            row = {
                "repeat": rep, "policy": policy,
                "threads": alone["threads"], "wait": alone["wait"],
                "alone_s": alone["step_s"], "busy_s": beside["step_s"], "pair_s": round(pair_step, 4),
                "busy_ratio": round(beside["step_s"] / alone["step_s"], 2),
                "pair_ratio": round(pair_step / alone["step_s"], 2),
                "cpu_per_step_s": {"alone": alone["cpu_per_step_s"], "busy": beside["cpu_per_step_s"],
                                   "pair": [r["cpu_per_step_s"] for r in pair]},
                "loadavg_before": load, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        print(json.dumps({"summary": policy, "target_busy_ratio": 2.5,
                          "busy_ratio": [r["busy_ratio"] for r in mine],
                          "pair_ratio": [r["pair_ratio"] for r in mine]}), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96,
                   help="training crop side; 0: each method's automatic crop (engine.auto_crop)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="split each step per network and per loss (process CPU time per step)")
    p.add_argument("--preset", default="cpu", help="with --profile: cpu, paper or auto")
    p.add_argument("--at", type=float, default=0.9,
                   help="with --profile: the run's progress held during the timed steps")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="with --profile: METHOD:KEY=VALUE, a method hyperparameter (repeatable)")
    p.add_argument("--compete", action="store_true",
                   help="training under contention (issue 20): alone, beside a busy process, two at once")
    p.add_argument("--repeats", type=int, default=2, help="--compete: rounds of the whole sequence")
    p.add_argument("--compete-child", choices=POLICIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compete_child:
        print(json.dumps(compete_child(args.compete_child, args)), flush=True)
        return
    if args.compete:
        compete(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    import semiseg

    sample = semiseg.make_phantom(0, shape=(24, 128, 128), labelled=5)
    if args.profile:
        for name in args.methods or semiseg.list_methods():
            params = parse_params(args.param).get(name)
            row = profile_method(name, sample, args, params=params, preset=args.preset)
            print(json.dumps({**row, **({"params": params} if params else {})}), flush=True)
        return
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
