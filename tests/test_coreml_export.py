"""Core ML export of the tiny fixture models, evaluated with the NumPy MIL evaluator.

Core ML cannot predict on Linux, so every package is re-read from disk as a MIL program and run
by `convert.coreml.mil_eval`; the exported functions are driven by the MLX runtime's own
inversion loops through `convert.coreml.pipeline`, with the padding the Swift sampler uses. Two
exports of the tiny text model are checked:

* float32 with the KV caches as inputs/outputs (Core ML states are float16 only), held to the
  fixture READMEs' float32 tolerances (max-abs): text states 1e-5 (fixtures/t5 §5), every sampled
  sequence 2e-4 plus the official Jacobi iteration counts (fixtures/starflow §7), block step
  outputs 1e-4 (the forward-output tolerance), denoise 1e-4, VAE 2e-5 (fixtures/vae §6);
* the shipped default (float16 weights and compute, float16 KV state), exported through the CLI,
  held to the float16 budgets below, measured here and justified against the bug signals of
  the fixture READMEs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("coremltools", reason="the Core ML export needs the coreml extra: pip install -e '.[coreml]'")

from mlx_starflow.app.cli import main as cli_main
from mlx_starflow.convert.coreml.backends import CoreMLBackend, EvaluatorBackend
from mlx_starflow.convert.coreml.coremltools_api import CoreMLUnavailable, ct
from mlx_starflow.convert.coreml.export import export_coreml
from mlx_starflow.convert.coreml.pipeline import sample
from mlx_starflow.samplers import Jacobi
from mlx_starflow.convert.model import convert_model
from mlx_starflow import load_flow
from mlx_starflow.vae import load_vae
from arrays import load, max_abs

TEXT_TOL, SAMPLE_TOL, STEP_TOL, DENOISE_TOL, VAE_TOL = 1e-5, 2e-4, 1e-4, 1e-4, 2e-5

FLOAT16_BUDGETS = {"text encoder": 2e-2, "flow sequential": 5e-2, "flow jacobi": 5e-2, "score step": 1e-2, "vae decoder": 1e-2}
"""Max |Δ| of the float16 stateful export against float32 (MLX and official), image 0.

