"""Samplers as values and Jacobi convergence per image, on the tiny official fixture model.

Per-image Jacobi must make an image independent of its batch: sampled with others it equals
the same seed sampled alone up to float reassociation in batched matmuls (BATCH_TOL, 1e-5:
the fixture README's float32 noise floor for sampling is ~1e-6, the smallest porting-bug
signal 4.2e-5). The official batch-coupled rule stays available and differs measurably.
The Jacobi options (a deep-block threshold, a carried first iterate, named presets) are off by
default and never change what Jacobi converges to, only how many passes it takes.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.samplers import Jacobi, Sequential, default_sampler
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
    assert main(["generate", "red circle", "--model", demo, "--jacobi", "--attn-temp", "0.9", "--output", str(tmp_path / "x.png")]) == 1
    assert "--sequential" in capsys.readouterr().err
    for name, flags in (("t.png", ["--sequential"]), ("implied.png", [])):
        assert main(["generate", "red circle", "--model", demo, *flags, "--attn-temp", "0.9", "--seed", "0",
                     "--output", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as image:
            assert image.info["sampler"] == "sequential attn_temp=0.9"


def test_jacobi_options_are_checked_naming_the_option():
    from mlx_starflow.errors import InputError

    for bad in (-1e-3, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(InputError, match="--jacobi-deep-threshold"):
            Jacobi(deep_threshold=bad)
    for bad in ("zeros", "", None):
        with pytest.raises(InputError, match="--jacobi-init"):
            Jacobi(init=bad)
    with pytest.raises(InputError, match="--jacobi-preset"):
        Jacobi.preset("fastest")


def test_defaults_are_the_official_settings_and_options_show_only_when_set():
    from mlx_starflow.samplers import JACOBI_PRESETS

    assert Jacobi() == JACOBI_PRESETS["official"] == Jacobi(16, 1e-3, 32, False, None, "noise")
    assert Jacobi().describe() == "jacobi block=16 threshold=0.001 max_iter=32"
    assert (Jacobi(64, 1e-2, deep_threshold=1e-3, init="carry", coupled=True).describe()
            == "jacobi block=64 threshold=0.01 max_iter=32 deep_threshold=0.001 init=carry coupled")
    assert Jacobi(deep_threshold=0).describe().endswith("deep_threshold=0")


def chunk_iterations(flow, noise, y, guidance, sampler) -> dict[int, list[int]]:
    """Each block's Jacobi iterations per chunk, keyed by block index."""
    counts: dict[int, list[int]] = {}
    for p in flow.iter_sample(noise, y, guidance, sampler):
        if p.chunk is not None:
            counts.setdefault(p.block, []).append(p.chunk.iterations)
    return counts


def test_deep_threshold_applies_to_the_text_block_only(flow, batch):
    noise, cond, uncond = batch
    y = guided_rows(cond[:2], uncond)
    deep = len(flow.blocks) - 1
    assert flow.blocks[deep].has_text and not any(b.has_text for b in flow.blocks[:deep])
    counts = chunk_iterations(flow, noise[:2], y, 2.5, Jacobi(16, threshold=0.0, max_iter=6, deep_threshold=1e9))
    assert counts.pop(deep) == [1] * 4, "a huge deep threshold stops every deep chunk after one pass"
    assert all(c == [6] * 4 for c in counts.values()), "threshold 0 runs every shallow chunk to max_iter"
    same = Jacobi(16, 1e-3, deep_threshold=1e-3)
    assert max_diff(flow.sample(noise[:2], y, 2.5, same), flow.sample(noise[:2], y, 2.5, Jacobi(16, 1e-3))) == 0


def test_carried_first_iterate_converges_to_the_sequential_sample(flow, batch):
    """Jacobi with threshold 0 and more passes than tokens per chunk is exact whatever it starts from."""
    noise, cond, uncond = batch
    y = guided_rows(cond, uncond)
    carry = flow.sample(noise, y, 2.5, Jacobi(4, threshold=0.0, max_iter=5, init="carry"))
    assert max_diff(carry, flow.sample(noise, y, 2.5, Sequential())) < 2e-4


def test_carried_first_iterate_starts_nearer_and_keeps_images_independent(flow, batch):
    """The carried start changes the first pass of every chunk after a block's first (so the
    option is live) and takes fewer passes in all on the fixture model, and per-image
    convergence still makes an image independent of its batch."""
    noise, cond, uncond = batch
    y = guided_rows(cond, uncond)
    carry, plain = Jacobi(8, init="carry"), Jacobi(8)

    def first_changes(sampler) -> list[float]:
        return [p.chunk.changes[0] for p in flow.iter_sample(noise, y, 2.5, sampler) if p.chunk is not None and p.chunk.start > 0]

    assert all(abs(a - b) > 1e-6 for a, b in zip(first_changes(carry), first_changes(plain)))
    total = lambda sampler: sum(sum(c) for c in chunk_iterations(flow, noise, y, 2.5, sampler).values())
    assert total(carry) < total(plain)
    assert max_diff(flow.sample(noise, y, 2.5, carry), sample_each(flow, noise, cond, uncond, carry)) < BATCH_TOL


def test_cli_presets_and_single_flags_override_them(tmp_path, capsys):
    from dataclasses import replace

    from PIL import Image

    from mlx_starflow.app.cli import main
    from mlx_starflow.app.commands.generate import JacobiOverrides, make_sampler
    from mlx_starflow.errors import InputError
    from mlx_starflow.samplers import JACOBI_PRESETS

    assert make_sampler(True) == Jacobi()
    assert make_sampler(True, "fast") == JACOBI_PRESETS["fast"]
    assert (make_sampler(True, "fast", JacobiOverrides(block_size=8, init="noise", coupled=True))
            == replace(JACOBI_PRESETS["fast"], block_size=8, init="noise", coupled=True))
    assert make_sampler(True, "official", JacobiOverrides(deep_threshold=1e-2)).describe().endswith("deep_threshold=0.01")
    assert make_sampler(False, "fast") == Sequential()
    assert make_sampler(None) == default_sampler()
    assert make_sampler(None, "fast") == JACOBI_PRESETS["fast"]
    assert make_sampler(None, overrides=JacobiOverrides(block_size=8)) == Jacobi(block_size=8)
    assert make_sampler(None, overrides=JacobiOverrides(coupled=True)) == Jacobi(coupled=True)
    assert make_sampler(None, attn_temp=0.9) == Sequential(0.9)
    with pytest.raises(InputError, match="--attn-temp"):
        make_sampler(None, "fast", attn_temp=0.9)

    demo = str(Path(__file__).resolve().parents[1] / "weights" / "demo")
    assert main(["generate", "red circle", "--model", demo, "--jacobi-preset", "fastest", "--output", str(tmp_path / "x.png")]) == 1
    assert "--jacobi-preset" in capsys.readouterr().err
    out = tmp_path / "fast.png"
    assert main(["generate", "red circle", "--model", demo, "--seed", "0", "--jacobi-preset", "fast", "--jacobi-max-iter", "20",
                 "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.info["sampler"] == replace(JACOBI_PRESETS["fast"], max_iter=20).describe()


def test_the_default_sampler_follows_the_backend():
    """Jacobi where a pass reads the weights once (a GPU), sequential on the CPU backend, where
    a Jacobi pass is bound by arithmetic (README, Benchmarks)."""
    from mlx_starflow.samplers import JACOBI_PRESETS

    assert default_sampler(mx.Device(mx.DeviceType.cpu)) == Sequential()
    assert default_sampler(mx.Device(mx.DeviceType.gpu)) == JACOBI_PRESETS["official"] == Jacobi()
