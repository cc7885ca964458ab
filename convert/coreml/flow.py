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

The score-step denoise lives in the same packages, sharing the weights: `forward` runs the
block in the likelihood direction over a whole image (tokens → z, or → `next_hidden` for all
but the last package of a split block) and `vjp` returns the cotangent of its inputs for a
cotangent of its output, with the block's Σ log σ term of D·nll included. The driver
(`score.denoise`, Swift `BlockScoreStep`) runs every block forward, then the vjps in reverse
from the cotangent z of ½Σz². One image per call, conditional text rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_starflow.config import FlowConfig
from mlx_starflow.sampling import INV_SOFTPLUS_1

from .autodiff import Tape
from .builder import Ops, build_program, state_spec, tensor_spec
from .compress import WeightCompression, bytes_per_weight
from .coremltools_api import Program, Var, mb
from .flow_graph import (
    BlockShape,
    SequenceLayout,
    embed_text,
    embed_tokens,
    gather_rope,
    likelihood_inputs,
    likelihood_layers,
    make_layout,
    output_head,
    query_positions,
    rope_table,
    transformer_layer,
)
from .package import HIDDEN_IN, HIDDEN_OUT
from .step_tables import MASK, ROPE_COS, ROPE_SIN
from .weights import Weights

TOKENS, POSITION, TEXT, SCALE_LOGIT, SHIFT = "tokens", "position", "text", "scale_logit", "shift"
PREFILL = "prefill"
FORWARD, VJP = "forward", "vjp"
Z, COTANGENT, TOKENS_COTANGENT, HIDDEN_COTANGENT = "z", "cotangent", "tokens_cotangent", "hidden_cotangent"
KV_CACHE_MODES = ("state", "io")


def step_name(chunk: int) -> str:
    return f"step_{chunk}"


def io_name(function: str) -> str:
    """The cache-as-inputs/outputs twin of a sampling function."""
    return f"{function}_io"


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
    score: bool = False
    """Whether the packages carry the score step's `forward` and `vjp` functions."""
    step_tables: bool = False
    """Whether the step functions take their RoPE rows and mask as inputs (`step_tables`) instead of gathering them."""
    cache_io: bool = False
    """Whether the packages also carry the sampling functions with the caches as inputs/outputs
    (`io_name`), the fallback for devices that refuse one state shared by several functions."""

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
                position: Var, table: tuple[np.ndarray, np.ndarray], store: CacheStore, given: dict[str, Var] | None = None) -> Var:
    """`given`: the chunk's RoPE rows and mask as inputs (no gather); else gathered from `table` at `positions`."""
    if given is not None:
        cos = layout.rope_rows(ops, ops.to_compute(given[ROPE_COS]))
        sin = layout.rope_rows(ops, ops.to_compute(given[ROPE_SIN]))
        mask = layout.mask_input(ops, ops.to_compute(given[MASK]))
    else:
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
                 attention: str, precision: str, kv_cache: str = "state", compression: WeightCompression | None = None) -> Program:
    """`step_{chunk}` of one package of a block: tokens (or hidden) at `position` → (scale logit, shift) (or hidden)."""
    ops = Ops(precision)
    layout = make_layout(attention, BlockShape.of(config))
    first, last = group == 0, group == len(plan.layer_groups) - 1
    name, width = (TOKENS, config.token_channels) if first else (HIDDEN_IN, config.channels)
    specs = _inputs(plan, layout, group, name, (plan.rows, chunk, width), kv_cache, ops.dtype, with_position=True)
    if plan.step_tables:
        specs.update({ROPE_COS: tensor_spec((chunk, config.head_dim), "fp32"), ROPE_SIN: tensor_spec((chunk, config.head_dim), "fp32"),
                      MASK: tensor_spec((chunk, plan.cache_length), "fp32")})
    table = rope_table(config, *plan.grid, plan.text_length, plan.cache_length)

    def body(v: dict[str, Var]) -> list[Var]:
        w = Weights(ops, arrays, compression)
        store = CacheStore(ops, layout, v, kv_cache)
        position = v[POSITION]
        given = {name: v[name] for name in (ROPE_COS, ROPE_SIN, MASK)} if plan.step_tables else None
        h = embed_tokens(ops, layout, w, v[TOKENS]) if first else layout.enter(ops, ops.to_compute(v[HIDDEN_IN]))
        h = _run_layers(ops, layout, w, plan, group, h, query_positions(position, chunk), position, table, store, given)
        if not last:
            return [_hidden_output(ops, layout, h), *store.outputs]
        a, b = output_head(ops, layout, w, h)
        return [ops.identity(a, SCALE_LOGIT), ops.identity(b, SHIFT), *store.outputs]

    return build_program(specs, body)


