"""`TextEncoder.mlpackage`: token ids and attention mask (1, T) → masked T5 encoder states.

Mirrors `mlx_starflow.t5.T5Encoder` + `TextEncoder.encode`: the relative position bias is a
constant (T is fixed per export), padded keys are masked, and padded rows of the output are
zeroed with the mask input. The residual stream stays float32 and the feed-forward output
projection runs in float32 whatever the precision, because flan-T5's activations outgrow
float16 (the reason Hugging Face keeps `wo` in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlx_starflow.config import T5Config
from mlx_starflow.t5 import T5Encoder, relative_position_bucket

from .builder import NEG_LARGE, Ops, build_program, tensor_spec
from .compress import bytes_per_weight
from .coremltools_api import Program, Var, mb
from .package import HIDDEN_IN, HIDDEN_OUT
from .weights import Weights, module_arrays

INPUT_IDS, ATTENTION_MASK, TEXT_STATES = "input_ids", "attention_mask", "text_states"


def position_bias(encoder: T5Encoder, length: int, table: np.ndarray) -> np.ndarray:
    """(1, H, T, T) bias of every key-minus-query offset, shared by all layers."""
    config = encoder.config
    positions = mx.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    return table[np.array(buckets)].transpose(2, 0, 1)[None]


def _attention(ops: Ops, w: Weights, prefix: str, h: Var, bias: Var, heads: int, d_kv: int) -> Var:
    """T5 self-attention: unscaled scores plus the position and padding bias."""
    _, length, _ = h.shape

    def split(name: str) -> Var:
        projected = ops.linear(h, w[f"{prefix}.{name}.weight"], None)
        return ops.transpose(ops.reshape(projected, [1, length, heads, d_kv]), [0, 2, 1, 3])

    q, k, v = split("query"), split("key"), split("value")
    probs = ops.softmax(ops.add(ops.matmul(q, k, transpose_y=True), bias), axis=-1)
    mixed = ops.reshape(ops.transpose(ops.matmul(probs, v), [0, 2, 1, 3]), [1, length, heads * d_kv])
    return ops.linear(mixed, w[f"{prefix}.out.weight"], None)


def text_encoder_program(encoder: T5Encoder, length: int, precision: str, layers: Sequence[int] | None = None) -> Program:
    """The encoder, or a consecutive range of its layers (iOS packages under 1 GB).

    The first range takes `input_ids`, the others `hidden` (1, T, d_model) float32; the last
    returns `text_states`, the others `next_hidden`. Every range takes `attention_mask`.
    """
    config = encoder.config
    layers = list(range(config.num_layers)) if layers is None else list(layers)
    first, last = layers[0] == 0, layers[-1] == config.num_layers - 1
    arrays = module_arrays(encoder)
    bias_table = position_bias(encoder, length, arrays["relative_attention_bias.weight"])
    eps = config.layer_norm_epsilon
    inputs = {INPUT_IDS: tensor_spec((1, length), "int32")} if first else {HIDDEN_IN: tensor_spec((1, length, config.d_model), "fp32")}
    inputs[ATTENTION_MASK] = tensor_spec((1, length), "int32")

    def body(v: dict[str, Var]) -> list[Var]:
        ops = Ops(precision)
        full = Ops("float32")
        w = Weights(ops, arrays)
        down = Weights(full, {k: a for k, a in arrays.items() if k.endswith("mlp.down.weight")})
        mask = mb.cast(x=v[ATTENTION_MASK], dtype="fp32")
        padding = mb.mul(x=mb.sub(x=mb.reshape(x=mask, shape=[1, 1, 1, length]), y=np.float32(1.0)), y=np.float32(-NEG_LARGE))
        bias = ops.to_compute(mb.add(x=bias_table.astype(np.float32), y=padding))
        x = ops.cast(ops.gather(w["embedding.weight"], v[INPUT_IDS], axis=0), "fp32") if first else v[HIDDEN_IN]
        for i in layers:
            p = f"layers.{i}"
            h = ops.to_compute(ops.rms_norm(x, arrays[f"{p}.attention_norm.weight"], eps))
            x = ops.add(x, ops.cast(_attention(ops, w, f"{p}.attention", h, bias, config.num_heads, config.d_kv), "fp32"))
            h = ops.to_compute(ops.rms_norm(x, arrays[f"{p}.mlp_norm.weight"], eps))
            gated = ops.mul(ops.gelu(ops.linear(h, w[f"{p}.mlp.gate.weight"], None), exact=False), ops.linear(h, w[f"{p}.mlp.up.weight"], None))
            x = ops.add(x, full.linear(ops.cast(gated, "fp32"), down[f"{p}.mlp.down.weight"], None))
        if not last:
            return [ops.identity(x, HIDDEN_OUT)]
        states = ops.rms_norm(x, arrays["final_norm.weight"], eps)
        return [mb.mul(x=states, y=mb.expand_dims(x=mask, axes=[2]), name=TEXT_STATES)]

    return build_program(inputs, body)


def weight_bytes(config: T5Config, precision: str, compression: str | None) -> tuple[float, float]:
    """(bytes of one layer, bytes outside the layers). The output projection is float32 unless compressed."""
    inner = config.num_heads * config.d_kv
    plain, packed = bytes_per_weight(precision, None), bytes_per_weight(precision, compression)
    down = packed if compression else 4.0
    per_layer = (4 * config.d_model * inner + 2 * config.d_model * config.d_ff) * packed + config.d_model * config.d_ff * down
    return per_layer, config.vocab_size * config.d_model * plain
