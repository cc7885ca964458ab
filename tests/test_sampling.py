"""Samplers as values and Jacobi convergence per image, on the tiny official fixture model.

Per-image Jacobi must make an image independent of its batch: sampled with others it equals
the same seed sampled alone up to float reassociation in batched matmuls (BATCH_TOL, 1e-5:
the fixture README's float32 noise floor for sampling is ~1e-6, the smallest porting-bug
signal 4.2e-5). The official batch-coupled rule stays available and differs measurably.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.samplers import Jacobi, Sequential
from test_flow import flow, max_diff, sf  # noqa: F401  (fixtures: the converted tiny official model)

BATCH_TOL = 1e-5


@pytest.fixture(scope="module")
def batch(sf):
    """Four images: the fixture's two noise rows and conditions, and two more seeded rows."""
    inputs = mx.load(str(sf / "inputs.safetensors"))
    rng = np.random.RandomState(7)
    noise = mx.concatenate([inputs["noise"], mx.array(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))])
    cond, uncond = mx.split(inputs["y_cfg"], 2, axis=0)
    cond = mx.concatenate([cond, cond[::-1]])
    return noise, cond, uncond[:1]


def guided_rows(cond: mx.array, uncond: mx.array) -> mx.array:
    return mx.concatenate([cond, mx.broadcast_to(uncond, cond.shape)])


def sample_each(flow, noise, cond, uncond, sampler) -> mx.array:
    return mx.concatenate([flow.sample(noise[i : i + 1], guided_rows(cond[i : i + 1], uncond), 2.5, sampler)
                           for i in range(noise.shape[0])])


@pytest.mark.parametrize("block_size", [4, 16])
def test_per_image_jacobi_does_not_depend_on_the_batch(flow, batch, block_size):
    noise, cond, uncond = batch
    sampler = Jacobi(block_size)
    together = flow.sample(noise, guided_rows(cond, uncond), 2.5, sampler)
    alone = sample_each(flow, noise, cond, uncond, sampler)
    assert max_diff(together, alone) < BATCH_TOL
    coupled = Jacobi(block_size, coupled=True)
    assert max_diff(flow.sample(noise, guided_rows(cond, uncond), 2.5, coupled), sample_each(flow, noise, cond, uncond, coupled)) > 10 * BATCH_TOL


def test_per_image_jacobi_unguided_and_in_any_order(flow, batch):
    noise, cond, _ = batch
    sampler = Jacobi(8)
    together = flow.sample(noise, cond, 0.0, sampler)
    order = mx.array([2, 0, 3, 1])
    shuffled = flow.sample(noise[order], cond[order], 0.0, sampler)
    assert max_diff(together[order], shuffled) < BATCH_TOL
    assert max_diff(together[1:2], flow.sample(noise[1:2], cond[1:2], 0.0, sampler)) < BATCH_TOL


def test_one_image_gives_the_official_rule_bit_for_bit(flow, batch):
    """Batch 1: per-image and coupled decide alike, so today's single images keep their bytes."""
    noise, cond, uncond = batch
    y = guided_rows(cond[:1], uncond)
    per_image = flow.sample(noise[:1], y, 2.5, Jacobi(4))
    coupled = flow.sample(noise[:1], y, 2.5, Jacobi(4, coupled=True))
    assert mx.array_equal(per_image, coupled).item()


def test_per_image_iterations_are_the_slowest_image(flow, batch):
    """A chunk runs until its last image converges: as many passes as that image alone needs."""
    noise, cond, uncond = batch

    def iterations(rows) -> list[int]:
        return [p.chunk.iterations for p in flow.iter_sample(noise[rows], guided_rows(cond[rows], uncond), 2.5, Jacobi(16))
                if p.chunk is not None]

    alone = [iterations(mx.array([i])) for i in range(4)]
    assert iterations(mx.arange(4)) == [max(counts) for counts in zip(*alone)]
    assert any(len(set(counts)) > 1 for counts in zip(*alone)), "the images should converge at different passes"


