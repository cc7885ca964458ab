"""Array helpers shared by the tests that compare NumPy evaluations with the fixtures."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np


def max_abs(a, b) -> float:
    """Largest absolute difference, in float64, of two arrays of the same shape."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def load(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays."""
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}
