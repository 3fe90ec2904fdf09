"""Fixtures of the conversion tests."""

import numpy as np
import pytest

from .helpers import TINY, tiny_hf_model


@pytest.fixture
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 16))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """(directory, HF model) of the default tiny V3 model saved with save_pretrained."""
    model = tiny_hf_model()
    path = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(path)
    return path, model
