"""Is the viewer fluid while the Train widget trains and predicts?

A 5 ms QTimer "heartbeat" records the gaps between its ticks on napari's GUI thread: first with
napari idle (baseline), then from pressing **Train** until the run is fully shown (prediction
layers added, suggestion list filled). By default the viewed slice changes every 100 ms in every
phase, as when a user scrolls all the time; ``--no-scroll`` measures a user who watches. A gap
is the longest time the GUI could not react. Also reported: time from pressing Train to the first preview on the
canvas, and how long Stop takes to end training.

Run under a display, e.g. (software rendering)::

    LIBGL_ALWAYS_SOFTWARE=1 xvfb-run -a -s "-screen 0 1280x1024x24" \\
        python benchmarks/ui_responsiveness.py --backend both --out benchmarks/out/ui.json

Targets (2 CPU cores, software rendering): p99 gap <= 33 ms, no gap over 250 ms, first
preview <= 5 s.

``--first-hour`` (issue 20 item 4) measures what a new user gets instead: the widget's
defaults (300 steps, no time limit) on a 48 x 160 x 160 phantom, the Train and Tags docks
docked, nobody scrolling. It reports the heartbeat while training and while the results land,
the first preview, Stop -> Train enabled again ("usable viewer"), the cost of adding and
removing a layer without and with the docks (and again after the runs, with the overlays), and
the heartbeat while tumours are sampled (a short translation run first)::

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/ui_responsiveness.py --first-hour \
        --out benchmarks/out/ui-first-hour.json

Targets: p99 <= 33 ms, first preview <= 5 s, Stop <= 1 s, a layer with the docks costs no
more than without them, no gap over 250 ms while results land or tumours are sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _stats(gaps_ms):
    g = np.asarray(gaps_ms, float)
    if g.size == 0:
        return {"n": 0}
    return {
        "n": int(g.size),
        "p50_ms": round(float(np.percentile(g, 50)), 2),
        "p99_ms": round(float(np.percentile(g, 99)), 2),
        "max_ms": round(float(g.max()), 2),
        "over_250ms": int((g > 250).sum()),
    }


class Heartbeat:
    def __init__(self, interval_ms=5):
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self):
        self.ticks = [time.perf_counter()]
        self.timer.start()

    def stop(self):
        self.timer.stop()
        return list(np.diff(self.ticks) * 1000)


def _spin(app, seconds=None, until=None, scroll=None, timeout=600):
    """Process events until ``seconds`` pass or ``until()`` holds; scroll slices meanwhile."""
    t0 = time.perf_counter()
    last_scroll = t0
    while True:
        app.processEvents()
        now = time.perf_counter()
        if scroll is not None and now - last_scroll >= 0.1:
            scroll()
            last_scroll = now
        if seconds is not None and now - t0 >= seconds:
            return
        if until is not None and until():
            return
        if now - t0 > timeout:
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.001)


def run_backend(backend: str, args) -> dict:
    import torch
    from qtpy.QtWidgets import QApplication

    import napari
    from semiseg.napari._sample import phantom_sample
    from semiseg.napari._train import TrainWidget

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    viewer = napari.Viewer(show=True)
    for data, meta, kind in phantom_sample():
        getattr(viewer, f"add_{kind}")(data, **meta)
    w = TrainWidget(viewer, backend=backend, prewarm=True)
    viewer.window.add_dock_widget(w, name="Train")
    w.steps_spin.setValue(args.steps)
    if args.features:
        w.params.set_value("features", tuple(int(f) for f in args.features.split(",")))
    if w.pool is not None:
        w.pool.nice = args.nice
    w.minutes_spin.setValue(args.minutes)
    app = QApplication.instance()
    n = viewer.layers["phantom"].data.shape[0]
    state = {"z": 0}

    def scroll():
        state["z"] = (state["z"] + 1) % n
        viewer.dims.set_point(0, state["z"])

    if not args.scroll:
        scroll = None

    def settle():  # the embedded suggestion list computes after each run
        sugg = getattr(w, "suggestions", None)
        if sugg is not None and hasattr(sugg, "busy"):
            _spin(app, until=lambda: not sugg.busy)

    if w.pool is not None:  # the spare worker process imports torch before we measure
        ready = w.pool.wait_ready(timeout=300)
        print(f"[{backend}] spare worker ready: {ready}", flush=True)
    _spin(app, seconds=1.0)
    hb = Heartbeat()
    load0 = os.getloadavg()
    hb.start()
    _spin(app, seconds=args.idle, scroll=scroll)
    idle = hb.stop()

    hb.start()
    t0 = time.perf_counter()
    w.train_button.click()
    phases = {}
    _spin(app, until=lambda: w.phase == "predict" or w.worker is None, scroll=scroll)
    phases["train_s"] = time.perf_counter() - t0
    train_gaps = hb.stop()
    hb.start()
    t1 = time.perf_counter()
    # Until the run is fully shown: layers added, suggestion list filled.
    _spin(app, until=lambda: not w.busy, scroll=scroll)
    phases["predict_s"] = time.perf_counter() - t1
    predict_gaps = hb.stop()
    settle()
    first_preview = w.first_preview_after
    error = repr(w.last_error) if w.last_error else None
    steps = w.model.history[-1]["steps"] if w.model is not None else 0

    # Stop latency: a long run, Stop after a few seconds of training.
    w.minutes_spin.setValue(0)
    w.steps_spin.setValue(1_000_000)
    if w.pool is not None:
        _spin(app, seconds=1.5)
        w.pool.wait_ready(timeout=300)
    w.train_button.click()
    _spin(app, until=lambda: w.phase == "train" and w.progress.value() >= 2, scroll=scroll)
    ts = time.perf_counter()
    w.stop_button.click()
    _spin(app, until=lambda: w.phase != "train", timeout=120)
    stop_latency = time.perf_counter() - ts
    _spin(app, until=lambda: not w.busy)
    settle()
    load1 = os.getloadavg()
    w.shutdown()
    viewer.close()
    return {
        "backend": backend,
        "steps_trained": steps,
        "error": error,
        "idle": _stats(idle),
        "train": _stats(train_gaps),
        "predict": _stats(predict_gaps),
        "train_and_predict": _stats(train_gaps + predict_gaps),
        "first_preview_s": None if first_preview is None else round(first_preview, 2),
        "stop_latency_s": round(stop_latency, 3),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in load1],
    }


def _layer_costs(app, viewer, shape, repeats=3):
    """Median seconds of adding, then removing, a labels layer of ``shape`` (events processed)."""
    add, remove = [], []
    for _ in range(repeats):
        data = np.zeros(shape, np.uint8)
        t0 = time.perf_counter()
        layer = viewer.add_labels(data, name="bench layer")
        app.processEvents()
        add.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        viewer.layers.remove(layer)
        app.processEvents()
        remove.append(time.perf_counter() - t0)
        _spin(app, seconds=0.3)
    return {"add_s": round(float(np.median(add)), 3), "remove_s": round(float(np.median(remove)), 3)}


def run_first_hour(args) -> dict:
    """Issue 20 item 4: the widget's defaults on a 48 x 160 x 160 volume (see module doc)."""
    import resource

    from qtpy.QtWidgets import QApplication

    import napari
    from semiseg import make_phantom
    from semiseg.napari._sample import sample_layers
    from semiseg.napari._tags import TagWidget
    from semiseg.napari._train import TrainWidget

    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    viewer = napari.Viewer(show=True)
    sample = make_phantom(0, shape=tuple(args.shape))
    for data, meta, kind in sample_layers(sample):
        getattr(viewer, f"add_{kind}")(data, **meta)
    app = QApplication.instance()
    _spin(app, seconds=1.0)
    out = {"shape": list(args.shape), "layer_without_docks": _layer_costs(app, viewer, args.shape)}
    w = TrainWidget(viewer, backend=args.backend if args.backend != "both" else "process", prewarm=True)
    viewer.window.add_dock_widget(w, name="Train")
    tags = TagWidget(viewer)
    viewer.window.add_dock_widget(tags, name="Tags")
    if w.pool is not None:
        print(f"spare worker ready: {w.pool.wait_ready(timeout=300)}", flush=True)
    _spin(app, seconds=1.0)
    out["layer_with_docks"] = _layer_costs(app, viewer, args.shape)
    out["defaults"] = {"steps": w.steps_spin.value(), "minutes": w.minutes_spin.value(),
                       "batch": w.batch_spin.value(), "crop": w.crop_spin.value()}
    load0 = os.getloadavg()

    hb = Heartbeat()
    hb.start()
    t0 = time.perf_counter()
    w.train_button.click()
    _spin(app, until=lambda: w.phase == "predict" or w.worker is None, timeout=1800)
    out["train_s"] = round(time.perf_counter() - t0, 1)
    train_gaps = hb.stop()
    hb.start()
    _spin(app, until=lambda: not w.busy, timeout=600)
    land_gaps = hb.stop()
    out["error"] = repr(w.last_error) if w.last_error else None
    out["train"] = _stats(train_gaps)
    out["results_land"] = _stats(land_gaps)
    out["first_preview_s"] = None if w.first_preview_after is None else round(w.first_preview_after, 2)
    out["steps_trained"] = w.model.history[-1]["steps"] if w.model is not None else 0

    # Stop: a run of many steps, Stop after a few; until Train can be pressed again.
    w.steps_spin.setValue(1_000_000)
    _spin(app, seconds=1.5)
    if w.pool is not None:
        w.pool.wait_ready(timeout=300)
    w.train_button.click()
    _spin(app, until=lambda: w.phase == "train" and w.progress.value() >= 3, timeout=600)
    hb.start()
    ts = time.perf_counter()
    w.stop_button.click()
    _spin(app, until=lambda: w.train_button.isEnabled(), timeout=600)
    out["stop_to_train_enabled_s"] = round(time.perf_counter() - ts, 3)
    _spin(app, until=lambda: not w.busy, timeout=600)
    out["stop_until_shown_s"] = round(time.perf_counter() - ts, 3)
    out["after_stop"] = _stats(hb.stop())
    _spin(app, seconds=1.0)
    out["layer_with_docks_after_runs"] = _layer_costs(app, viewer, args.shape)

    # Tumour samples: a short translation run, then Sample on the viewed slice.
    w.method_combo.setCurrentText("translation")
    w.continue_check.setChecked(False)
    w.steps_spin.setValue(args.translation_steps)
    _spin(app, seconds=1.5)
    if w.pool is not None:
        w.pool.wait_ready(timeout=300)
    w.train_button.click()
    _spin(app, until=lambda: not w.busy, timeout=1800)
    viewer.dims.set_point(0, args.shape[0] // 2)
    _spin(app, seconds=1.5)
    if w.pool is not None:
        w.pool.wait_ready(timeout=300)
    hb.start()
    w.sample_button.click()
    _spin(app, until=lambda: not w.busy, timeout=600)
    _spin(app, seconds=0.5)
    out["sampling"] = _stats(hb.stop())
    out["sampling_error"] = repr(w.last_error) if w.last_error else None
    _spin(app, seconds=1.0)
    out["layer_with_docks_at_end"] = _layer_costs(app, viewer, args.shape)
    out["loadavg_before"] = [round(x, 2) for x in load0]
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    w.shutdown()
    viewer.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    out["cpu_s_viewer_and_reaped_workers"] = round(cpu1 - cpu0, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["process", "thread", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=0.5, help="training budget per run")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle baseline")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--features", default="", help="U-Net features, e.g. 16,32,64 (default: method's)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the worker process")
    ap.add_argument("--no-scroll", dest="scroll", action="store_false",
                    help="do not change the viewed slice every 100 ms")
    ap.add_argument("--first-hour", action="store_true",
                    help="issue 20: the widget's defaults on --shape, docks docked, Stop, layers, sampling")
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 160, 160], help="phantom shape (--first-hour)")
    ap.add_argument("--translation-steps", type=int, default=10, help="translation run before sampling")
    args = ap.parse_args(argv)
    if args.first_hour:
        res = {"cpu_count": os.cpu_count(), "software_gl": os.environ.get("LIBGL_ALWAYS_SOFTWARE"),
               "args": {k: str(v) for k, v in vars(args).items()}, "first_hour": run_first_hour(args)}
        print(json.dumps(res, indent=2), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2))
        return 0
    backends = ["process", "thread"] if args.backend == "both" else [args.backend]
    results = {
        "cpu_count": os.cpu_count(),
        "platform": os.environ.get("QT_QPA_PLATFORM", "xcb"),
        "software_gl": os.environ.get("LIBGL_ALWAYS_SOFTWARE"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
    }
    for b in backends:
        res = run_backend(b, args)
        results["runs"].append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print("| backend | phase | p50 ms | p99 ms | max ms | gaps > 250 ms |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        for phase in ("idle", "train", "predict"):
            s = r[phase]
            print(f"| {r['backend']} | {phase} | {s.get('p50_ms')} | {s.get('p99_ms')} | {s.get('max_ms')} | {s.get('over_250ms')} |")
    for r in results["runs"]:
        print(f"{r['backend']}: first preview {r['first_preview_s']} s, stop {r['stop_latency_s']} s, "
              f"steps {r['steps_trained']}, load {r['loadavg_before']} -> {r['loadavg_after']}, error {r['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
