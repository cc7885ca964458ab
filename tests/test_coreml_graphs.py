"""Export variants and building blocks, each checked on its own saved package.

Weight compression (size factor and numbers), the Neural Engine (split-einsum) layout, iOS
package splitting, the text encoder split in two, the VAE at the fixture's sizes, and the
evaluator's refusal of ops it does not know. Float32 programs are held to the fixture READMEs'
tolerances (max-abs): block step outputs 1e-4, samples 2e-4 (fixtures/starflow §7), text states
1e-5 (fixtures/t5 §5), VAE 2e-5 (fixtures/vae §6).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("coremltools", reason="the Core ML export needs the coreml extra: pip install -e '.[coreml]'")

from mlx_starflow.convert.coreml import mil_eval
from mlx_starflow.convert.coreml.backends import EvaluatorBackend
from mlx_starflow.convert.coreml.builder import Ops, build_program, tensor_spec
from mlx_starflow.convert.coreml.compress import WeightCompression, palette
from mlx_starflow.convert.coreml.coremltools_api import ct, load_program, mb, types
from mlx_starflow.convert.coreml.export import export_coreml
from mlx_starflow.convert.coreml.flow import BlockPlan, block_programs, cache_names, step_name, updated_name
from mlx_starflow.convert.coreml.flow_graph import block_arrays, rope_table
from mlx_starflow.convert.coreml.step_tables import StepTables
from mlx_starflow.convert.coreml.package import PackageInfo, convert, package_weight_bytes, save_package
from mlx_starflow.convert.coreml.pipeline import sample
from mlx_starflow.convert.coreml.text_encoder import text_encoder_program
from mlx_starflow.convert.coreml.vae import decoder_program, encoder_program
from mlx_starflow.convert.model import convert_model
from mlx_starflow import load_flow
from mlx_starflow.errors import ConfigError
from mlx_starflow.text_encoder import load_text_encoder
from mlx_starflow.vae import load_vae
from arrays import load, max_abs

STEP_TOL, SAMPLE_TOL, TEXT_TOL, VAE_TOL, DENOISE_TOL = 1e-4, 2e-4, 1e-5, 2e-5, 1e-4
COMPRESSED_STEP_BUDGET = {"int8": 2e-2, "int4": 2e-1, "palette8": 5e-2, "palette6": 1e-1, "palette4": 2e-1}
"""Max |Δ| of a compressed float16 block's step outputs against float32 MLX. Measured: float16
alone 4.9e-4, int8 3.8e-3, int4 6.4e-2 (int8 keeps 8 bits per weight with a scale per output
channel, int4 4 bits with a scale per block of 32), about 3-5× below each budget. Palettes
(a k-means table per 16 output channels): palette8 7.7e-3, palette6 2.5e-2, palette4 5.8e-2."""
STEP_FLOAT16_BUDGET = 5e-3
"""Max |Δ| of a float16 stateful deep block's step outputs against float32 MLX. Measured on the
`step_calls` sequence: split-einsum 9.5e-4, original layout 1.3e-3."""
COMPRESSED_VJP_BUDGET = {"int8": 0.25, "int4": 2.0, "palette8": 0.25, "palette6": 0.5, "palette4": 1.5}
"""Max |Δ| of a compressed float16 block's score-step `vjp` against the same function in float32,
on unit-normal tokens and cotangent (outputs up to 5.3). Measured: float16 alone 5.3e-3, int8
0.107, int4 0.95: the gradient multiplies the weights' rounding twice (forward and backward),
so int4 (18% of the largest output) is a coarse score step on this tiny model. Palettes: palette8
0.053, palette6 0.127, palette4 0.45."""
VAE_FLOAT16_BUDGET = 1e-2
"""As in test_coreml_export.py: measured 5.2e-3 against the official decode; GroupNorm eps (0.016) still shows."""


@pytest.fixture(scope="module")
def model(fixtures_dir: Path, tmp_path_factory) -> Path:
    path = Path(__file__).resolve().parents[1] / "scripts" / "coreml_check.py"
    spec = importlib.util.spec_from_file_location("coreml_check", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules["coreml_check"] = script
    spec.loader.exec_module(script)
    return script.tiny_fixture_model(fixtures_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def flow(model: Path):
    return load_flow(model)


def info(precision: str, compression: str | None = None, attention: str = "original") -> PackageInfo:
    return PackageInfo("tiny", "0" * 64, "test", (64, 64), 16, precision, compression, attention, "macOS15", "test package")


def deep_plan(chunks: tuple[int, ...] = (1, 4)) -> BlockPlan:
    return BlockPlan(5, False, True, 2, (8, 8), 16, chunks, ((0, 1),))


def run_steps(program, flow, plan: BlockPlan, mode: str, text: np.ndarray, calls, suffix: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """Prefill, then (tokens, position) calls, on a saved deep-block package (functions named with `suffix`)."""
    prefill = program.functions["prefill" + suffix]
    caches = {name: np.zeros(var.shape, np.float16 if mode == "state" else mil_eval.DTYPES[types.builtin_to_string(var.dtype)])
              for name, var in prefill.inputs.items() if name.startswith(("key_", "value_"))}

    def call(function: str, inputs: dict) -> dict:
        if mode == "state":
            return mil_eval.run(program, inputs, caches, function=function)
        out = mil_eval.run(program, {**inputs, **caches}, function=function)
        for name in caches:
            caches[name] = out[updated_name(name)]
        return out

    call("prefill" + suffix, {"text": text})
    results = []
    for tokens, position in calls:
        out = call(step_name(tokens.shape[1]) + suffix, {"tokens": tokens, "position": np.array([position], np.int32)})
        results.append((out["scale_logit"], out["shift"]))
    return results


def mlx_steps(flow, text: np.ndarray, plan: BlockPlan, calls) -> list[tuple[np.ndarray, np.ndarray]]:
    block = flow.blocks[plan.index]
    cos, sin = flow._rope(8, 8, plan.text_length)
    cache = block.make_cache(plan.rows, plan.cache_length)
    block.prefill(mx.array(text), cos, sin, cache)
    return [tuple(np.array(v) for v in block.step(mx.array(t), mx.array([p]), cos, sin, cache)) for t, p in calls]


@pytest.fixture(scope="module")
def step_calls(fixtures_dir: Path):
    text = load(fixtures_dir / "starflow" / "inputs.safetensors")["y_cfg"][[0, 2]]
    tokens = np.random.default_rng(0).standard_normal((2, 4, 4)).astype(np.float32)
    return text, [(tokens[:, :1], 16), (tokens, 17), (tokens[:, :1], 21), (tokens, 17)]


SHALLOW = BlockPlan(0, True, False, 1, (8, 8), 0, (1,), ((0,),))
LINEARS = ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")


@pytest.fixture(scope="module")
def plain_shallow(flow, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "plain.mlpackage"
    save_package(block_programs(flow.config, block_arrays(flow, 0), replace(SHALLOW, score=True), 0, "original", "float16"), path,
                 info("float16"))
    return path


def shallow_steps(flow, step: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]) -> float:
    """Max |Δ| of (scale logit, shift) over three cached one-token steps of block 0, against MLX."""
    block = flow.blocks[0]
    cos, sin = flow._rope(8, 8, 0)
    cache = block.make_cache(1, SHALLOW.cache_length)
    tokens = np.random.default_rng(1).standard_normal((1, 3, 4)).astype(np.float32)
    worst = 0.0
    for t in range(3):
        a, b = step(tokens[:, t : t + 1], t)
        a_ref, b_ref = block.step(mx.array(tokens[:, t : t + 1]), mx.array([t]), cos, sin, cache)
        worst = max(worst, max_abs(a, a_ref), max_abs(b, b_ref))
    return worst


def palette_factor(arrays: dict[str, np.ndarray], nbits: int, group: int = 16) -> float:
    """Palettized linear bytes over float16 bytes: n-bit indices plus a float16 table of 2**n
    entries per group of output channels."""
    kernels = [a for k, a in arrays.items() if k.endswith(LINEARS)]
    packed = sum(a.size * nbits / 8 + a.shape[0] // group * 2**nbits * 2 for a in kernels)
    return packed / (2 * sum(a.size for a in kernels))


@pytest.mark.parametrize("compression", ["int8", "int4", "palette8", "palette6", "palette4"])
def test_compression_shrinks_the_linear_weights(flow, plain_shallow: Path, tmp_path: Path, compression: str) -> None:
    """Only attention/MLP linears are compressed: int8 ≈ 0.5× of float16 (+ a scale per output
    channel), int4 block 32 = (0.5 + 2/32)/2 = 0.281× (measured: 0.507 and 0.282; the whole
    package, with its uncompressed projections, tables and norms: 0.537 and 0.326); an N-bit
    palette N/16 plus its tables (measured 0.594, 0.399, 0.257 for 8, 6, 4 bits at width 128,
    where the tables weigh most). The score step's forward and vjp read the same compressed
    constants as the step: one copy in all."""
    arrays = block_arrays(flow, 0)
    path = tmp_path / "small.mlpackage"
    programs = block_programs(flow.config, arrays, replace(SHALLOW, score=True), 0, "original", "float16",
                              compression=WeightCompression(compression, 128 * 128 - 1))
    save_package(programs, path, info("float16", compression))
    linear = 2 * sum(a.size for k, a in arrays.items() if k.endswith(LINEARS))
    rest = package_weight_bytes(plain_shallow) - linear
    factor = (package_weight_bytes(path) - rest) / linear
    if compression.startswith("palette"):
        exact = palette_factor(arrays, int(compression[-1]))
        expected = (exact * 0.95, exact * 1.01)
    else:
        expected = (0.50, 0.52) if compression == "int8" else (0.28, 0.29)
    assert expected[0] <= factor <= expected[1], factor
    program = load_program(path)
    decompress = "constexpr_lut_to_dense" if compression.startswith("palette") else "constexpr_blockwise_shift_scale"
    for function in ("step_1", "forward", "vjp"):
        ops = program.functions[function].operations
        assert sum(op.op_type == decompress for op in ops) == len(LINEARS), function
    caches = {name: np.zeros((1, 2, SHALLOW.cache_length, 64), np.float16) for name in cache_names(0)}

    def step(tokens: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        out = mil_eval.run(program, {"tokens": tokens, "position": np.array([position], np.int32)}, caches, function="step_1")
        return out["scale_logit"], out["shift"]

    assert shallow_steps(flow, step) < COMPRESSED_STEP_BUDGET[compression]
    exact = tmp_path / "exact.mlpackage"
    save_package(block_programs(flow.config, arrays, replace(SHALLOW, score=True), 0, "original", "float32"), exact, info("float32"))
    rng = np.random.default_rng(2)
    inputs = {name: rng.standard_normal((1, 64, 4)).astype(np.float32) for name in ("tokens", "cotangent")}
    expected = mil_eval.run(load_program(exact), inputs, function="vjp")["tokens_cotangent"]
    assert max_abs(mil_eval.run(program, inputs, function="vjp")["tokens_cotangent"], expected) < COMPRESSED_VJP_BUDGET[compression]


def test_palette_is_the_one_dimensional_k_means_optimum() -> None:
    """On three well-separated clusters with 2 bits, the table holds each cluster's mean (and the
    fourth entry splits one cluster), every value maps to its nearest entry, and no table of
    the same size (a grid search over perturbations) has a lower squared error."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(c, 0.01, 200) for c in (-1.0, 0.0, 2.0)]).astype(np.float32)
    lut, indices = palette(values, 2)
    assert lut.shape == (4,) and np.all(np.diff(lut) >= 0)
    np.testing.assert_array_equal(indices, np.abs(values[:, None] - lut[None]).argmin(axis=1))
    means = sorted(values[i * 200:(i + 1) * 200].mean() for i in range(3))
    assert sum(np.min(np.abs(lut - m)) < 0.02 for m in means) == 3
    error = np.sum((values - lut[indices]) ** 2)
    for shift in itertools.product((-0.01, 0.0, 0.01), repeat=4):
        moved = np.sort(lut + np.array(shift, np.float32))
        assert error <= np.sum(np.min((values[:, None] - moved[None]) ** 2, axis=1)) * (1 + 1e-6)


