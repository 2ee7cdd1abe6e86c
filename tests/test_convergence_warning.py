"""The not-converged warning of a finished run (issue 19): Qt-free, and wired into the widget's
status line through :meth:`semiseg.napari._session.Session.describe`."""

from __future__ import annotations

import numpy as np

from semiseg.metrics import convergence_warning


def _labels():
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[1, 10:16, 10:16] = 1  # 3.5 % of slice 1
    labels[4, 8:12, 20:26] = 1
    return labels, [1, 3, 4]  # slice 3 tagged healthy: annotated, all background


def test_fires_on_a_mask_that_is_almost_all_foreground():
    labels, annotated = _labels()
    degenerate = np.ones_like(labels)
    degenerate[0, :2] = 0  # 99.9 % foreground, as after 30 translation steps (issue 19)
    msg = convergence_warning(degenerate, labels, annotated)
    assert msg is not None and msg.startswith("not converged") and "class 1 covers 99% of the volume" in msg


def test_fires_on_a_mask_without_the_annotated_class():
    labels, annotated = _labels()
    msg = convergence_warning(np.zeros_like(labels), labels, annotated)
    assert msg is not None and "class 1 is predicted nowhere" in msg


def test_silent_on_a_good_prediction():
    labels, annotated = _labels()
    good = labels.copy()
    good[2, 10:17, 10:16] = 1  # the lesion continues into unannotated slices, a little larger
    good[5, 8:13, 20:27] = 1
    assert convergence_warning(good, labels, annotated) is None
    assert convergence_warning(good, labels, []) is None  # nothing to compare with


def test_other_axis():
    labels, annotated = _labels()
    t = np.moveaxis(labels, 0, 2)
    assert convergence_warning(np.ones_like(t), t, annotated, axis=2) is not None
    assert convergence_warning(t, t, annotated, axis=2) is None


def test_session_status_line_says_so():
    import semiseg
    from semiseg.napari._jobs import JobResult
    from semiseg.napari._session import Session

    s = semiseg.make_phantom(0, shape=(6, 32, 32), labelled=2, n_tumours=1)
    model = semiseg.train(s.image, s.labels, params={"features": (8, 16)},
                          config=semiseg.TrainConfig(steps=1, batch_size=2, crop=32), device="cpu")
    bad = JobResult(model, {"mask": np.ones(s.image.shape, np.uint8)}, False, "cpu")
    good = JobResult(model, {"mask": s.truth.astype(np.uint8)}, False, "cpu")
    assert "not converged" in Session.describe(bad, "train", s.labels)
    assert "not converged" not in Session.describe(good, "train", s.labels)
    assert "not converged" not in Session.describe(bad, "train")  # no labels: nothing to judge by
