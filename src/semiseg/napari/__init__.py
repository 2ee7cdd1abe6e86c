"""The napari plugin of napari-semiseg: the only place that imports napari and Qt.

Importing this package itself imports nothing heavy (the spawned training worker imports
:mod:`semiseg.napari._jobs` through it); widgets live in their own modules and are loaded by
npe2 from ``napari.yaml`` on first use.

Modules
-------
_reader, _writer, _sample
    npe2 reader, writers and sample data (pure functions, no Qt).
_layers
    Layer helpers: weak tags stored in a labels layer's metadata, overlay layers, slice index.
_planes
    Records the plane (axis, index) of every painted slice in a labels layer's metadata
    (no Qt).
_jobs
    Every job of the Train dock (training + whole-volume prediction + uncertainty, tumour
    sampling) as a generator, run in a worker thread or a spawned process (no Qt).
_session
    The Train dock's state and decisions: model, running job, outputs, run store,
    stop/cancel, plain events (no Qt; the widget's runner is napari's ``thread_worker``).
_settings
    What the Train form means: settings -> job, layer choices, button states (no Qt).
_display
    Staged layer display, throttled progress, overlay layers (Qt).
_train_form
    The Train dock's widgets, laid out and read into settings (Qt).
_tags, _train, _suggest, _autosave, _lossplot, _params, _combo
    Widgets (``_train`` is wiring between its form, a session and the display).
"""

#: Key of the weak tags in a labels layer's ``metadata``: ``(n_slices,)`` int8 array of
#: -1 unknown / 0 healthy / 1 diseased along axis 0.
TAGS_KEY = "semiseg_tags"
