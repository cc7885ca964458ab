"""The MLX flow against the official implementation (`../shared/fixtures/starflow`).

Tolerances are the fixture README's float32 table (§7): forward z/outputs 1e-4, log-dets 1e-5,
loss 1e-5, every sampled sequence 2e-4, round trip 1e-4, denoise 1e-4; Jacobi must also take the
official number of iterations in every chunk. The smallest porting-bug signals they must catch
are 2.2e-4 (tanh-GELU) on z and 4.2e-5 on log-dets.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest

from mlx_starflow.convert.model import convert_model
from mlx_starflow import load_flow
from mlx_starflow.samplers import Jacobi

Z_TOL, LOGDET_TOL, LOSS_TOL, SAMPLE_TOL, ROUNDTRIP_TOL, DENOISE_TOL = 1e-4, 1e-5, 1e-5, 2e-4, 1e-4, 1e-4


def max_diff(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.fixture(scope="module")
def sf(fixtures_dir):
    return fixtures_dir / "starflow"


@pytest.fixture(scope="module")
def flow(sf, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "tiny"
    convert_model(sf / "model.pth", sf / "config.yaml", out)
    return load_flow(out)


@pytest.fixture(scope="module")
def label_flow(sf, tmp_path_factory):
    out = tmp_path_factory.mktemp("label") / "label"
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", out)
    return load_flow(out)


@pytest.fixture(scope="module")
def inputs(sf):
    return mx.load(str(sf / "inputs.safetensors"))


def test_converted_config_matches_the_official_model(flow):
    c = flow.config
    assert (c.latent_size, c.txt_size, c.txt_dim, c.layers_per_block) == (8, 16, 32, (1, 1, 1, 1, 1, 2))
    assert [b.flipped for b in flow.blocks] == [True, False, True, False, True, False]
    assert [b.has_text for b in flow.blocks] == [False] * 5 + [True]


def test_forward_matches_every_block_output_and_logdet(flow, sf, inputs):
    ref = mx.load(str(sf / "forward.safetensors"))
    z, logdets, outputs = flow.forward(inputs["x_noisy"], inputs["y"], return_sequence=True)
    assert max_diff(z, ref["z"]) < Z_TOL
    for k in range(7):
        assert max_diff(outputs[k], ref[f"outputs.{k}"]) < Z_TOL, f"outputs.{k}"
    for k in range(6):
        assert max_diff(logdets[k], ref[f"logdets.{k}"]) < LOGDET_TOL, f"logdets.{k}"


def test_loss_and_bits_per_dim(flow, sf, inputs):
    ref = mx.load(str(sf / "forward.safetensors"))
    nll = flow.nll(inputs["x_noisy"], inputs["y"])
    assert abs(mx.mean(nll).item() - ref["loss"].item()) < LOSS_TOL
    bpd = flow.bits_per_dim(inputs["x_noisy"], inputs["y"])
    assert bpd.shape == (2,)
    from_fixture = (ref["loss"].item() + 0.5 * math.log(2 * math.pi)) / math.log(2)
    assert abs(mx.mean(bpd).item() - from_fixture) < LOSS_TOL


def test_guided_forward(flow, sf, inputs):
    ref = mx.load(str(sf / "forward.safetensors"))
    x2 = mx.concatenate([inputs["x_noisy"], inputs["x_noisy"]])
    z, logdets = flow.forward(x2, inputs["y_cfg"], guidance=2.5)
    assert max_diff(z, ref["guided.z"]) < Z_TOL
    assert max_diff(logdets[5], ref["guided.logdets.5"]) < LOGDET_TOL
    z_half, _ = flow.forward(inputs["x_noisy"], inputs["y_cfg"], guidance=2.5)
    assert max_diff(z_half, ref["guided.z"]) < Z_TOL


@pytest.mark.parametrize("key,guidance", [("g0", 0.0), ("g2p5", 2.5)])
def test_sequential_sampling_every_block(flow, sf, inputs, key, guidance):
    ref = mx.load(str(sf / "sample.safetensors"))
    y = inputs["y"] if guidance == 0 else inputs["y_cfg"]
    seq = flow.sample(inputs["noise"], y, guidance=guidance, return_sequence=True)
    assert len(seq) == 7
    for i in range(7):
        assert max_diff(seq[i], ref[f"{key}.seq.{i}"]) < SAMPLE_TOL, f"{key}.seq.{i}"


def test_compiled_and_eager_steps_agree(flow, inputs):
    eager = flow.sample(inputs["noise"], inputs["y_cfg"], guidance=2.5, compiled=False)
    compiled = flow.sample(inputs["noise"], inputs["y_cfg"], guidance=2.5, compiled=True)
    assert max_diff(eager, compiled) < 1e-5


def jacobi_run(flow, noise, y, guidance, block_size, threshold=1e-3, max_iter=32, coupled=True):
    """The official rule (coupled) by default: the fixtures' iteration counts are batch-wide."""
    outputs, chunks = [noise], []
    sampler = Jacobi(block_size, threshold, max_iter, coupled)
    for p in flow.iter_sample(noise, y, guidance=guidance, sampler=sampler):
        if p.chunk is not None:
            chunks.append({"block": p.block, "start": p.chunk.start, "chunk": p.chunk.size, "iterations": p.chunk.iterations})
        if p.output is not None:
            outputs.append(p.output)
    return outputs, chunks


