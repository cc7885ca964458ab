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


def jacobi_run(flow, noise, y, guidance, block_size, threshold=1e-3, max_iter=32):
    outputs, chunks = [noise], []
    for p in flow.iter_sample(noise, y, guidance=guidance, jacobi=True, jacobi_block_size=block_size,
                              jacobi_threshold=threshold, jacobi_max_iter=max_iter):
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