def prefill_program(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, attention: str,
                    precision: str, kv_cache: str = "state", compression: WeightCompression | None = None) -> Program:
    """`prefill` of the deep block: the text states fill cache positions 0…T-1; its output (`next_hidden`) is ignored at the end."""
    ops = Ops(precision)
    layout = make_layout(attention, BlockShape.of(config))
    first = group == 0
    name, width = (TEXT, config.txt_dim) if first else (HIDDEN_IN, config.channels)
    length = plan.text_length
    specs = _inputs(plan, layout, group, name, (plan.rows, length, width), kv_cache, ops.dtype, with_position=False)
    table = rope_table(config, *plan.grid, plan.text_length, plan.cache_length)

    def body(v: dict[str, Var]) -> list[Var]:
        w = Weights(ops, arrays, compression)
        store = CacheStore(ops, layout, v, kv_cache)
        position = mb.const(val=np.zeros(1, np.int32))
        h = embed_text(ops, layout, w, v[TEXT]) if first else layout.enter(ops, ops.to_compute(v[HIDDEN_IN]))
        h = _run_layers(ops, layout, w, plan, group, h, mb.const(val=np.arange(length, dtype=np.int32)), position, table, store)
        return [_hidden_output(ops, layout, h), *store.outputs]

    return build_program(specs, body)


def _likelihood_specs(config: FlowConfig, plan: BlockPlan, group: int) -> dict:
    """Inputs of `forward`/`vjp` in one package: tokens (first and last package), text (first, deep block), hidden (all but the first)."""
    first, last = group == 0, group == len(plan.layer_groups) - 1
    specs = {}
    if first or last:
        specs[TOKENS] = tensor_spec((1, plan.tokens, config.token_channels), "fp32")
    if first and plan.has_text:
        specs[TEXT] = tensor_spec((1, plan.text_length, config.txt_dim), "fp32")
    if not first:
        specs[HIDDEN_IN] = tensor_spec((1, plan.text_length + plan.tokens, config.channels), "fp32")
    return specs


def _likelihood_forward(ops: Ops, config: FlowConfig, w: Weights, plan: BlockPlan, group: int,
                        v: dict[str, Var]) -> tuple[Var, Var | None]:
    """This package's part of the block in the likelihood direction: (next hidden, None), or for
    the last package (z = (x − shift)/σ, σ), float32."""
    layout = SequenceLayout(BlockShape.of(config))
    first, last = group == 0, group == len(plan.layer_groups) - 1
    h = likelihood_inputs(ops, layout, w, v[TOKENS], v.get(TEXT)) if first else ops.to_compute(v[HIDDEN_IN])
    cos, sin = rope_table(config, *plan.grid, plan.text_length, plan.text_length + plan.tokens)
    h = likelihood_layers(ops, layout, w, plan.layer_groups[group], h, cos, sin)
    if not last:
        return ops.cast(h, "fp32"), None
    a, b = output_head(ops, layout, w, ops.slice(h, 1, plan.text_length, plan.text_length + plan.tokens))
    sigma = ops.softplus(ops.add(a, INV_SOFTPLUS_1)) if config.use_softplus else ops.exp(a)
    return ops.div(ops.sub(v[TOKENS], b), sigma), sigma


