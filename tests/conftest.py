"""Shared fixtures: tiny seeded volumes so every test runs in seconds."""

from __future__ import annotations

import pytest
import torch

import semiseg

from ._util import TINY_PARAMS

# One thread: tests are tiny, results are reproducible and CI has two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_phantom():
    """A (10, 36, 40) phantom with 3 annotated slices and weak tags."""
    return semiseg.make_phantom(0, shape=(10, 36, 40), labelled=3, n_tumours=2)


@pytest.fixture(scope="session")
def tiny_digits():
    return semiseg.make_digits(0, n_slices=12, size=32, scale=2, crop=6, labelled=2)


@pytest.fixture
def tiny_config():
    return semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_phantom):
    s = tiny_phantom
    return semiseg.train(
        s.image, s.labels, tags=s.tags, params=TINY_PARAMS,
        config=semiseg.TrainConfig(steps=3, batch_size=2, crop=32, seed=0), device="cpu",
    )
