"""npe2 sample data: the tumour phantom and cluttered digits, as image + sparse labels.

The weak per-slice tags travel in the labels layer's ``metadata["semiseg_tags"]`` (see
:data:`semiseg.napari.TAGS_KEY`), where the Weak tags and Train widgets read and write them.
"""

from __future__ import annotations

from ..synthetic import Sample, make_digits, make_phantom
from . import TAGS_KEY


def sample_layers(sample: Sample) -> list[tuple]:
    """LayerData tuples for a :class:`~semiseg.synthetic.Sample`: image, then labels + tags."""
    return [
        (sample.image, {"name": sample.name}, "image"),
        (
            sample.labels,
            {"name": f"{sample.name} labels", "metadata": {TAGS_KEY: sample.tags.copy()}},
            "labels",
        ),
    ]


def phantom_sample(**kwargs) -> list[tuple]:
    """The seeded tumour phantom, ``(48, 128, 128)`` with 5 annotated slices."""
    return sample_layers(make_phantom(0, **kwargs))


def digits_sample(**kwargs) -> list[tuple]:
    """The cluttered-digits task, 160 slices of 48x48 with 5 annotated slices."""
    return sample_layers(make_digits(0, **kwargs))
