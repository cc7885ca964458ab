"""Model weights as NumPy arrays, and as program constants made once per program.

The exporter reads our converted MLX folders (float32, float16, bfloat16 or MLX-quantised)
and writes every weight in the export's precision; MLX-quantised linears are dequantised first,
and Core ML's own compression (`compress.py`) can be applied afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .builder import Ops
from .compress import WeightCompression
from .coremltools_api import Var


def module_arrays(module: nn.Module, quantization: dict | None = None) -> dict[str, np.ndarray]:
    """A module's parameters by name as float32 arrays; quantised linears come back dequantised."""
    params = dict(tree_flatten(module.parameters()))
    arrays = {}
    for name, value in params.items():
        base, _, leaf = name.rpartition(".")
        quantized = f"{base}.scales" in params
        if quantized and leaf in ("scales", "biases"):
            continue
        if quantized and leaf == "weight":
            if quantization is None:
                raise ValueError(f"{name} is quantised but no quantisation settings were given")
            value = mx.dequantize(value, params[f"{base}.scales"], params[f"{base}.biases"],
                                  group_size=quantization["group_size"], bits=quantization["bits"])
        arrays[name] = np.array(value.astype(mx.float32))
    return arrays


class Weights:
    """Named arrays, turned into program constants on first use, so a weight used twice (forward
    and backward) is one constant; with `compression`, the big kernels become compressed
    constants that every use shares."""

    def __init__(self, ops: Ops, arrays: dict[str, np.ndarray], compression: WeightCompression | None = None):
        self.ops = ops
        self.arrays = dict(arrays)
        self.compression = compression
        self._vars: dict[str, Var] = {}

    def __getitem__(self, name: str) -> Var:
        if name not in self._vars:
            array = self.arrays[name]
            if self.compression is not None and self.compression.applies(array):
                self._vars[name] = self.compression.constant(array, self.ops.np_dtype)
            else:
                self._vars[name] = self.ops.weight(array)
        return self._vars[name]

    def derived(self, name: str, source: str, transform: Callable[[np.ndarray], np.ndarray]) -> Var:
        """A constant computed from another weight (a linear's kernel as a 1×1 convolution)."""
        if name not in self.arrays:
            self.arrays[name] = transform(self.arrays[source])
        return self[name]

    def optional(self, name: str) -> Var | None:
        return self[name] if name in self.arrays else None

    def has(self, name: str) -> bool:
        return name in self.arrays
