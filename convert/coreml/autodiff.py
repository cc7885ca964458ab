"""Reverse-mode differentiation of graphs built with `Ops`, emitted as more MIL ops.

The score-step denoise needs ∇ₓ of the flow's negative log-likelihood. The forward graph is
built from a small set of `Ops` methods, so `Tape` records every call whose inputs depend on
a watched input, and `backward` walks the records in reverse, emitting one vector-Jacobian
rule per method. Constants (weights, masks, RoPE tables) and unwatched inputs (the text
states) get no gradient. A method on the gradient path without a rule is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .builder import Ops
from .coremltools_api import Var, mb, types


@dataclass
class Record:
    kind: str
    output: Var
    inputs: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)


class Tape(Ops):
    """An `Ops` that remembers the calls on the path from the watched inputs."""

    def __init__(self, precision: str):
        super().__init__(precision)
        self.records: list[Record] = []
        self._active: set[int] = set()
        self.plain = Ops(precision)

    def watch(self, var: Var) -> None:
        self._active.add(id(var))

    def _record(self, kind: str, out: Var, inputs: dict[str, Any], **attrs: Any) -> Var:
        if any(id(v) in self._active for v in _vars(inputs)):
            self.records.append(Record(kind, out, inputs, attrs))
            self._active.add(id(out))
        return out

    def backward(self, seeds: Sequence[tuple[Var, Var]], wrt: Var | Sequence[Var]) -> Var | list[Var]:
        """Σ over seeds (y, ȳ) of ȳ·∂y/∂wrt, i.e. the gradient of a scalar whose cotangents are the seeds;
        one gradient per watched input when `wrt` is a sequence."""
        grads: dict[int, Var] = {}
        for var, cotangent in seeds:
            _accumulate(self.plain, grads, var, cotangent)
        for record in reversed(self.records):
            g = grads.pop(id(record.output), None)
            if g is None:
                continue
            rule = RULES.get(record.kind)
            if rule is None:
                raise TypeError(f"no vector-Jacobian rule for {record.kind!r}; it cannot be on the score-step gradient path")
            for name, grad in rule(self.plain, record, g).items():
                inputs = record.inputs[name] if isinstance(record.inputs[name], list) else [record.inputs[name]]
                grad_list = grad if isinstance(grad, list) else [grad]
                for var, part in zip(inputs, grad_list):
                    if isinstance(var, Var) and id(var) in self._active and part is not None:
                        _accumulate(self.plain, grads, var, part)
        targets = [wrt] if isinstance(wrt, Var) else list(wrt)
        if any(id(target) not in grads for target in targets):
            raise ValueError("the seeds do not depend on every watched input")
        found = [grads[id(target)] for target in targets]
        return found[0] if isinstance(wrt, Var) else found


def _vars(inputs: dict[str, Any]) -> list[Var]:
    found = []
    for value in inputs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Var):
                found.append(item)
    return found


def _accumulate(ops: Ops, grads: dict[int, Var], var: Var, grad: Var) -> None:
    grads[id(var)] = ops.add(grads[id(var)], grad) if id(var) in grads else grad


def _unbroadcast(g: Var, shape: Sequence[int]) -> Var:
    """Sum a gradient over the axes its input was broadcast along."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.rank - len(shape)
    axes = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1]
    summed = mb.reduce_sum(x=g, axes=axes, keep_dims=True) if axes else g
    return mb.reshape(x=summed, shape=list(shape) if shape else [1])


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Var) else np.shape(value)


Rule = Callable[[Ops, Record, Var], dict[str, Any]]