def test_palette_group_size_must_divide_the_channels(flow) -> None:
    with pytest.raises(ConfigError, match="--palette-group-size 48"):
        WeightCompression("palette4", 0, group_size=48).constant(np.ones((128, 128), np.float32), np.float16)


def test_cache_io_twins_match_the_stateful_functions(flow, step_calls, tmp_path: Path) -> None:
    """The state-sharing fallback: each sampling function has a twin taking the caches as float16
    inputs/outputs, as the state holds them, and sharing the weights; same outputs bit for bit."""
    plan = replace(deep_plan(), cache_io=True)
    path = tmp_path / "fallback.mlpackage"
    save_package(block_programs(flow.config, block_arrays(flow, 5), plan, 0, "original", "float16"), path, info("float16"))
    program = load_program(path)
    assert {"prefill_io", "step_1_io", "step_4_io"} <= set(program.functions)
    caches = [var for name, var in program.functions["step_4_io"].inputs.items() if name.startswith(("key_cache", "value_cache"))]
    assert caches and all(var.dtype == types.fp16 for var in caches)
    text, calls = step_calls
    for (a, b), (a_io, b_io) in zip(run_steps(program, flow, plan, "state", text, calls),
                                    run_steps(program, flow, plan, "io", text, calls, suffix="_io")):
        np.testing.assert_array_equal(a, a_io)
        np.testing.assert_array_equal(b, b_io)


