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
    Training + whole-volume prediction jobs, run in a worker thread or a spawned process
    (no Qt; the widget wraps the generator with ``thread_worker``).
_tags, _train, _lossplot, _params
    Widgets.
"""

#: Key of the weak tags in a labels layer's ``metadata``: ``(n_slices,)`` int8 array of
#: -1 unknown / 0 healthy / 1 diseased along axis 0.
TAGS_KEY = "semiseg_tags"