def _add(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": _unbroadcast(g, _shape_of(r.inputs["x"])), "y": _unbroadcast(g, _shape_of(r.inputs["y"]))}


def _sub(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": _unbroadcast(g, _shape_of(r.inputs["x"])), "y": _unbroadcast(ops.mul(g, -1.0), _shape_of(r.inputs["y"]))}


def _mul(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    x, y = r.inputs["x"], r.inputs["y"]
    grads = {"x": _unbroadcast(ops.mul(g, y), _shape_of(x))}
    if isinstance(y, Var):
        grads["y"] = _unbroadcast(ops.mul(g, x), _shape_of(y))
    return grads


def _div(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    x, y = r.inputs["x"], r.inputs["y"]
    gx = ops.div(g, y)
    grads = {"x": _unbroadcast(gx, _shape_of(x))}
    if isinstance(y, Var):
        grads["y"] = _unbroadcast(ops.mul(ops.mul(gx, r.output), -1.0), _shape_of(y))
    return grads


def _exp(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": ops.mul(g, r.output)}


def _softplus(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": ops.mul(g, mb.sigmoid(x=r.inputs["x"]))}


def _gelu(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """d/dx x·Φ(x) = Φ(x) + x·φ(x)."""
    if not r.attrs["exact"]:
        raise TypeError("only the exact (erf) GELU is differentiated")
    x = r.inputs["x"]
    cdf = ops.mul(ops.add(mb.erf(x=ops.mul(x, 1.0 / math.sqrt(2.0))), 1.0), 0.5)
    pdf = ops.mul(mb.exp(x=ops.mul(ops.mul(x, x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
    return {"x": ops.mul(g, ops.add(cdf, ops.mul(x, pdf)))}


def _soft_clip(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """y = b·tanh(x/b): dy/dx = 1 − (y/b)²."""
    t = ops.mul(r.output, 1.0 / r.attrs["bound"])
    return {"x": ops.mul(g, ops.add(ops.mul(ops.mul(t, t), -1.0), 1.0))}


def _cast(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": mb.cast(x=g, dtype=types.builtin_to_string(r.inputs["x"].dtype))}


def _reshape(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": mb.reshape(x=g, shape=list(r.inputs["x"].shape))}


def _transpose(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": mb.transpose(x=g, perm=list(np.argsort(r.attrs["perm"])))}


def _concat(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    axis, start, parts = r.attrs["axis"], 0, []
    for value in r.inputs["values"]:
        size = value.shape[axis]
        parts.append(ops.slice(g, axis, start, start + size))
        start += size
    return {"values": parts}


def _slice(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """Zeros around the gradient of the kept range, as a pad op: zero constants of the full
    shape would be stored in the package (gigabytes over a 3B model's qkv slices)."""
    x, axis, start, stop = r.inputs["x"], r.attrs["axis"] % r.inputs["x"].rank, r.attrs["start"], r.attrs["stop"]
    if start == 0 and stop == x.shape[axis]:
        return {"x": g}
    widths = [start, x.shape[axis] - stop] + [0, 0] * (x.rank - axis - 1)
    return {"x": ops.pad(g, widths)}


def _reverse(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    return {"x": mb.reverse(x=g, axes=[r.attrs["axis"]])}


def _swap_pairs(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """The pair rotation is orthogonal and its transpose is its negative."""
    return {"x": ops.mul(ops.swap_pairs(g, r.attrs["axis"]), -1.0)}


def _linear(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """g·W through the forward's own weight constant, so the program stores each weight once."""
    return {"x": mb.matmul(x=g, y=r.inputs["weight"])}


def _layer_norm(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """dx = (ĝ − mean ĝ − x̂·mean(ĝ·x̂)) / σ with ĝ = g·γ over the normalised axis."""
    x, gamma, axis, eps = r.inputs["x"], r.inputs["gamma"], r.attrs["axis"], r.attrs["eps"]
    centred = ops.sub(x, mb.reduce_mean(x=x, axes=[axis], keep_dims=True))
    inv_std = mb.rsqrt(x=mb.reduce_mean(x=ops.mul(centred, centred), axes=[axis], keep_dims=True), epsilon=ops.operand(eps, x))
    normed = ops.mul(centred, inv_std)
    if gamma is not None:
        shape = [1] * x.rank
        shape[axis] = -1
        g = ops.mul(g, mb.reshape(x=gamma, shape=[s if s > 0 else gamma.shape[0] for s in shape]))
    mean_g = mb.reduce_mean(x=g, axes=[axis], keep_dims=True)
    mean_gx = mb.reduce_mean(x=ops.mul(g, normed), axes=[axis], keep_dims=True)
    return {"x": ops.mul(ops.sub(ops.sub(g, mean_g), ops.mul(normed, mean_gx)), inv_std)}


def _rms_norm(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """y = x·ρ·s, ρ = (mean x² + ε)^-½: dx = ρ·(g·s − x·ρ²·mean(g·s·x)), in float32."""
    x, axis, eps = r.inputs["x"], r.attrs["axis"], r.attrs["eps"]
    x32 = mb.cast(x=x, dtype="fp32") if x.dtype != types.fp32 else x
    g32 = mb.cast(x=g, dtype="fp32") if g.dtype != types.fp32 else g
    inv = mb.rsqrt(x=mb.reduce_mean(x=mb.mul(x=x32, y=x32), axes=[axis], keep_dims=True), epsilon=np.float32(eps))
    gs = mb.mul(x=g32, y=r.attrs["scale"])
    mean_gsx = mb.reduce_mean(x=mb.mul(x=gs, y=x32), axes=[axis], keep_dims=True)
    dx = mb.mul(x=inv, y=mb.sub(x=gs, y=mb.mul(x=x32, y=mb.mul(x=mb.mul(x=inv, y=inv), y=mean_gsx))))
    return {"x": mb.cast(x=dx, dtype=types.builtin_to_string(x.dtype)) if x.dtype != types.fp32 else dx}


def _attention(ops: Ops, r: Record, g: Var) -> dict[str, Any]:
    """Recompute p = softmax(q·kᵀ/√d + m); dv = pᵀ·g, ds = p·(g·vᵀ − Σ), dq = ds·k/√d, dk = dsᵀ·q/√d."""
    q, k, v, mask = r.inputs["q"], r.inputs["k"], r.inputs["v"], r.inputs["mask"]
    scale = q.shape[-1] ** -0.5
    scores = ops.mul(mb.matmul(x=q, y=k, transpose_y=True), scale)
    if mask is not None:
        scores = ops.add(scores, mask)
    p = mb.softmax(x=scores, axis=-1)
    dp = mb.matmul(x=g, y=v, transpose_y=True)
    ds = ops.mul(p, ops.sub(dp, mb.reduce_sum(x=ops.mul(dp, p), axes=[-1], keep_dims=True)))
    ds = ops.mul(ds, scale)
    return {
        "q": mb.matmul(x=ds, y=k),
        "k": mb.matmul(x=ds, y=q, transpose_x=True),
        "v": mb.matmul(x=p, y=g, transpose_x=True),
    }


RULES: dict[str, Rule] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "exp": _exp, "softplus": _softplus,
    "gelu": _gelu, "soft_clip": _soft_clip, "cast": _cast, "reshape": _reshape, "transpose": _transpose,
    "concat": _concat, "slice": _slice, "reverse": _reverse, "swap_pairs": _swap_pairs, "linear": _linear,
    "layer_norm": _layer_norm, "rms_norm": _rms_norm, "attention": _attention,
}