def test_steps_with_table_inputs_match_the_gathering_steps_exactly(flow, step_calls, tmp_path: Path) -> None:
    """`--step-tables`: the RoPE rows and the mask come in as inputs, computed by the sampler, so the
    step has no runtime gather; in float32 it gives the old step's outputs bit for bit, in both layouts."""
    text, calls = step_calls
    plan = deep_plan()
    tables = StepTables(*rope_table(flow.config, *plan.grid, plan.text_length, plan.cache_length))
    for attention in ("original", "split-einsum"):
        outputs = []
        for with_tables in (False, True):
            path = tmp_path / f"{attention}-{with_tables}.mlpackage"
            save_package(block_programs(flow.config, block_arrays(flow, 5), replace(plan, step_tables=with_tables), 0, attention,
                                        "float32", "io"), path, info("float32", attention=attention))
            program = load_program(path)
            if with_tables:
                assert not any(op.op_type == "gather" for op in program.functions["step_4"].operations)
            caches = {name: np.zeros(var.shape, np.float32) for name, var in program.functions["prefill"].inputs.items()
                      if name.startswith(("key_", "value_"))}

            def call(function: str, inputs: dict) -> dict:
                out = mil_eval.run(program, {**inputs, **caches}, function=function)
                caches.update({name: out[updated_name(name)] for name in caches})
                return out

            call("prefill", {"text": text})
            results = []
            for tokens, position in calls:
                extra = tables.inputs(position, tokens.shape[1]) if with_tables else {}
                out = call(step_name(tokens.shape[1]), {"tokens": tokens, "position": np.array([position], np.int32), **extra})
                results.append((out["scale_logit"], out["shift"]))
            outputs.append(results)
        for (a, b), (a_tables, b_tables) in zip(*outputs):
            np.testing.assert_array_equal(a, a_tables)
            np.testing.assert_array_equal(b, b_tables)


