"""Screenshots for docs/user-guide.md from a real run of the plugin (PNG files in docs/img/).

Run under a display, e.g.::

    LIBGL_ALWAYS_SOFTWARE=1 xvfb-run -a -s "-screen 0 1600x1000x24" \\
        python docs/make_screenshots.py --steps 300 --translation-steps 500

It opens the phantom sample, tags slices, trains ``supervised`` through the Train widget and
shoots the prediction; then, when the ``translation`` method is registered, trains it and
shoots its residual, healthy and sampled-tumour layers. ``--translation-model`` loads a saved
``translation`` model instead (through the widget's *Load model*, then *Predict*), e.g. the one
of the benchmark run (``benchmarks/annotation_efficiency.py --save-models``)::

    python benchmarks/annotation_efficiency.py --samples phantom --methods translation --k 5 \
        --seeds 0 --minutes 5 --clock process --threads 1 --save-models /tmp/models
    xvfb-run -a python docs/make_screenshots.py \
        --translation-model /tmp/models/translation_phantom_k5_even_seed0.pt
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

IMG = Path(__file__).resolve().parent / "img"


def _wait(app, until, timeout=1800):
    t0 = time.perf_counter()
    while not until():
        app.processEvents()
        time.sleep(0.01)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def _shoot(app, viewer, name, *, canvas_only, show=(), hide=()):
    """Hide then show the named layers, let the canvas redraw and save ``IMG / name``."""
    for layer in hide:
        viewer.layers[layer].visible = False
    for layer in show:
        viewer.layers[layer].visible = True
    _wait(app, lambda: True)
    viewer.screenshot(str(IMG / name), canvas_only=canvas_only)


def _train(app, w, method, steps, params=None, scratch=True):
    w.method_combo.setCurrentText(method)
    for k, v in (params or {}).items():
        w.params.set_value(k, v)
    w.steps_spin.setValue(steps)
    w.continue_check.setChecked(not scratch)
    w.train_button.click()
    _wait(app, lambda: not w.busy)
    sugg = getattr(w, "suggestions", None)
    if sugg is not None and hasattr(sugg, "busy"):
        _wait(app, lambda: not sugg.busy)
    if w.last_error is not None:
        raise RuntimeError(w.last_error)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="supervised steps (the widget's default)")
    ap.add_argument("--translation-steps", type=int, default=500,
                    help="translation steps at its CPU defaults (about 5 CPU-minutes on a 128² slice)")
    ap.add_argument("--translation-model", default=None, metavar="PATH",
                    help="load this translation model instead of training one (its figures are that run's)")
    ap.add_argument("--translation-only", action="store_true",
                    help="shoot only the residual, healthy and sampled-tumour figures")
    ap.add_argument("--backend", default="process")
    args = ap.parse_args(argv)
    # The widget lists every run kept in the runs folder; a fresh one shows only this script's.
    runs = tempfile.TemporaryDirectory(prefix="semiseg-screenshots-")
    os.environ["SEMISEG_RUNS_DIR"] = runs.name
    from qtpy.QtWidgets import QApplication

    import napari
    from semiseg.methods import list_methods
    from semiseg.napari._tags import TagWidget
    from semiseg.napari._train import TrainWidget

    IMG.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.open_sample("napari-semiseg", "phantom")
    app = QApplication.instance()
    tags = TagWidget(viewer)
    viewer.window.add_dock_widget(tags, name="Weak tags", area="right")
    w = TrainWidget(viewer, backend=args.backend)
    viewer.window.add_dock_widget(w, name="Train", area="right")
    z = 24
    viewer.dims.set_point(0, z)
    _wait(app, lambda: True)
    if not args.translation_only:
        viewer.screenshot(str(IMG / "open-sample.png"), canvas_only=False)

        _train(app, w, "supervised", args.steps)
        if "phantom uncertainty" in viewer.layers:  # from the embedded suggestion list
            viewer.layers["phantom uncertainty"].visible = False
        viewer.layers.selection.active = viewer.layers["phantom prediction"]
        _shoot(app, viewer, "prediction.png", canvas_only=False, hide=["phantom labels"])
        _shoot(app, viewer, "probability.png", canvas_only=True, show=["phantom probability"],
               hide=["phantom prediction"])
        for name in ("phantom prediction", "phantom labels"):
            viewer.layers[name].visible = True
        viewer.layers["phantom probability"].visible = False

    if "translation" not in list_methods():
        print("translation is not registered: residual/sample screenshots skipped")
        return 0
    if args.translation_model:
        model = w.load_model(args.translation_model)
        if model.method.name != "translation":
            raise SystemExit(f"{args.translation_model} holds a {model.method.name} model, not translation")
        w.predict_button.click()
        _wait(app, lambda: not w.busy)
        if w.last_error is not None:
            raise RuntimeError(w.last_error)
    else:
        _train(app, w, "translation", args.translation_steps)  # the method's CPU defaults
    for name in ("prediction", "probability", "healthy", "uncertainty"):
        if f"phantom {name}" in viewer.layers:
            viewer.layers[f"phantom {name}"].visible = False
    viewer.layers.selection.active = viewer.layers["phantom residual"]
    _shoot(app, viewer, "residual.png", canvas_only=False, show=["phantom residual"])
    _shoot(app, viewer, "healthy.png", canvas_only=True, show=["phantom healthy"], hide=["phantom residual"])
    viewer.layers["phantom healthy"].visible = False
    w.samples_spin.setValue(4)
    w.sample_button.click()
    _wait(app, lambda: not w.busy)
    for name in ("phantom", "phantom labels"):
        viewer.layers[name].visible = False
    viewer.dims.set_point(1, z)
    (viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid).enabled = False
    _wait(app, lambda: True)
    viewer.screenshot(str(IMG / "sampled-tumours.png"), canvas_only=False)
    w.shutdown()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
