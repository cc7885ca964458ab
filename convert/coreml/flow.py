"""The flow blocks' Core ML functions: per-block cached steps and the deep block's text prefill.

Each function takes a chunk of n tokens at an explicit cache position and returns the block's
(scale logit, shift), soft-clipped, float32; softplus, guidance and the update are the
sampler's (Swift) job, in float32. The KV cache of every layer is Core ML state (float16,
iOS 18 / macOS 15), written at `position` with `slice_update`, so a Jacobi pass simply
rewrites its slots. A block's layers may be split over several packages (iOS weight files
under 1 GB): then every package but the last returns `next_hidden`, which the next one takes
as `hidden`.

`kv_cache="io"` passes the caches as inputs and outputs instead of state: Core ML states are
float16 only, so this is how a float32 graph is checked at the flow's own tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_starflow.config import FlowConfig

from .builder import Ops, build_program, state_spec, tensor_spec
from .compress import bytes_per_weight
from .coremltools_api import Program, Var, mb
from .flow_graph import (
    BlockShape,
    SequenceLayout,
    embed_text,
    embed_tokens,
    gather_rope,
    make_layout,
    output_head,
    query_positions,
    rope_table,
    transformer_layer,
)
from .package import HIDDEN_IN, HIDDEN_OUT
from .weights import Weights

TOKENS, POSITION, TEXT, SCALE_LOGIT, SHIFT = "tokens", "position", "text", "scale_logit", "shift"
PREFILL = "prefill"
KV_CACHE_MODES = ("state", "io")


def step_name(chunk: int) -> str:
    return f"step_{chunk}"


def cache_names(layer: int) -> tuple[str, str]:
    return f"key_cache_{layer}", f"value_cache_{layer}"


def updated_name(cache: str) -> str:
    """Output name of an updated cache in `io` mode."""
    return f"new_{cache}"


@dataclass(frozen=True)
class BlockPlan:
    """What is exported for one flow block at one image size."""

    index: int
    flipped: bool
    has_text: bool
    rows: int
    grid: tuple[int, int]
    text_length: int
    chunk_sizes: tuple[int, ...]
    layer_groups: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cache_length(self) -> int:
        """Text prefix + tokens + spare slots for the padding of a short last Jacobi chunk."""
        return self.text_length + self.tokens + max(self.chunk_sizes) - 1


class CacheStore:
    """Writes a layer's keys/values at the chunk's position and returns the whole buffers."""

    def __init__(self, ops: Ops, layout: SequenceLayout, inputs: dict[str, Var], mode: str):
        self.ops, self.layout, self.inputs, self.mode = ops, layout, inputs, mode
        self.outputs: list[Var] = []

    def write(self, layer: int, keys: Var, values: Var, position: Var) -> tuple[Var, Var]:
        buffers = []
        for name, update in zip(cache_names(layer), (keys, values)):
            source = self.inputs[name]
            if self.mode == "state":
                current = mb.read_state(input=source)
                new = self.ops.write_slice(current, self.ops.cast(update, "fp16"), self.layout.cache_axis, position)
                mb.coreml_update_state(state=source, value=new)
                buffers.append(self.ops.to_compute(new))
            else:
                new = self.ops.write_slice(source, update, self.layout.cache_axis, position)
                self.outputs.append(self.ops.identity(new, updated_name(name)))
                buffers.append(new)
        return buffers[0], buffers[1]


def _inputs(plan: BlockPlan, layout: SequenceLayout, group: int, first_name: str, first_shape: tuple, kv_cache: str,
            precision_dtype: str, with_position: bool) -> dict:
    specs = {first_name: tensor_spec(first_shape, "fp32")}
    if with_position:
        specs[POSITION] = tensor_spec((1,), "int32")
    shape = layout.cache_shape(plan.rows, plan.cache_length)
    for layer in plan.layer_groups[group]:
        for name in cache_names(layer):
            specs[name] = state_spec(shape) if kv_cache == "state" else tensor_spec(shape, precision_dtype)
    return specs


def _run_layers(ops: Ops, layout: SequenceLayout, w: Weights, plan: BlockPlan, group: int, h: Var, positions: Var,
                position: Var, table: tuple[np.ndarray, np.ndarray], store: CacheStore) -> Var:
    cos = gather_rope(ops, layout, table[0], positions)
    sin = gather_rope(ops, layout, table[1], positions)
    mask = layout.mask(ops, plan.cache_length, positions)

    def attend(index: int, q: Var, k: Var, v: Var) -> Var:
        keys, values = store.write(index, layout.cache_form(ops, k), layout.cache_form(ops, v), position)
        return layout.attend(ops, q, keys, values, mask)

    for layer in plan.layer_groups[group]:
        h = transformer_layer(ops, layout, w, layer, h, cos, sin, attend)
    return h


def _hidden_output(ops: Ops, layout: SequenceLayout, h: Var) -> Var:
    return ops.identity(ops.cast(layout.leave(ops, h), "fp32"), HIDDEN_OUT)


def step_program(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, chunk: int,
                 attention: str, precision: str, kv_cache: str = "state") -> Program:
    """`step_{chunk}` of one package of a block: tokens (or hidden) at `position` → (scale logit, shift) (or hidden)."""
    ops = Ops(precision)
    layout = make_layout(attention, BlockShape.of(config))
    first, last = group == 0, group == len(plan.layer_groups) - 1
    name, width = (TOKENS, config.token_channels) if first else (HIDDEN_IN, config.channels)
    specs = _inputs(plan, layout, group, name, (plan.rows, chunk, width), kv_cache, ops.dtype, with_position=True)
    table = rope_table(config, *plan.grid, plan.text_length, plan.cache_length)

    def body(v: dict[str, Var]) -> list[Var]:
        w = Weights(ops, arrays)
        store = CacheStore(ops, layout, v, kv_cache)
        position = v[POSITION]
        h = embed_tokens(ops, layout, w, v[TOKENS]) if first else layout.enter(ops, ops.to_compute(v[HIDDEN_IN]))
        h = _run_layers(ops, layout, w, plan, group, h, query_positions(position, chunk), position, table, store)
        if not last:
            return [_hidden_output(ops, layout, h), *store.outputs]
        a, b = output_head(ops, layout, w, h)
        return [ops.identity(a, SCALE_LOGIT), ops.identity(b, SHIFT), *store.outputs]

    return build_program(specs, body)


def prefill_program(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, attention: str,
                    precision: str, kv_cache: str = "state") -> Program:
    """`prefill` of the deep block: the text states fill cache positions 0…T-1; its output (`next_hidden`) is ignored at the end."""
    ops = Ops(precision)
    layout = make_layout(attention, BlockShape.of(config))
    first = group == 0
    name, width = (TEXT, config.txt_dim) if first else (HIDDEN_IN, config.channels)
    length = plan.text_length
    specs = _inputs(plan, layout, group, name, (plan.rows, length, width), kv_cache, ops.dtype, with_position=False)
    table = rope_table(config, *plan.grid, plan.text_length, plan.cache_length)

    def body(v: dict[str, Var]) -> list[Var]:
        w = Weights(ops, arrays)
        store = CacheStore(ops, layout, v, kv_cache)
        position = mb.const(val=np.zeros(1, np.int32))
        h = embed_text(ops, layout, w, v[TEXT]) if first else layout.enter(ops, ops.to_compute(v[HIDDEN_IN]))
        h = _run_layers(ops, layout, w, plan, group, h, mb.const(val=np.arange(length, dtype=np.int32)), position, table, store)
        return [_hidden_output(ops, layout, h), *store.outputs]

    return build_program(specs, body)


def block_programs(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, attention: str,
                   precision: str, kv_cache: str = "state") -> dict[str, Program]:
    """Every function of one package of a block, by function name."""
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, not {kv_cache!r}")
    programs = {step_name(n): step_program(config, arrays, plan, group, n, attention, precision, kv_cache) for n in plan.chunk_sizes}
    if plan.has_text:
        programs[PREFILL] = prefill_program(config, arrays, plan, group, attention, precision, kv_cache)
    return programs


def weight_bytes(config: FlowConfig, precision: str, compression: str | None) -> tuple[float, float]:
    """(bytes of one transformer layer, bytes outside the layers) of a block; norms and biases are negligible.

    Only the attention and MLP linears are compressed; the input, text and output projections stay.
    """
    c = config.channels
    per_layer = (4 * c * c + 2 * c * int(c * config.expansion)) * bytes_per_weight(precision, compression)
    outside = (3 * config.token_channels * c + config.txt_dim * c) * bytes_per_weight(precision, None)
    return per_layer, outside