def test_step_tables_export_samples_like_the_official_model(fixtures_dir: Path, tmp_path: Path) -> None:
    """The runner slices the exported table and builds the mask per call; guided sampling matches the fixture."""
    sf = fixtures_dir / "starflow"
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", tmp_path / "model")
    export_coreml(tmp_path / "model", tmp_path / "export", dtype="float32", kv_cache="io", batch_size=2, score_step=False, step_tables=True)
    backend = EvaluatorBackend(tmp_path / "export")
    assert all((tmp_path / "export" / b["step_tables"]["file"]).is_file() for b in backend.manifest["flow"]["blocks"])
    ref = load(sf / "label_model" / "fixtures.safetensors")
    seq, _ = sample(backend.manifest, backend.block, ref["noise"], ref["y_cfg"], 2.5)
    for i in range(4):
        assert max_abs(seq[i], ref[f"g2p5.seq.{i}"]) < SAMPLE_TOL, f"g2p5.seq.{i}"


def test_state_fallback_export_names_the_twins(fixtures_dir: Path, tmp_path: Path) -> None:
    """`--state-fallback`: the manifest maps every sampling function to its cache-IO twin and
    each cache to its updated output, per block, and the packages hold those functions."""
    sf = fixtures_dir / "starflow"
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", tmp_path / "model")
    export_coreml(tmp_path / "model", tmp_path / "export", score_step=False, state_fallback=True)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    for block in manifest["flow"]["blocks"]:
        twins = block["cache_io"]
        assert twins["functions"]["step"] == {size: f"{name}_io" for size, name in block["functions"]["step"].items()}
        assert ("prefill" in twins["functions"]) == block["has_text"]
        layers = [layer for group in block["layers"] for layer in group]
        assert layers and twins["caches"] == {f"{kind}_cache_{layer}": f"new_{kind}_cache_{layer}" for kind in ("key", "value") for layer in layers}
        functions = set(load_program(tmp_path / "export" / block["package"]).functions)
        assert set(twins["functions"]["step"].values()) <= functions


