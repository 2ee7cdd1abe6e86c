"""Soak test: many train / stop / predict cycles in the napari plugin; does memory grow?

Drives the plugin's Train widget headless (a hidden ``napari.Viewer``; run it under ``xvfb-run`` on a machine without a display) exactly as
a user would: press Train, press Stop after a few steps (the widget then predicts the volume),
press Predict, wait. After each cycle it records the process's resident memory (RSS) and, where
CUDA exists, allocated / reserved GPU memory. Growth is reported against the end of the first
cycle (the first cycle pays for imports, allocator pools and caches) and against the start.

    xvfb-run -a python benchmarks/soak.py --cycles 20 --json benchmarks/out/soak.json

``--api`` drives ``semiseg.iter_train`` / ``predict_volume`` directly (the widget's thread
backend runs the same generators) for comparison without Qt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gpu_mib() -> tuple[float, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20


def wait_until(app, cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        app.processEvents()
        time.sleep(0.005)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")


def soak_widget(args, image, labels, tags, record) -> str:
    from qtpy.QtWidgets import QApplication

    import napari
    from semiseg.napari import TAGS_KEY
    from semiseg.napari._train import TrainWidget

    viewer = napari.Viewer(show=False)
    viewer.add_image(image, name="phantom")
    viewer.add_labels(labels.copy(), name="phantom labels", metadata={TAGS_KEY: tags.copy()})
    w = TrainWidget(viewer, backend=args.backend, prewarm=False)
    w.method_combo.setCurrentText(args.method)
    w.steps_spin.setValue(100_000)  # stopped by the Stop button
    w.batch_spin.setValue(args.batch_size)
    w.crop_spin.setValue(args.crop)
    w.device_combo.setCurrentText(args.device) if args.device != "auto" else None
    w.preview_every = 0.5
    w.params.set_value("features", tuple(args.features))
    viewer.window.add_dock_widget(w)
    app = QApplication.instance()
    for cycle in range(1, args.cycles + 1):
        t0 = time.perf_counter()
        n0 = len(w.loss_plot.series.get(args.stop_key, []))
        if args.from_scratch:
            w.continue_check.setChecked(False)
        w.train_button.click()
        if not w.continue_check.isChecked():
            n0 = 0  # a fresh run clears the loss plot
        target = n0 + args.stop_after
        wait_until(app, lambda t=target: len(w.loss_plot.series.get(args.stop_key, [])) >= t, 300, "training steps")
        w.stop_button.click()
        wait_until(app, lambda: not w.busy, 300, "stop + prediction")
        sugg = getattr(w, "suggestions", None)
        if sugg is not None and hasattr(sugg, "busy"):
            wait_until(app, lambda s=sugg: not s.busy, 300, "suggestions")
        if w.last_error is not None:
            raise RuntimeError(f"cycle {cycle}: {w.last_error}")
        w.predict_button.click()
        wait_until(app, lambda: not w.busy, 300, "prediction")
        if w.last_error is not None:
            raise RuntimeError(f"cycle {cycle}: {w.last_error}")
        app.processEvents()
        gc.collect()
        record(cycle, time.perf_counter() - t0, w.model.method.step)
    w.shutdown() if hasattr(w, "shutdown") else None
    viewer.close()
    return f"TrainWidget (backend={args.backend}) in a hidden napari.Viewer"


def soak_api(args, image, labels, tags, record) -> str:
    import semiseg

    model = None
    for cycle in range(1, args.cycles + 1):
        t0 = time.perf_counter()
        config = semiseg.TrainConfig(steps=100_000, batch_size=args.batch_size, crop=args.crop)
        gen = semiseg.iter_train(
            image, labels, tags=tags, method=args.method, params={"features": tuple(args.features)},
            config=config, device=args.device, model=None if args.from_scratch else model,
        )
        while True:  # Stop after N steps the way the widget does: lower config.steps
            try:
                p = next(gen)
            except StopIteration as stop:
                model = stop.value
                break
            if p.step >= args.stop_after:
                config.steps = p.step
        semiseg.predict_volume(model, image)  # the prediction after Stop
        semiseg.predict_volume(model, image)  # the Predict button
        gc.collect()
        record(cycle, time.perf_counter() - t0, model.method.step)
    return "semiseg.iter_train (stopped after N steps) + 2 x predict_volume, no Qt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--method", default="supervised")
    ap.add_argument("--stop-after", type=int, default=10, help="loss points before pressing Stop")
    ap.add_argument("--stop-key", default="dice_loss", help="loss series counted for --stop-after")
    ap.add_argument("--shape", type=int, nargs=3, default=(16, 64, 64))
    ap.add_argument("--features", type=int, nargs="+", default=(8, 16))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="thread", choices=("thread", "process"))
    ap.add_argument("--api", action="store_true", help="drive the core generators without Qt")
    ap.add_argument(
        "--from-scratch", action="store_true",
        help="train a new model every cycle (default: like the widget, continue the current one)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the per-cycle table here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from semiseg import make_phantom

    s = make_phantom(0, shape=tuple(args.shape), labelled=3)
    rows = []
    start_rss = rss_mib()

    def record(cycle, seconds, steps):
        g = gpu_mib()
        row = {"cycle": cycle, "seconds": round(seconds, 2), "steps": steps, "rss_mib": round(rss_mib(), 1)}
        if g is not None:
            row["gpu_allocated_mib"], row["gpu_reserved_mib"] = round(g[0], 1), round(g[1], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    driver = soak_api if args.api else soak_widget
    what = driver(args, s.image, s.labels, s.tags, record)
    first, last = rows[0]["rss_mib"], rows[-1]["rss_mib"]
    summary = {
        "driver": what,
        "cycles": len(rows),
        "rss_start_mib": round(start_rss, 1),
        "rss_after_cycle_1_mib": first,
        "rss_after_last_mib": last,
        "rss_peak_mib": max(r["rss_mib"] for r in rows),
        "growth_after_cycle_1_pct": round(100 * (last - first) / first, 2),
        "growth_from_start_pct": round(100 * (last - start_rss) / start_rss, 2),
        "target_pct": 10.0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": args.threads,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
    }
    if "gpu_allocated_mib" in rows[-1]:
        summary["gpu_allocated_first_last_mib"] = [rows[0]["gpu_allocated_mib"], rows[-1]["gpu_allocated_mib"]]
    summary["pass"] = summary["growth_after_cycle_1_pct"] <= 10.0
    print(json.dumps(summary, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "cycles": rows}, fh, indent=1)
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
