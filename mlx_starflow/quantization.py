"""Which flow weights are quantised, in one place for the converter and the loader.

MLX affine quantisation (group 64 by default) applies to the attention and MLP linears of
every transformer layer: they hold almost all the bytes and all the bandwidth. The input,
output and text projections, the norms and the SOS embedding stay in the source dtype: they
are small, and the output projection sets the flow's scales directly.
"""

from __future__ import annotations

import mlx.nn as nn

from .errors import InputError

BITS = (4, 8)
GROUP_SIZE = 64


def is_quantized_layer(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in path and path.rsplit(".", 1)[-1] in {"qkv", "proj", "fc1", "fc2"}


def quantize_flow(model: nn.Module, bits: int, group_size: int = GROUP_SIZE) -> None:
    """Replace the selected linears by `nn.QuantizedLinear` in place (weights quantised as they are)."""
    if bits not in BITS:
        raise InputError(f"quantisation bits must be one of {BITS}, not {bits}")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=is_quantized_layer)