def test_split_einsum_layout_matches_original(flow, step_calls, tmp_path: Path) -> None:
    plan = deep_plan()
    arrays = block_arrays(flow, 5)
    save_package(block_programs(flow.config, arrays, plan, 0, "split-einsum", "float32", "io"), tmp_path / "ane.mlpackage",
                 info("float32", attention="split-einsum"))
    program = load_program(tmp_path / "ane.mlpackage")
    op_types = {op.op_type for op in program.functions["step_4"].operations}
    assert "conv" in op_types and "linear" not in op_types and "scaled_dot_product_attention" not in op_types
    prefill = program.functions["prefill"]
    assert all(var.shape == (2, 128, 1, plan.cache_length) for name, var in prefill.inputs.items() if name in cache_names(0))
    text, calls = step_calls
    for (a, b), (a_ref, b_ref) in zip(run_steps(program, flow, plan, "io", text, calls), mlx_steps(flow, text, plan, calls)):
        assert max(max_abs(a, a_ref), max_abs(b, b_ref)) < STEP_TOL


def test_split_einsum_float16_with_the_stateful_cache(flow, step_calls, tmp_path: Path) -> None:
    """The Neural Engine layout as shipped: float16 weights and compute, the KV cache as float16
    Core ML state, prefill then 1- and 4-token steps (a rewritten chunk included) against float32 MLX."""
    plan = deep_plan()
    save_package(block_programs(flow.config, block_arrays(flow, 5), plan, 0, "split-einsum", "float16", "state"),
                 tmp_path / "ane16.mlpackage", info("float16", attention="split-einsum"))
    program = load_program(tmp_path / "ane16.mlpackage")
    text, calls = step_calls
    for (a, b), (a_ref, b_ref) in zip(run_steps(program, flow, plan, "state", text, calls), mlx_steps(flow, text, plan, calls)):
        assert max(max_abs(a, a_ref), max_abs(b, b_ref)) < STEP_FLOAT16_BUDGET


ANE_PALETTE_BUDGET = {"palette8": 0.06, "palette4": 0.3}
"""Max |Δ| of the palettized split-einsum deep block's float16 stateful steps against float32 MLX.
Measured: palette8 0.020, palette4 0.110 (two layers and the text prefix, so above the shallow
block's numbers)."""