def official_chunks(sf, run: str) -> list[dict]:
    runs = json.loads((sf / "jacobi_trace.json").read_text())["runs"][run]
    return [{k: r[k] for k in ("block", "start", "chunk", "iterations")} for r in runs]


@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("key,guidance", [("g0", 0.0), ("g2p5", 2.5)])
def test_jacobi_sampling_and_iteration_counts(flow, sf, inputs, bs, key, guidance):
    ref = mx.load(str(sf / "jacobi.safetensors"))
    y = inputs["y"] if guidance == 0 else inputs["y_cfg"]
    seq, chunks = jacobi_run(flow, inputs["noise"], y, guidance, bs)
    assert chunks == official_chunks(sf, f"bs{bs}.{key}")
    for i in range(7):
        assert max_diff(seq[i], ref[f"bs{bs}.{key}.seq.{i}"]) < SAMPLE_TOL, f"bs{bs}.{key}.seq.{i}"


def test_jacobi_run_to_convergence_is_sequential_sampling(flow, sf, inputs):
    """A causal chunk of n tokens is exact after n Jacobi passes: threshold 0 reproduces the
    token-by-token sample (official: ≤ 1e-5)."""
    ref = mx.load(str(sf / "sample.safetensors"))
    seq, chunks = jacobi_run(flow, inputs["noise"], inputs["y_cfg"], 2.5, block_size=4, threshold=0.0, max_iter=5)
    assert all(c["iterations"] == 5 for c in chunks)
    assert max_diff(seq[6], ref["g2p5.seq.6"]) < SAMPLE_TOL


def test_nonsquare_latent(flow, sf, inputs):
    ref = mx.load(str(sf / "nonsquare.safetensors"))
    z, logdets, outputs = flow.forward(inputs["x_ns_noisy"], inputs["y"], return_sequence=True)
    assert max_diff(z, ref["z"]) < Z_TOL
    for k in range(7):
        assert max_diff(outputs[k], ref[f"outputs.{k}"]) < Z_TOL
    for k in range(6):
        assert max_diff(logdets[k], ref[f"logdets.{k}"]) < LOGDET_TOL
    assert abs(mx.mean(flow.nll(inputs["x_ns_noisy"], inputs["y"])).item() - ref["loss"].item()) < LOSS_TOL
    for key, guidance, y in (("g0", 0.0, inputs["y"]), ("g2p5", 2.5, inputs["y_cfg"])):
        seq = flow.sample(inputs["noise_ns"], y, guidance=guidance, return_sequence=True)
        for i in range(7):
            assert max_diff(seq[i], ref[f"{key}.seq.{i}"]) < SAMPLE_TOL, f"{key}.seq.{i}"
    seq, chunks = jacobi_run(flow, inputs["noise_ns"], inputs["y_cfg"], 2.5, 16)
    assert chunks == official_chunks(sf, "nonsquare.bs16.g2p5")
    assert max_diff(seq[-1], ref["jacobi_bs16.g2p5.sample"]) < SAMPLE_TOL
    z_back, _ = flow.forward(ref["g0.seq.6"], inputs["y"])
    assert max_diff(z_back, ref["roundtrip_forward_z"]) < ROUNDTRIP_TOL


