"""A NumPy evaluator for exactly the MIL ops the exporter emits, so Linux can check the numbers.

Core ML cannot predict on Linux. This walks a function of a MIL program (best: one re-read
from a saved package with `coremltools_api.load_program`, so the check covers what was
written), computes every op in float64 and rounds its result to the op's declared dtype, which
emulates float16 graphs. Core ML states are passed in a dict and updated in place, like
`MLState`. An op it does not know raises `UnsupportedOp`: a new op in the exporter must be
taught here before the tests can pass. Products use `np.einsum`, which never calls a
multithreaded BLAS: on a busy machine OpenBLAS threads made small products 100× slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .coremltools_api import Program, Var, types


class UnsupportedOp(ValueError):
    """The evaluator does not know this MIL op."""


DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}
_erf = np.vectorize(math.erf, otypes=[np.float64])


def run(program: Program, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray] | None = None,
        function: str = "main") -> dict[str, np.ndarray]:
    """Outputs of `function` by name; `states` (name → float16 array) are read and updated in place."""
    fn = program.functions[function]
    states = {} if states is None else states
    env: dict[str, np.ndarray] = {}
    for name, var in fn.inputs.items():
        if types.is_state(var.sym_type):
            if name not in states:
                raise KeyError(f"state {name!r} was not given")
            continue
        if name not in inputs:
            raise KeyError(f"input {name!r} was not given; the function takes {sorted(fn.inputs)}")
        value = np.asarray(inputs[name])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"input {name!r} has shape {value.shape}, the function declares {tuple(var.shape)}")
        env[name] = value.astype(_np_type(var))
    for op in fn.operations:
        handler = HANDLERS.get(op.op_type)
        if handler is None:
            raise UnsupportedOp(f"the MIL evaluator does not know op {op.op_type!r} ({op.name})")
        args = {name: _value(v, env) for name, v in op.inputs.items()}
        (out,) = op.outputs
        env[out.name] = np.asarray(handler(op, args, states)).astype(_np_type(out))
    return {var.name: env[var.name] for var in fn.outputs}


def _np_type(var: Var) -> type:
    dtype = var.dtype
    return np.dtype(types.nptype_from_builtin(dtype)).type


def _value(v: Any, env: dict[str, np.ndarray]) -> Any:
    if isinstance(v, (list, tuple)):
        return [_value(item, env) for item in v]
    if isinstance(v, Var):
        if v.name in env:
            return env[v.name]
        if v.val is not None:
            return np.asarray(v.val)
        if types.is_state(v.sym_type):
            return v.name
        raise KeyError(f"value of {v.name} is not known yet")
    return v


def _f(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def _int_list(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _const(op, a, s):
    return op.outputs[0].val


def _constexpr(op, a, s):
    return op.materialized_val_inference()


def _cast(op, a, s):
    return np.asarray(a["x"]).astype(DTYPES[str(a["dtype"])])


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable:
    return lambda op, a, s: fn(_f(a["x"]), _f(a["y"]))


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    return lambda op, a, s: fn(_f(a["x"]))


def _linear(op, a, s):
    y = np.einsum("...i,oi->...o", _f(a["x"]), _f(a["weight"]))
    return y + _f(a["bias"]) if a.get("bias") is not None else y


def _matmul(op, a, s):
    x, y = _f(a["x"]), _f(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.einsum("...ij,...jk->...ik", x, y)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _gelu(op, a, s):
    x, mode = _f(a["x"]), str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise UnsupportedOp(f"gelu mode {mode}")


def _reduce(fn: Callable) -> Callable:
    def handler(op, a, s):
        axes = tuple(_int_list(a["axes"])) if a.get("axes") is not None else None
        return fn(_f(a["x"]), axis=axes, keepdims=bool(a.get("keep_dims", False)))
    return handler


def _layer_norm(op, a, s):
    x = _f(a["x"])
    axes = tuple(_int_list(a["axes"]))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + float(a["epsilon"]))
    shape = [x.shape[i] if i in [ax % x.ndim for ax in axes] else 1 for i in range(x.ndim)]
    if a.get("gamma") is not None:
        y = y * _f(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f(a["beta"]).reshape(shape)
    return y


def _sdpa(op, a, s):
    q, k, v = _f(a["query"]), _f(a["key"]), _f(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return np.matmul(_softmax(scores, -1), v)


def _slices(shape: tuple[int, ...], a: dict) -> tuple[slice, ...]:
    rank = len(shape)
    begin, end = _int_list(a["begin"]), _int_list(a["end"])
    stride = _int_list(a["stride"]) if a.get("stride") is not None else [1] * rank
    begin_mask = _int_list(a["begin_mask"]) if a.get("begin_mask") is not None else [0] * rank
    end_mask = _int_list(a["end_mask"]) if a.get("end_mask") is not None else [0] * rank
    return tuple(
        slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]) for i in range(rank)
    )


def _slice_by_index(op, a, s):
    x = np.asarray(a["x"])
    y = x[_slices(x.shape, a)]
    squeeze = _int_list(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else []
    axes = tuple(i for i, flag in enumerate(squeeze) if flag)
    return np.squeeze(y, axis=axes) if axes else y


def _slice_update(op, a, s):
    x = np.array(a["x"], copy=True)
    x[_slices(x.shape, a)] = np.asarray(a["update"]).astype(x.dtype)
    return x


def _read_state(op, a, s):
    return np.array(s[a["input"]], copy=True)


def _update_state(op, a, s):
    s[a["state"]] = np.asarray(a["value"]).astype(np.float16)
    return a["value"]


def _concat(op, a, s):
    values, axis = [np.asarray(v) for v in a["values"]], int(a["axis"])
    if a.get("interleave"):
        axis %= values[0].ndim
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _gather(op, a, s):
    if int(a.get("batch_dims", 0) or 0):
        raise UnsupportedOp("gather with batch_dims")
    return np.take(np.asarray(a["x"]), np.asarray(a["indices"]).astype(np.int64), axis=int(a["axis"]))


def _conv(op, a, s):
    """NCHW convolution via sliding windows; groups 1, dilation 1."""
    x, w = _f(a["x"]), _f(a["weight"])
    if int(a.get("groups", 1)) != 1 or any(d != 1 for d in _int_list(a.get("dilations", [1, 1]))):
        raise UnsupportedOp("grouped or dilated conv")
    sh, sw = _int_list(a.get("strides", [1, 1]))
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "custom":
        top, bottom, left, right = _int_list(a["pad"])
    elif pad_type == "valid":
        top = bottom = left = right = 0
    else:
        raise UnsupportedOp(f"conv pad_type {pad_type}")
    x = np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)])
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    y = np.einsum("bchwij,ocij->bohw", windows, w)
    return y + _f(a["bias"]).reshape(1, -1, 1, 1) if a.get("bias") is not None else y


def _pad(op, a, s):
    x, widths = np.asarray(a["x"]), _int_list(a["pad"])
    if str(a.get("mode", "constant")) != "constant":
        raise UnsupportedOp(f"pad mode {a['mode']}")
    pairs = [(0, 0)] * (x.ndim - len(widths) // 2) + [(widths[i], widths[i + 1]) for i in range(0, len(widths), 2)]
    return np.pad(_f(x), pairs, constant_values=float(a.get("constant_val", 0.0)))


def _upsample(op, a, s):
    x = np.asarray(a["x"])
    fh, fw = int(a["scale_factor_height"]), int(a["scale_factor_width"])
    return np.repeat(np.repeat(x, fh, axis=2), fw, axis=3)


def _expand_dims(op, a, s):
    x = np.asarray(a["x"])
    for axis in sorted(_int_list(a["axes"])):
        x = np.expand_dims(x, axis)
    return x


HANDLERS: dict[str, Callable[[Any, dict, dict], Any]] = {
    "const": _const,
    "constexpr_blockwise_shift_scale": _constexpr,
    "constexpr_lut_to_dense": _constexpr,
    "cast": _cast,
    "identity": lambda op, a, s: np.asarray(a["x"]),
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "less_equal": _binary(np.less_equal),
    "greater_equal": _binary(np.greater_equal),
    "select": lambda op, a, s: np.where(np.asarray(a["cond"]), _f(a["a"]), _f(a["b"])),
    "exp": _unary(np.exp),
    "tanh": _unary(np.tanh),
    "erf": _unary(_erf),
    "sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "softplus": _unary(lambda x: np.logaddexp(0.0, x)),
    "silu": _unary(lambda x: x / (1.0 + np.exp(-x))),
    "rsqrt": lambda op, a, s: 1.0 / np.sqrt(_f(a["x"]) + float(a.get("epsilon", 1e-12))),
    "gelu": _gelu,
    "softmax": lambda op, a, s: _softmax(_f(a["x"]), int(a["axis"])),
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _sdpa,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reshape": lambda op, a, s: np.reshape(np.asarray(a["x"]), _int_list(a["shape"])),
    "transpose": lambda op, a, s: np.transpose(np.asarray(a["x"]), _int_list(a["perm"])),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "reverse": lambda op, a, s: np.flip(np.asarray(a["x"]), axis=tuple(_int_list(a["axes"]))),
    "tile": lambda op, a, s: np.tile(np.asarray(a["x"]), _int_list(a["reps"])),
    "gather": _gather,
    "expand_dims": _expand_dims,
    "pad": _pad,
    "upsample_nearest_neighbor": _upsample,
    "read_state": _read_state,
    "coreml_update_state": _update_state,
}