def forward_program(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, precision: str,
                    compression: WeightCompression | None = None) -> Program:
    """`forward` of one package: one image's tokens in the block's order (and text) → `z`, or → `next_hidden`."""
    last = group == len(plan.layer_groups) - 1

    def body(v: dict[str, Var]) -> list[Var]:
        ops = Ops(precision)
        out, _ = _likelihood_forward(ops, config, Weights(ops, arrays, compression), plan, group, v)
        return [ops.identity(out, Z if last else HIDDEN_OUT)]

    return build_program(_likelihood_specs(config, plan, group), body)


def vjp_program(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, precision: str,
                compression: WeightCompression | None = None) -> Program:
    """`vjp` of one package: the forward's inputs plus `cotangent` (of `z`, or of `next_hidden`) →
    `tokens_cotangent` (first and last package; the driver adds them) and `hidden_cotangent` (all but the first).

    The last package also seeds its σ with 1/σ, the gradient of the block's Σ log σ in D·nll."""
    last = group == len(plan.layer_groups) - 1
    specs = _likelihood_specs(config, plan, group)
    out_shape = (1, plan.tokens, config.token_channels) if last else (1, plan.text_length + plan.tokens, config.channels)
    specs[COTANGENT] = tensor_spec(out_shape, "fp32")

    def body(v: dict[str, Var]) -> list[Var]:
        tape = Tape(precision)
        watched = [name for name in (TOKENS, HIDDEN_IN) if name in v]
        for name in watched:
            tape.watch(v[name])
        out, sigma = _likelihood_forward(tape, config, Weights(tape, arrays, compression), plan, group, v)
        seeds = [(out, v[COTANGENT])]
        if sigma is not None:
            seeds.append((sigma, mb.real_div(x=np.float32(1.0), y=sigma)))
        gradients = tape.backward(seeds, [v[name] for name in watched])
        names = {TOKENS: TOKENS_COTANGENT, HIDDEN_IN: HIDDEN_COTANGENT}
        return [mb.identity(x=g, name=names[name]) for name, g in zip(watched, gradients)]

    return build_program(specs, body)


def block_programs(config: FlowConfig, arrays: dict[str, np.ndarray], plan: BlockPlan, group: int, attention: str,
                   precision: str, kv_cache: str = "state", compression: WeightCompression | None = None) -> dict[str, Program]:
    """Every function of one package of a block, by function name; `compression` compresses the
    big kernels once for all of them."""
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, not {kv_cache!r}")
    if plan.score and attention != "original":
        raise ValueError("the score step's forward/vjp functions exist for the original attention layout only")
    programs = {step_name(n): step_program(config, arrays, plan, group, n, attention, precision, kv_cache, compression)
                for n in plan.chunk_sizes}
    if plan.has_text:
        programs[PREFILL] = prefill_program(config, arrays, plan, group, attention, precision, kv_cache, compression)
    if plan.cache_io and kv_cache == "state":
        for name in list(programs):
            chunk = next((n for n in plan.chunk_sizes if step_name(n) == name), None)
            programs[io_name(name)] = (step_program(config, arrays, plan, group, chunk, attention, precision, "io", compression)
                                       if chunk is not None else
                                       prefill_program(config, arrays, plan, group, attention, precision, "io", compression))
    if plan.score:
        programs[FORWARD] = forward_program(config, arrays, plan, group, precision, compression)
        programs[VJP] = vjp_program(config, arrays, plan, group, precision, compression)
    return programs


def weight_bytes(config: FlowConfig, precision: str, compression: str | None) -> tuple[float, float]:
    """(bytes of one transformer layer, bytes outside the layers) of a block; norms and biases are negligible.

    Only the attention and MLP linears are compressed; the input, text and output projections stay.
    """
    c = config.channels
    per_layer = (4 * c * c + 2 * c * int(c * config.expansion)) * bytes_per_weight(precision, compression)
    outside = (3 * config.token_channels * c + config.txt_dim * c) * bytes_per_weight(precision, None)
    return per_layer, outside