def test_forward_inverts_sampling(flow, sf, inputs):
    ref = mx.load(str(sf / "roundtrip.safetensors"))
    sample = flow.sample(inputs["noise"], inputs["y"])
    z, _ = flow.forward(sample, inputs["y"])
    assert max_diff(z, inputs["noise"]) < ROUNDTRIP_TOL
    z_ref_sample, _ = flow.forward(ref["sample"], inputs["y"])
    assert max_diff(z_ref_sample, ref["forward_z"]) < ROUNDTRIP_TOL


@pytest.mark.parametrize("key", ["sample_g2p5", "x_noisy"])
def test_score_step_denoise(flow, sf, inputs, key):
    ref = mx.load(str(sf / "denoise.safetensors"))
    out = flow.denoise(ref[f"{key}.in"], inputs["y"], noise_std=0.3)
    assert max_diff(out, ref[f"{key}.out"]) < DENOISE_TOL
    out_cfg_rows = flow.denoise(ref[f"{key}.in"], inputs["y_cfg"])
    assert max_diff(out_cfg_rows, ref[f"{key}.out"]) < DENOISE_TOL


def test_label_model(label_flow, sf):
    ref = mx.load(str(sf / "label_model" / "fixtures.safetensors"))
    assert [b.flipped for b in label_flow.blocks] == [True, False, True]
    z, logdets, outputs = label_flow.forward(ref["x_noisy"], ref["y"], return_sequence=True)
    assert max_diff(z, ref["fwd.z"]) < Z_TOL
    for k in range(4):
        assert max_diff(outputs[k], ref[f"fwd.outputs.{k}"]) < Z_TOL
    for k in range(3):
        assert max_diff(logdets[k], ref[f"fwd.logdets.{k}"]) < LOGDET_TOL
    assert abs(mx.mean(label_flow.nll(ref["x_noisy"], ref["y"])).item() - ref["fwd.loss"].item()) < LOSS_TOL
    for key, guidance, y in (("g0", 0.0, ref["y"]), ("g2p5", 2.5, ref["y_cfg"])):
        seq = label_flow.sample(ref["noise"], y, guidance=guidance, return_sequence=True)
        for i in range(4):
            assert max_diff(seq[i], ref[f"{key}.seq.{i}"]) < SAMPLE_TOL, f"{key}.seq.{i}"
    z_back, _ = label_flow.forward(ref["g0.seq.3"], ref["y"])
    assert max_diff(z_back, ref["roundtrip_forward_z"]) < ROUNDTRIP_TOL


def test_numpy_inputs_are_accepted(flow, inputs):
    import numpy as np

    z_np, _ = flow.forward(np.array(inputs["x_noisy"]), np.array(inputs["y"]))
    z_mx, _ = flow.forward(inputs["x_noisy"], inputs["y"])
    assert isinstance(z_np, mx.array) and max_diff(z_np, z_mx) == 0


def test_bad_shapes_are_clear_errors(flow, inputs):
    with pytest.raises(ValueError, match="noise must be"):
        flow.sample(mx.zeros((1, 3, 8, 8)), inputs["y"][:1])
    with pytest.raises(ValueError, match="y must be"):
        flow.sample(inputs["noise"], inputs["y"], guidance=2.5)
    with pytest.raises(ValueError, match="pass y"):
        flow.forward(inputs["x_noisy"])


# ---- official numerics: float32 head, bfloat16 RoPE option -------------------------------------