def test_threshold_zero_per_image_is_sequential_sampling(flow, batch):
    noise, cond, uncond = batch
    y = guided_rows(cond, uncond)
    jacobi = flow.sample(noise, y, 2.5, Jacobi(4, threshold=0.0, max_iter=5))
    assert max_diff(jacobi, flow.sample(noise, y, 2.5, Sequential())) < 2e-4


def test_attention_temperature_is_the_official_formula(flow, sf, monkeypatch):
    """Official transformer_flow.py `Attention.apply_attention` (lines 245-246): scale =
    d^-½ / attn_temp, passed by `MetaBlock.reverse` (lines 658-702) to the text prefill
    (`reverse_step_condition`) and every token step. A sequential sample at temperature T is
    then the exact inverse of the likelihood direction with every attention at temperature T:
    checked here through the whole-sequence attention, a separate code path from the cache."""
    from mlx_starflow.layers import Attention
    from mlx_starflow.rope import apply_rope

    inputs = mx.load(str(sf / "inputs.safetensors"))
    temperature = 0.7
    sample = flow.sample(inputs["noise"], inputs["y"], 0.0, Sequential(attn_temp=temperature))
    assert max_diff(sample, flow.sample(inputs["noise"], inputs["y"], 0.0, Sequential())) > 1e-2

    def tempered(self, x, cos, sin):
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = self.head_dim**-0.5 / temperature
        return self._merge(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"))

    monkeypatch.setattr(Attention, "__call__", tempered)
    z, _ = flow.forward(sample, inputs["y"])
    assert max_diff(z, inputs["noise"]) < 1e-4


def test_samplers_refuse_a_temperature_that_is_not_a_positive_number():
    from mlx_starflow.errors import InputError

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="--attn-temp"):
            Sequential(attn_temp=bad)
    assert Sequential(attn_temp=0.9).describe() == "sequential attn_temp=0.9"
    assert Jacobi().attn_temp == 1.0


def test_denoise_step_size_is_the_official_formula(flow, sf):
    """Official utils/inference.py `self_denoise` (lines 195-210): lr ← σ²·lr, x ← x − lr·∇(loss·numel).
    So the step with lr is lr times the step with lr = 1 (which the fixture checks to 1e-4)."""
    inputs = mx.load(str(sf / "inputs.safetensors"))
    x = inputs["x_noisy"]
    one = flow.denoise(x, inputs["y"], noise_std=0.3)
    for lr in (0.5, 2.0):
        scaled = flow.denoise(x, inputs["y"], noise_std=0.3, lr=lr)
        assert max_diff(scaled - x, lr * (one - x)) < 1e-5
    assert max_diff(one, x) > 1e-2


def test_cli_builds_the_sampler_from_its_flags(tmp_path, capsys):
    from PIL import Image

    from mlx_starflow.app.cli import main

    demo = str(Path(__file__).resolve().parents[1] / "weights" / "demo")
    out = tmp_path / "coupled.png"
    assert main(["generate", "red circle", "--model", demo, "--seed", "0", "--jacobi-coupled", "--denoise-lr", "0.5",
                 "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.info["sampler"] == "jacobi block=16 threshold=0.001 max_iter=32 coupled"
        assert (image.info["denoise"], image.info["denoise_lr"]) == ("score", "0.5")
    capsys.readouterr()
    assert main(["generate", "red circle", "--model", demo, "--attn-temp", "0.9", "--output", str(tmp_path / "x.png")]) == 1
    assert "--sequential" in capsys.readouterr().err
    assert main(["generate", "red circle", "--model", demo, "--sequential", "--attn-temp", "0.9", "--seed", "0",
                 "--output", str(tmp_path / "t.png")]) == 0
    with Image.open(tmp_path / "t.png") as image:
        assert image.info["sampler"] == "sequential attn_temp=0.9"
