"""Core ML weight compression (`--compress`), restricted to the big linear weights.

Distinct from the MLX `--quantize` of `starflow convert`: this is Core ML's int8/int4 weight
storage. Only weights above a size threshold are compressed, so the causal masks, RoPE tables,
norms and the small input/output projections stay exact (a global config would quantise the
mask and tables too).

Two routes, same formats. Flow blocks are compressed while their programs are built
(`WeightCompression`): the score step's backward pass multiplies by the same weights as the
forward linears, and coremltools' quantiser refuses a constant shared by ops with different
channel axes, so the block emits the dequantising op itself and every function of the package
(steps, prefill, forward, vjp) reads that one compressed copy. Other packages (the text
encoder) are compressed after conversion with coremltools (`compress_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_starflow.errors import InputError

from .coremltools_api import Var, cto, mb, np_int4_dtype, quiet

COMPRESSIONS = ("int8", "int4")
INT4_BLOCK = 32


def compression_config(kind: str, threshold: int):
    """int8: symmetric per output channel; int4: symmetric per block of 32 input weights (iOS 18)."""
    if kind == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=threshold)
    if kind == "int4":
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK, weight_threshold=threshold
        )
    raise ValueError(f"compression must be one of {COMPRESSIONS}, not {kind!r}")


def compress_model(model, kind: str, op_thresholds: dict[str, int]):
    """`model` with the weights of the given op types (above each type's threshold) compressed."""
    configs = {op_type: compression_config(kind, threshold) for op_type, threshold in op_thresholds.items()}
    with quiet():
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(op_type_configs=configs))


@dataclass(frozen=True)
class WeightCompression:
    """Compression applied as a program is built: int8 symmetric per output channel, or int4
    symmetric per block of 32 input weights, for kernels (out, in, …) with more than
    `threshold` elements. The same formats as `compression_config`."""

    kind: str
    threshold: int

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {self.kind!r}")

    def applies(self, array: np.ndarray) -> bool:
        return array.ndim >= 2 and array.size > self.threshold

    def constant(self, array: np.ndarray, dtype: type) -> Var:
        """A `constexpr_blockwise_shift_scale` that dequantises to `array` (rounded) in `dtype`."""
        weight = np.asarray(array, np.float32)
        if self.kind == "int8":
            levels, blocks = 127, weight.reshape(weight.shape[0], 1, -1)
        else:
            if weight.shape[1] % INT4_BLOCK:
                raise InputError(f"int4 compression needs input widths divisible by {INT4_BLOCK}, not {weight.shape[1]}")
            levels, blocks = 7, weight.reshape(weight.shape[0], weight.shape[1] // INT4_BLOCK, -1)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / levels
        scale[scale == 0] = 1.0
        scale = scale.astype(dtype)
        data = np.clip(np.round(blocks / scale.astype(np.float32)), -levels - 1, levels).reshape(weight.shape)
        scale_shape = [weight.shape[0], blocks.shape[1]] + [1] * (weight.ndim - 2)
        data = data.astype(np.int8) if self.kind == "int8" else data.astype(np.int8).astype(np_int4_dtype)
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale.reshape(scale_shape))


def bytes_per_weight(precision: str, compression: str | None) -> float:
    """Storage per compressed weight: int4 carries one float16 scale per block of 32."""
    if compression == "int8":
        return 1.0
    if compression == "int4":
        return 0.5 + 2.0 / INT4_BLOCK
    return 2.0 if precision == "float16" else 4.0