def half_precision_head(block, h):
    """The head as it was before: final norm and output projection in the weights' dtype."""
    from mlx_starflow.sampling import soft_clip

    if "final_norm" in block:
        h = block.final_norm(h)
    return mx.split(soft_clip(block.proj_out(h).astype(mx.float32), block.soft_clip_bound), 2, axis=-1)


def mean_sample_error(flow, inputs, ref) -> float:
    errors = []
    for key, guidance, y in (("g0", 0.0, inputs["y"]), ("g2p5", 2.5, inputs["y_cfg"])):
        sample = flow.sample(inputs["noise"], y, guidance=guidance)
        errors.append(mx.mean(mx.abs(sample - ref[f"{key}.seq.6"])).item())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("src,dtype", [("model_fp16.pth", "float16"), ("model_bf16.pth", "bfloat16")])
def test_float32_head_brings_half_precision_samples_closer(sf, inputs, tmp_path, monkeypatch, src, dtype):
    """Official: float32 autocast around the final norm and `proj_out`. Measured mean |error| vs
    the float32 samples (g0 and g2p5 averaged): fp16 1.25e-3 → 0.95e-3, bf16 9.6e-3 → 7.7e-3."""
    from mlx_starflow.flow_block import FlowBlock

    convert_model(sf / src, sf / "config.yaml", tmp_path / dtype, dtype=dtype)
    flow = load_flow(tmp_path / dtype)
    assert flow.blocks[5].proj_out.weight.dtype == getattr(mx, dtype)
    ref = mx.load(str(sf / "sample.safetensors"))
    ours = mean_sample_error(flow, inputs, ref)
    monkeypatch.setattr(FlowBlock, "head", half_precision_head)
    before = mean_sample_error(flow, inputs, ref)
    assert ours < 0.9 * before, (ours, before)


def test_bfloat16_rope_rounds_the_angles_in_both_directions(flow, sf, inputs, tmp_path):
    """The official GPU sampler's bf16 RoPE (fixtures README §8): angles rounded to bfloat16
    (≤ 0.0073 rad on the tiny 8×8 table, 0.030 rad on the 3B one) and the same tables for
    forward and sampling, so the flow still inverts itself exactly."""
    import numpy as np

    from mlx_starflow.rope import rope_angles
    from mlx_starflow.token_layout import TokenLayout

    convert_model(sf / "model.pth", sf / "config.yaml", tmp_path / "m")
    rounded = load_flow(tmp_path / "m", bfloat16_rope=True)
    layout = TokenLayout(4, 8, 8, 1)
    angles = rope_angles(layout.positions(16, 8), 64, 10000.0, True)
    cos, _ = rounded.rope(layout, 16)
    expected = np.cos(np.array(mx.array(angles).astype(mx.bfloat16).astype(mx.float32)))
    assert np.array_equal(np.array(cos), expected) and not np.allclose(expected, np.cos(angles), atol=1e-4, rtol=0)
    sample = rounded.sample(inputs["noise"], inputs["y"])
    assert max_diff(sample, flow.sample(inputs["noise"], inputs["y"])) > 10 * SAMPLE_TOL
    z, _ = rounded.forward(sample, inputs["y"])
    assert max_diff(z, inputs["noise"]) < ROUNDTRIP_TOL


def test_float32_compute_of_bfloat16_weights_is_closer_to_float32(sf, inputs, tmp_path):
    """Same bf16-rounded weights, float32 activations: measured mean |error| 7.7e-3 → 4.1e-3."""
    convert_model(sf / "model_bf16.pth", sf / "config.yaml", tmp_path / "bf16", dtype="bfloat16")
    ref = mx.load(str(sf / "sample.safetensors"))
    half = load_flow(tmp_path / "bf16")
    full = load_flow(tmp_path / "bf16", float32_compute=True)
    assert half.blocks[5].compute_dtype == mx.bfloat16 and full.blocks[5].compute_dtype == mx.float32
    weight = half.blocks[5].layers[0].attention.qkv.weight
    assert mx.array_equal(full.blocks[5].layers[0].attention.qkv.weight, weight.astype(mx.float32)).item()
    assert mean_sample_error(full, inputs, ref) < 0.7 * mean_sample_error(half, inputs, ref)
