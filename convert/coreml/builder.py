"""Small MIL building blocks, emitted through an `Ops` object.

Every graph of the export (flow blocks, T5, VAE, score step) is described once with these
methods. `Ops` emits plain MIL ops in one compute dtype; `autodiff.Tape` is an `Ops` that also
records each call, so the score-step program can emit its backward graph with one
vector-Jacobian rule per method. Dtypes are explicit: constants are made in the compute dtype
and every change of dtype is a `cast` op, so the converter runs at float32 precision and
changes nothing; what the tests evaluate is what Core ML runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .coremltools_api import OPSET, Function, Program, Var, mb, types

PRECISIONS = {"float16": ("fp16", np.float16), "float32": ("fp32", np.float32)}
Operand = Var | float | int | np.ndarray
NEG_LARGE = -3.0e4
"""Additive mask value: its exp() is 0 in float16 and float32, and unlike -inf it can never
turn a sum of masked scores into inf - inf."""


def numpy_dtype(var: Var) -> np.dtype:
    return np.dtype(types.nptype_from_builtin(var.dtype))


def build_program(inputs: dict[str, Any], body: Callable[[dict[str, Var]], Sequence[Var]]) -> Program:
    """A one-function MIL program: `inputs` maps names to `mb.TensorSpec`/`mb.StateTensorSpec`,
    `body` gets the input vars by name and returns the outputs (named by their ops)."""
    with Function(inputs, OPSET) as function:
        outputs = body(dict(function.inputs))
        function.set_outputs(list(outputs))
    program = Program()
    program.add_function("main", function)
    return program


def tensor_spec(shape: Sequence[int], dtype: str) -> Any:
    return mb.TensorSpec(shape=tuple(shape), dtype=getattr(types, dtype))


def state_spec(shape: Sequence[int]) -> Any:
    """Core ML states hold float16 only."""
    return mb.StateTensorSpec(shape=tuple(shape), dtype=types.fp16)


class Ops:
    """Emits MIL ops whose floating-point results are in one compute dtype (`float16`/`float32`).

    `_record` is the hook `autodiff.Tape` overrides; here it only passes the result through.
    """

    def __init__(self, precision: str):
        self.precision = precision
        self.dtype, self.np_dtype = PRECISIONS[precision]

    def _record(self, kind: str, out: Var, inputs: dict[str, Any], **attrs: Any) -> Var:
        return out

    # ---- constants and dtypes ----------------------------------------------------------------

    def weight(self, array: np.ndarray) -> Var:
        """A constant in the compute dtype (weights, tables, masks)."""
        return mb.const(val=np.asarray(array).astype(self.np_dtype))

    def operand(self, value: Operand, like: Var) -> Operand:
        """Python and NumPy constants converted to `like`'s dtype (MIL does not promote)."""
        if isinstance(value, Var):
            return value
        return np.asarray(value, dtype=numpy_dtype(like))

    def cast(self, x: Var, dtype: str) -> Var:
        if x.dtype == getattr(types, dtype):
            return x
        return self._record("cast", mb.cast(x=x, dtype=dtype), {"x": x})

    def to_compute(self, x: Var) -> Var:
        return self.cast(x, self.dtype)

    def identity(self, x: Var, name: str) -> Var:
        """Give a result its output name."""
        return mb.identity(x=x, name=name)

    # ---- element-wise ------------------------------------------------------------------------

    def add(self, x: Var, y: Operand) -> Var:
        y = self.operand(y, x)
        return self._record("add", mb.add(x=x, y=y), {"x": x, "y": y})

    def sub(self, x: Var, y: Operand) -> Var:
        y = self.operand(y, x)
        return self._record("sub", mb.sub(x=x, y=y), {"x": x, "y": y})

    def mul(self, x: Var, y: Operand) -> Var:
        y = self.operand(y, x)
        return self._record("mul", mb.mul(x=x, y=y), {"x": x, "y": y})

    def div(self, x: Var, y: Operand) -> Var:
        y = self.operand(y, x)
        return self._record("div", mb.real_div(x=x, y=y), {"x": x, "y": y})

    def exp(self, x: Var) -> Var:
        return self._record("exp", mb.exp(x=x), {"x": x})

    def softplus(self, x: Var) -> Var:
        return self._record("softplus", mb.softplus(x=x), {"x": x})

    def silu(self, x: Var) -> Var:
        return mb.silu(x=x)

    def gelu(self, x: Var, exact: bool = True) -> Var:
        mode = "EXACT" if exact else "TANH_APPROXIMATION"
        return self._record("gelu", mb.gelu(x=x, mode=mode), {"x": x}, exact=exact)

    def soft_clip(self, x: Var, bound: float) -> Var:
        """bound·tanh(x/bound): the flow's bound on every output channel."""
        if bound <= 0:
            return x
        y = mb.mul(x=mb.tanh(x=mb.mul(x=x, y=self.operand(1.0 / bound, x))), y=self.operand(bound, x))
        return self._record("soft_clip", y, {"x": x}, bound=bound)

    # ---- shapes ------------------------------------------------------------------------------

    def reshape(self, x: Var, shape: Sequence[int]) -> Var:
        return self._record("reshape", mb.reshape(x=x, shape=list(shape)), {"x": x})

    def transpose(self, x: Var, perm: Sequence[int]) -> Var:
        return self._record("transpose", mb.transpose(x=x, perm=list(perm)), {"x": x}, perm=tuple(perm))

    def concat(self, values: Sequence[Var], axis: int) -> Var:
        values = list(values)
        return self._record("concat", mb.concat(values=values, axis=axis), {"values": values}, axis=axis)

    def slice(self, x: Var, axis: int, start: int, stop: int) -> Var:
        """x[..., start:stop, ...] along one axis (static bounds)."""
        rank, axis = x.rank, axis % x.rank
        begin, end = [0] * rank, list(x.shape)
        begin[axis], end[axis] = start, stop
        y = mb.slice_by_index(x=x, begin=begin, end=end)
        return self._record("slice", y, {"x": x}, axis=axis, start=start, stop=stop)

    def reverse(self, x: Var, axis: int) -> Var:
        return self._record("reverse", mb.reverse(x=x, axes=[axis]), {"x": x}, axis=axis)

    def tile(self, x: Var, reps: Sequence[int]) -> Var:
        return mb.tile(x=x, reps=list(reps))

    def gather(self, x: Var, indices: Var, axis: int) -> Var:
        return mb.gather(x=x, indices=indices, axis=axis)

    def swap_pairs(self, x: Var, axis: int) -> Var:
        """(x_2m, x_2m+1) → (-x_2m+1, x_2m) along `axis`: the rotation half of interleaved RoPE."""
        rank, axis = x.rank, axis % x.rank
        stride = [1] * rank
        stride[axis] = 2
        begin_odd = [0] * rank
        begin_odd[axis] = 1
        even = mb.slice_by_index(x=x, begin=[0] * rank, end=list(x.shape), stride=stride)
        odd = mb.slice_by_index(x=x, begin=begin_odd, end=list(x.shape), stride=stride)
        pairs = mb.stack(values=[mb.mul(x=odd, y=self.operand(-1.0, x)), even], axis=axis + 1)
        return self._record("swap_pairs", mb.reshape(x=pairs, shape=list(x.shape)), {"x": x}, axis=axis)

    # ---- layers ------------------------------------------------------------------------------

    def linear(self, x: Var, weight: Var, bias: Var | None) -> Var:
        """x·Wᵀ + b over the last axis; weight [out, in] as MLX and PyTorch store it."""
        y = mb.linear(x=x, weight=weight, bias=bias) if bias is not None else mb.linear(x=x, weight=weight)
        return self._record("linear", y, {"x": x, "weight": weight, "bias": bias})

    def conv(self, x: Var, weight: Var, bias: Var | None, stride: int = 1, padding: int = 0) -> Var:
        """NCHW convolution, weight [out, in, kh, kw]."""
        pad = [padding] * 4
        kwargs = {"bias": bias} if bias is not None else {}
        return mb.conv(x=x, weight=weight, strides=[stride, stride], pad_type="custom", pad=pad, **kwargs)

    def pad(self, x: Var, widths: Sequence[int]) -> Var:
        """Zero padding; `widths` lists (before, after) for the last len/2 axes."""
        return mb.pad(x=x, pad=list(widths), mode="constant", constant_val=self.operand(0.0, x))

    def upsample_nearest(self, x: Var, factor: int) -> Var:
        return mb.upsample_nearest_neighbor(x=x, scale_factor_height=factor, scale_factor_width=factor)

    def matmul(self, x: Var, y: Var, transpose_x: bool = False, transpose_y: bool = False) -> Var:
        return mb.matmul(x=x, y=y, transpose_x=transpose_x, transpose_y=transpose_y)

    def softmax(self, x: Var, axis: int) -> Var:
        return mb.softmax(x=x, axis=axis)

    def layer_norm(self, x: Var, gamma: Var | None, beta: Var | None, eps: float, axis: int = -1) -> Var:
        """Normalise over one axis (the channel axis of either layout)."""
        y = mb.layer_norm(x=x, axes=[axis], gamma=gamma, beta=beta, epsilon=self.operand(eps, x))
        return self._record("layer_norm", y, {"x": x, "gamma": gamma, "beta": beta}, eps=eps, axis=axis % x.rank)

    def rms_norm(self, x: Var, scale: np.ndarray, eps: float, axis: int = -1) -> Var:
        """x / rms(x) · scale over one axis, computed in float32 whatever the compute dtype."""
        x32 = mb.cast(x=x, dtype="fp32") if x.dtype != types.fp32 else x
        mean_square = mb.reduce_mean(x=mb.mul(x=x32, y=x32), axes=[axis], keep_dims=True)
        inv = mb.rsqrt(x=mean_square, epsilon=np.float32(eps))
        shape = [1] * x.rank
        shape[axis] = scale.size
        scale32 = np.asarray(scale, np.float32).reshape(shape)
        y = mb.mul(x=mb.mul(x=x32, y=inv), y=scale32)
        y = mb.cast(x=y, dtype=types.builtin_to_string(x.dtype)) if x.dtype != types.fp32 else y
        return self._record("rms_norm", y, {"x": x}, scale=scale32, eps=eps, axis=axis % x.rank)

    def group_norm(self, x: Var, groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float) -> Var:
        """GroupNorm of an NCHW map over consecutive channel groups, as PyTorch groups them."""
        b, c, h, w = x.shape
        grouped = mb.reshape(x=x, shape=[b, groups, (c // groups) * h * w])
        normed = mb.reshape(x=mb.layer_norm(x=grouped, axes=[2], epsilon=self.operand(eps, x)), shape=[b, c, h, w])
        return mb.add(x=mb.mul(x=normed, y=self.weight(gamma.reshape(1, c, 1, 1))), y=self.weight(beta.reshape(1, c, 1, 1)))

    def attention(self, q: Var, k: Var, v: Var, mask: Var | None) -> Var:
        """softmax(q·kᵀ/√d + mask)·v over the last two axes (the fused iOS 18 op)."""
        kwargs = {"attn_mask": mask} if mask is not None else {}
        y = mb.scaled_dot_product_attention(query=q, key=k, value=v, **kwargs)
        return self._record("attention", y, {"q": q, "k": k, "v": v, "mask": mask})

    # ---- cache and mask helpers (never differentiated) ----------------------------------------

    def causal_mask(self, key_count: int, query_positions: Var, keys_axis_last: bool = True) -> Var:
        """Additive mask: 0 where key index ≤ query position, else a large negative value.

        (queries, keys), or (keys, queries) with `keys_axis_last=False`.
        """
        keys = np.arange(key_count, dtype=np.int32)
        if keys_axis_last:
            allowed = mb.less_equal(x=keys[None, :], y=mb.expand_dims(x=query_positions, axes=[1]))
            shape = (query_positions.shape[0], key_count)
        else:
            allowed = mb.less_equal(x=keys[:, None], y=mb.expand_dims(x=query_positions, axes=[0]))
            shape = (key_count, query_positions.shape[0])
        zeros = np.zeros(shape, self.np_dtype)
        blocked = np.full(shape, NEG_LARGE, self.np_dtype)
        return mb.select(cond=allowed, a=zeros, b=blocked)

    def write_slice(self, buffer: Var, update: Var, axis: int, position: Var) -> Var:
        """`buffer` with `update` written at `position` (a (1,) int32 var) along `axis`."""
        rank = buffer.rank
        begin = [np.zeros(1, np.int32)] * rank
        end = [np.array([s], np.int32) for s in buffer.shape]
        begin[axis] = position
        end[axis] = mb.add(x=position, y=np.int32(update.shape[axis]))
        return mb.slice_update(x=buffer, update=update, begin=mb.concat(values=begin, axis=0), end=mb.concat(values=end, axis=0))


def causal_mask_constant(length: int, dtype: type) -> np.ndarray:
    """(length, length) additive causal mask for a whole sequence."""
    return np.where(np.tril(np.ones((length, length), bool)), 0.0, NEG_LARGE).astype(dtype)