@pytest.mark.parametrize("compression", ["palette8", "palette4"])
def test_split_einsum_palettized_for_the_neural_engine(flow, step_calls, tmp_path: Path, compression: str) -> None:
    """What the README recommends for the Neural Engine: the 1×1-convolution layout with its
    (out, in, 1, 1) kernels palettized (one table per 16 output channels), float16 stateful steps."""
    plan = deep_plan()
    programs = block_programs(flow.config, block_arrays(flow, 5), plan, 0, "split-einsum", "float16", "state",
                              WeightCompression(compression, 128 * 128 - 1))
    save_package(programs, tmp_path / "ane.mlpackage", info("float16", compression, "split-einsum"))
    program = load_program(tmp_path / "ane.mlpackage")
    kernels = [op.outputs[0].shape for op in program.functions["step_4"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(kernels) == 8 and all(len(shape) == 4 for shape in kernels), kernels
    text, calls = step_calls
    for (a, b), (a_ref, b_ref) in zip(run_steps(program, flow, plan, "state", text, calls), mlx_steps(flow, text, plan, calls)):
        assert max(max_abs(a, a_ref), max_abs(b, b_ref)) < ANE_PALETTE_BUDGET[compression]


def test_ios_export_splits_the_deep_block_under_the_limit(fixtures_dir: Path, tmp_path: Path) -> None:
    """A limit between one and two layers splits the 2-layer deep block into two packages chained through `next_hidden` → `hidden`;
    the iOS export keeps the score step, as `forward`/`vjp` in the split packages, and denoises like MLX."""
    sf = fixtures_dir / "starflow"
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", tmp_path / "model")
    limit = 1.5 * 4 * 12 * 128 * 128
    export_coreml(tmp_path / "model", tmp_path / "export", dtype="float32", target="iOS18", kv_cache="io", batch_size=2, max_package_bytes=limit)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    deep = manifest["flow"]["blocks"][2]
    assert deep["packages"] == ["FlowBlock2_0.mlpackage", "FlowBlock2_1.mlpackage"] and deep["layers"] == [[0], [1]]
    assert manifest["score_step"]["noise_std"] > 0 and manifest["target"] == "iOS18"
    assert all(deep["functions"][name] == name for name in ("forward", "vjp"))
    assert all(size < limit for size in manifest["weight_bytes"].values())
    backend = EvaluatorBackend(tmp_path / "export")
    ref = load(sf / "label_model" / "fixtures.safetensors")
    seq, _ = sample(manifest, backend.block, ref["noise"], ref["y_cfg"], 2.5)
    for i in range(4):
        assert max_abs(seq[i], ref[f"g2p5.seq.{i}"]) < SAMPLE_TOL, f"g2p5.seq.{i}"
    flow = load_flow(tmp_path / "model")
    latent = ref["x_noisy"][:1]
    expected = np.array(flow.denoise(mx.array(latent), mx.array(ref["y"][:1])))
    assert max_abs(backend.denoise(latent, ref["y"][:1]), expected) < DENOISE_TOL


def test_text_encoder_split_in_two_matches_official(model: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    encoder = load_text_encoder(model / "text_encoder").encoder
    oracle = load(fixtures_dir / "t5" / "fixtures.safetensors")
    programs = []
    for i, layers in enumerate(([0], [1])):
        convert(text_encoder_program(encoder, 16, "float32", layers), "iOS18").save(str(tmp_path / f"t{i}.mlpackage"))
        programs.append(load_program(tmp_path / f"t{i}.mlpackage"))
    assert "hidden" in programs[1].functions["main"].inputs and "next_hidden" in [v.name for v in programs[0].functions["main"].outputs]
    for row in range(len(oracle["short.input_ids"])):
        mask = oracle["short.attention_mask"][row : row + 1]
        hidden = mil_eval.run(programs[0], {"input_ids": oracle["short.input_ids"][row : row + 1], "attention_mask": mask})["next_hidden"]
        states = mil_eval.run(programs[1], {"hidden": hidden, "attention_mask": mask})["text_states"]
        assert max_abs(states, oracle["short.text_states"][row : row + 1]) <= TEXT_TOL


@pytest.mark.parametrize("case,shape", [("decode", (4, 4)), ("decode_wide", (4, 6))])
def test_vae_decoder_matches_official(model: Path, fixtures_dir: Path, tmp_path: Path, case: str, shape: tuple[int, int]) -> None:
    vae = load_vae(model / "vae")
    fx = load(fixtures_dir / "vae" / "fixtures.safetensors")
    for precision, tolerance in (("float32", VAE_TOL), ("float16", VAE_FLOAT16_BUDGET)):
        convert(decoder_program(vae, *shape, precision), "macOS15").save(str(tmp_path / f"{precision}.mlpackage"))
        program = load_program(tmp_path / f"{precision}.mlpackage")
        for row in range(fx[f"{case}.z_unscaled"].shape[0]):
            image = mil_eval.run(program, {"latent": fx[f"{case}.z_unscaled"][row : row + 1]})["image"]
            assert max_abs(image, fx[f"{case}.official_x"][row : row + 1]) < tolerance, (precision, row)


def test_vae_encoder_matches_official(model: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    vae = load_vae(model / "vae")
    fx = load(fixtures_dir / "vae" / "fixtures.safetensors")
    convert(encoder_program(vae, 32, 32, "float32"), "macOS15").save(str(tmp_path / "encoder.mlpackage"))
    program = load_program(tmp_path / "encoder.mlpackage")
    for row in range(2):
        latent = mil_eval.run(program, {"image": fx["inputs.images"][row : row + 1]})["latent"]
        assert max_abs(latent, fx["encode.mean_scaled"][row : row + 1]) < VAE_TOL


def test_evaluator_refuses_an_op_it_does_not_know(tmp_path: Path) -> None:
    def body(v):
        return [mb.sin(x=v["x"], name="y")]

    convert(build_program({"x": tensor_spec((2,), "fp32")}, body), "macOS15").save(str(tmp_path / "sin.mlpackage"))
    with pytest.raises(mil_eval.UnsupportedOp, match="'sin'"):
        mil_eval.run(load_program(tmp_path / "sin.mlpackage"), {"x": np.zeros(2, np.float32)})


def test_evaluator_rounds_each_op_to_its_declared_dtype(tmp_path: Path) -> None:
    """1 + 2⁻¹² is exact in float32 and rounds to 1 in float16: the evaluator must see the difference."""
    ops = Ops("float16")

    def body(v):
        half = ops.add(ops.to_compute(v["x"]), np.float16(2.0**-12))
        return [ops.identity(ops.cast(half, "fp32"), "y")]

    convert(build_program({"x": tensor_spec((1,), "fp32")}, body), "macOS15").save(str(tmp_path / "round.mlpackage"))
    y = mil_eval.run(load_program(tmp_path / "round.mlpackage"), {"x": np.ones(1, np.float32)})["y"]
    assert y.dtype == np.float32 and y[0] == 1.0


PALETTE_TEXT_BUDGET = 0.5
"""Max |Δ| of a palette8 float16 text encoder (groups of 32 channels) against the official T5
states (up to 4.1). Measured 0.22 (int8: 0.066, float16 alone: 0.009; palette6: 0.36): the tiny
T5 (width 32) has only 1024 weights per group, where k-means pairs up the outliers; the released
T5's groups hold 65536."""


def test_palettized_export_compresses_every_big_linear_with_the_group_asked(model: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    """`--compress palette8 --palette-group-size 32`: the manifest and every package say so, each
    flow block's functions and the text encoder read lookup tables of one group per 32 output
    channels, and the text encoder's states stay within PALETTE_TEXT_BUDGET of the official T5."""
    out = export_coreml(model, tmp_path / "export", compress="palette8", palette_group_size=32, score_step=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["compression"], manifest["palette_group_size"]) == ("palette8", 32)
    for name in ("FlowBlock0.mlpackage", "FlowBlock5.mlpackage", "TextEncoder.mlpackage"):
        meta = ct.models.MLModel(str(out / name), skip_model_load=True).user_defined_metadata
        assert (meta["compression"], meta["palette_group_size"]) == ("palette8", "32"), name
        for function, body in load_program(out / name).functions.items():
            tables = [op for op in body.operations if op.op_type == "constexpr_lut_to_dense"]
            assert tables, f"{name}:{function}"
            for op in tables:
                indices, lut = op.inputs["indices"].shape, op.inputs["lut"].shape
                assert lut[0] * 32 == indices[0] and lut[-2:] == (256, 1), (name, indices, lut)
    oracle = load(fixtures_dir / "t5" / "fixtures.safetensors")
    encoder = load_program(out / "TextEncoder.mlpackage")
    for row in range(len(oracle["short.input_ids"])):
        inputs = {"input_ids": oracle["short.input_ids"][row : row + 1], "attention_mask": oracle["short.attention_mask"][row : row + 1]}
        states = mil_eval.run(encoder, inputs)["text_states"]
        assert max_abs(states, oracle["short.text_states"][row : row + 1]) < PALETTE_TEXT_BUDGET