Measured with the evaluator (float16 rounding after every op): text states 5.0e-3 (max 9.3e-3 over
the six `short` captions), guided sequential sample 9.5e-3 (1.8e-2 over both images and every
block), Jacobi bs 16 8.8e-3, score step 8.8e-4 (3.3e-3 on `x_noisy`), VAE decode 4.7e-3 (5.2e-3 at
the VAE fixture's size). Each budget is about twice the largest measurement and below the
smallest structural-bug signal of its README: T5 0.54 (bucket max distance), flow samples 0.086
(RoPE θ, guidance 0) and 0.22 (guidance scale, 2.5), denoise 1.0 (σ instead of σ²), VAE 0.016
(GroupNorm eps). Float16 cannot resolve the sub-1e-3 signals (GELU form, LayerNorm eps).
"""


@pytest.fixture(scope="module")
def check_script():
    """scripts/coreml_check.py as a module (it is a script, not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "coreml_check.py"
    spec = importlib.util.spec_from_file_location("coreml_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["coreml_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sf(fixtures_dir: Path) -> Path:
    return fixtures_dir / "starflow"


@pytest.fixture(scope="module")
def model(check_script, fixtures_dir: Path, tmp_path_factory) -> Path:
    return check_script.tiny_fixture_model(fixtures_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def exact(model: Path, tmp_path_factory) -> EvaluatorBackend:
    """float32, caches as inputs/outputs, 2 images per call (the fixtures' batch), Jacobi chunks 4, 16 and 12."""
    out = tmp_path_factory.mktemp("exact") / "export"
    export_coreml(model, out, dtype="float32", kv_cache="io", batch_size=2, jacobi_block_sizes=(4, 16, 12))
    return EvaluatorBackend(out)


@pytest.fixture(scope="module")
def flow(model: Path):
    return load_flow(model)


@pytest.fixture(scope="module")
def shipped(model: Path, tmp_path_factory) -> Path:
    """The default export, through the CLI."""
    out = tmp_path_factory.mktemp("shipped") / "export"
    assert cli_main(["export-coreml", str(model), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def label_model(sf: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("label") / "model"
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", folder)
    return folder


@pytest.fixture(scope="module")
def label(label_model: Path) -> EvaluatorBackend:
    """The pixel-space label model; its score step is the text model's program, checked above."""
    out = label_model.parent / "export"
    export_coreml(label_model, out, dtype="float32", kv_cache="io", batch_size=2, score_step=False)
    return EvaluatorBackend(out)


# ---- the contract and the metadata ----------------------------------------------------------------


def test_manifest_follows_the_contract(shipped: Path, model: Path) -> None:
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert (manifest["format"], manifest["format_version"]) == ("mlx-starflow-coreml", 2)
    assert (manifest["precision"], manifest["compression"], manifest["attention"], manifest["target"]) == ("float16", None, "original", "macOS15")
    assert manifest["image"] == {"height": 64, "width": 64, "channels": 3}
    assert manifest["latent"] == {"channels": 4, "height": 8, "width": 8, "patch_size": 1}
    assert manifest["condition"] == {"kind": "text", "length": 16, "dim": 32, "tokenizer": "tokenizer.json"}
    assert (shipped / "tokenizer.json").read_bytes() == (model / "text_encoder" / "tokenizer.json").read_bytes()
    flow = load_flow(model)
    blocks = manifest["flow"]["blocks"]
    assert [b["index"] for b in blocks] == list(range(6))
    assert [b["flipped"] for b in blocks] == [True, False, True, False, True, False]
    assert [b["has_text"] for b in blocks] == [False] * 5 + [True]
    assert [b["rows"] for b in blocks] == [1] * 5 + [2]
    for b in blocks:
        text = 16 if b["has_text"] else 0
        assert (b["tokens"], b["token_channels"], b["text_length"]) == (64, 4, text)
        assert b["cache_length"] == text + 64 + 16 - 1
        assert b["functions"]["step"] == {"1": "step_1", "16": "step_16"}
        assert ("prefill" in b["functions"]) == b["has_text"]
        assert (b["functions"]["forward"], b["functions"]["vjp"]) == ("forward", "vjp")
        assert b["inputs"]["tokens"] == "tokens" and b["inputs"]["position"] == "position"
        assert b["outputs"] == {"scale_logit": "scale_logit", "shift": "shift"}
        assert b["packages"] == [f"FlowBlock{b['index']}.mlpackage"] == [b["package"]]
        np.testing.assert_array_equal(np.float32(b["sos"]), np.array(flow.blocks[b["index"]].sos).reshape(-1))
    assert manifest["score_step"] == {
        "noise_std": 0.3, "inputs": {"tokens": "tokens", "hidden": "hidden", "cotangent": "cotangent", "text": "text"},
        "outputs": {"z": "z", "next_hidden": "next_hidden", "tokens_cotangent": "tokens_cotangent", "hidden_cotangent": "hidden_cotangent"}}
    assert manifest["vae"]["package"] == "VAEDecoder.mlpackage" and manifest["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["vae"]["factor"] == 8
    assert manifest["text_encoder"]["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    packages = sorted(p.name for p in shipped.glob("*.mlpackage"))
    assert packages == sorted(["TextEncoder.mlpackage", "VAEDecoder.mlpackage", *(f"FlowBlock{i}.mlpackage" for i in range(6))])
    assert sorted(manifest["weight_bytes"]) == packages


def test_every_package_carries_its_metadata(shipped: Path, sf: Path) -> None:
    source = hashlib.sha256((sf / "model.pth").read_bytes()).hexdigest()
    for package in shipped.glob("*.mlpackage"):
        model = ct.models.MLModel(str(package), skip_model_load=True)
        meta = model.user_defined_metadata
        assert meta["source_sha256"] == source, package.name
        assert (meta["model_name"], meta["image_height"], meta["image_width"], meta["text_length"]) == ("tiny", "64", "64", "16")
        assert (meta["precision"], meta["compression"], meta["target"]) == ("float16", "none", "macOS15")
        assert "fixed" in meta["shapes"]
        assert "research" in model.license and model.author and model.short_description


def test_flow_block_functions_share_weights_and_keep_state(shipped: Path, model: Path) -> None:
    spec = ct.utils.load_spec(str(shipped / "FlowBlock5.mlpackage"))
    functions = {f.name: f for f in spec.description.functions}
    assert sorted(functions) == ["forward", "prefill", "step_1", "step_16", "vjp"]
    for name in ("prefill", "step_1", "step_16"):
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in functions[name].state}
        assert states == {f"{kind}_cache_{layer}": [2, 2, 95, 64] for kind in ("key", "value") for layer in (0, 1)}
    assert not functions["vjp"].state and not functions["forward"].state
    params = sum(v.size for _, v in tree_flatten(load_flow(model).blocks[5].parameters()))
    weights = sum(p.stat().st_size for p in (shipped / "FlowBlock5.mlpackage").rglob("weight.bin"))
    assert 2 * params < weights < 1.2 * 2 * params, "float16, and one copy of the weights for all five functions"


# ---- float32: the official numbers --------------------------------------------------------------------


def test_text_encoder_matches_official(exact: EvaluatorBackend, fixtures_dir: Path) -> None:
    oracle = load(fixtures_dir / "t5" / "fixtures.safetensors")
    for i in range(len(oracle["short.input_ids"])):
        states = exact.encode_text(oracle["short.input_ids"][i : i + 1], oracle["short.attention_mask"][i : i + 1])
        assert max_abs(states, oracle["short.text_states"][i : i + 1]) <= TEXT_TOL
        assert np.all(states[0][oracle["short.attention_mask"][i] == 0] == 0.0)


@pytest.mark.parametrize("key,guidance", [("g0", 0.0), ("g2p5", 2.5)])
def test_sequential_sampling_matches_every_block(exact: EvaluatorBackend, flow, sf: Path, key: str, guidance: float) -> None:
    """Without guidance the deep block runs the conditional rows only, padded to the exported 2B rows."""
    inputs, ref = load(sf / "inputs.safetensors"), load(sf / "sample.safetensors")
    seq, _ = sample(exact.manifest, exact.block, inputs["noise"], inputs["y_cfg"] if guidance else inputs["y"], guidance)
    for i in range(7):
        assert max_abs(seq[i], ref[f"{key}.seq.{i}"]) < SAMPLE_TOL, f"{key}.seq.{i}"


def official_iterations(sf: Path, run: str) -> list[int]:
    return [r["iterations"] for r in json.loads((sf / "jacobi_trace.json").read_text())["runs"][run]]


@pytest.mark.parametrize("bs,key,guidance", [(16, "g2p5", 2.5), (4, "g0", 0.0)])
def test_jacobi_sampling_and_iteration_counts(exact: EvaluatorBackend, flow, sf: Path, bs: int, key: str, guidance: float) -> None:
    inputs, ref = load(sf / "inputs.safetensors"), load(sf / "jacobi.safetensors")
    text = inputs["y_cfg"] if guidance else inputs["y"]
    seq, counts = sample(exact.manifest, exact.block, inputs["noise"], text, guidance, Jacobi(bs, coupled=True))
    assert [n for block in counts for n in block] == official_iterations(sf, f"bs{bs}.{key}")
    for i in range(7):
        assert max_abs(seq[i], ref[f"bs{bs}.{key}.seq.{i}"]) < SAMPLE_TOL, f"bs{bs}.{key}.seq.{i}"


def test_padded_short_last_jacobi_chunk_matches_mlx(exact: EvaluatorBackend, flow, sf: Path) -> None:
    """Chunk 12 over 64 tokens ends with 4 tokens padded to 12 (though the export has a step_4): same
    iterations and sample as MLX's unpadded chunk."""
    inputs = load(sf / "inputs.safetensors")
    counts_mlx, sample_mlx = [], None
    for p in flow.iter_sample(mx.array(inputs["noise"]), mx.array(inputs["y_cfg"]), guidance=2.5, sampler=Jacobi(12)):
        if p.chunk is not None:
            counts_mlx.append((p.chunk.size, p.chunk.iterations))
        if p.output is not None:
            sample_mlx = np.array(p.output)
    exact.per_call_seconds.clear()
    seq, counts = sample(exact.manifest, exact.block, inputs["noise"], inputs["y_cfg"], 2.5, Jacobi(12))
    assert not any(label.endswith("step_4") for label in exact.per_call_seconds)
    assert [size for size, _ in counts_mlx][-1] == 4
    assert [n for block in counts for n in block] == [n for _, n in counts_mlx]
    assert max_abs(seq[-1], sample_mlx) < SAMPLE_TOL


@pytest.mark.parametrize("index", [5, 2])
def test_block_step_outputs_through_stateful_calls(exact: EvaluatorBackend, model: Path, sf: Path, index: int) -> None:
    """prefill, one token, a chunk of 4, a padded chunk (3 of 12), then the chunk of 4 rewritten, as MLX's cached steps."""
    flow = load_flow(model)
    block = flow.blocks[index]
    entry = exact.block_entry(index)
    text_length, rows = entry["text_length"], entry["rows"]
    cos, sin = flow._rope(8, 8, text_length)
    cache = block.make_cache(rows, entry["cache_length"])
    runner = exact.block(index)
    runner.reset()
    if block.has_text:
        text = load(sf / "inputs.safetensors")["y_cfg"]
        block.prefill(mx.array(text), cos, sin, cache)
        runner.prefill(text)
    tokens = np.random.default_rng(index).standard_normal((rows, 12, 4)).astype(np.float32)
    for offset, real, chunk in ((0, 1, 1), (1, 4, 4), (5, 3, 12), (1, 4, 4)):
        padded = np.zeros((rows, chunk, 4), np.float32)
        padded[:, :real] = tokens[:, :real]
        a, b = runner.step(padded, text_length + offset)
        a_mlx, b_mlx = block.step(mx.array(tokens[:, :real]), mx.array([text_length + offset]), cos, sin, cache)
        assert max_abs(a[:, :real], a_mlx) < STEP_TOL and max_abs(b[:, :real], b_mlx) < STEP_TOL, (offset, chunk)


@pytest.mark.parametrize("key", ["sample_g2p5", "x_noisy"])
def test_score_step_matches_official_denoise(exact: EvaluatorBackend, sf: Path, key: str) -> None:
    inputs, ref = load(sf / "inputs.safetensors"), load(sf / "denoise.safetensors")
    for row in range(2):
        denoised = exact.denoise(ref[f"{key}.in"][row : row + 1], inputs["y"][row : row + 1])
        assert max_abs(denoised, ref[f"{key}.out"][row : row + 1]) < DENOISE_TOL


def test_vae_decoder_matches_mlx(exact: EvaluatorBackend, model: Path, sf: Path) -> None:
    """At the export's size; tests/test_coreml_graphs.py checks the decoder against the official outputs."""
    latent = load(sf / "sample.safetensors")["g2p5.seq.6"][:1]
    expected = np.array(load_vae(model / "vae").decode(mx.array(latent)))
    assert max_abs(exact.decode(latent), expected) < VAE_TOL


def test_label_model_pixel_space(label: EvaluatorBackend, label_model: Path, sf: Path) -> None:
    backend = label
    ref = load(sf / "label_model" / "fixtures.safetensors")
    manifest = backend.manifest
    assert manifest["condition"]["kind"] == "labels" and manifest["condition"]["dim"] == 11
    assert manifest["condition"]["labels"][3] == "cat"
    assert manifest["vae"] is None and manifest["text_encoder"] is None and manifest["score_step"] is None
    assert manifest["image"] == {"height": 16, "width": 16, "channels": 3}
    assert manifest["latent"] == {"channels": 3, "height": 16, "width": 16, "patch_size": 2}
    assert [b["flipped"] for b in manifest["flow"]["blocks"]] == [True, False, True]
    for key, guidance in (("g0", 0.0), ("g2p5", 2.5)):
        seq, _ = sample(manifest, backend.block, ref["noise"], ref["y_cfg"], guidance)
        for i in range(4):
            assert max_abs(seq[i], ref[f"{key}.seq.{i}"]) < SAMPLE_TOL, f"{key}.seq.{i}"


# ---- float16 stateful: the shipped export, and the Mac check script up to prediction ---------------


def test_shipped_export_is_within_the_float16_budget(check_script, shipped: Path, model: Path, fixtures_dir: Path) -> None:
    check = check_script.prepare(model, shipped, fixtures_dir)
    rows = check_script.run_stages(check, EvaluatorBackend(shipped), "evaluator")
    assert [r.stage for r in rows] == ["text encoder", "flow sequential", "flow jacobi", "score step", "vae decoder"]
    for row in rows:
        assert row.vs_mlx <= FLOAT16_BUDGETS[row.stage], row
        assert row.vs_official is None or row.vs_official <= FLOAT16_BUDGETS[row.stage], row
        assert row.budget == FLOAT16_BUDGETS[row.stage] and row.calls > 0
    table = check_script.format_table(rows)
    assert "flow sequential" in table and "over budget" not in table


def test_check_script_stops_clearly_without_macos(check_script, shipped: Path, capsys) -> None:
    assert check_script.main(["--export", str(shipped)]) == 1
    assert "Core ML prediction needs macOS 15+" in capsys.readouterr().err
    with pytest.raises(CoreMLUnavailable, match="macOS 15"):
        CoreMLBackend(shipped, "CPU_ONLY")
