"""Linears arranged for the CPU backend compute what they computed before, under the same names,
and a step that attends to the filled part of the cache equals one over the whole cache.

The fixture tests (test_flow.py, test_convert_flow.py) load models through `load_flow`, so the
arranged layout is also checked against the official outputs there; these tests pin the
mechanisms themselves, on matrices large enough to be split.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_starflow import backend_compute
from mlx_starflow.backend_compute import MIN_SPLIT_WEIGHTS, SplitLinear, SplitQuantizedLinear, arrange_for_backend
from mlx_starflow.block_runner import MLXBlockRunner
from mlx_starflow.config import FlowConfig
from mlx_starflow.flow import load_flow
from mlx_starflow.model_io import read_parameters, save_weights, write_manifest
from mlx_starflow.rope import rope_tables
from mlx_starflow.token_layout import TokenLayout

from benchmarks.models import scaled_config, seeded_flow

CPU = mx.Device(mx.DeviceType.cpu)
GPU = mx.Device(mx.DeviceType.gpu)
SIDE = 1536
assert SIDE * SIDE >= MIN_SPLIT_WEIGHTS
"""A square linear at the split threshold (a multiple of the quantisation group)."""


def linear(dtype: mx.Dtype = mx.float32, bits: int | None = None, side: int = SIDE) -> nn.Module:
    layer = nn.Linear(side, side)
    layer.update({"weight": mx.random.normal((side, side), key=mx.random.key(1)).astype(dtype) * side**-0.5,
                  "bias": mx.random.normal((side,), key=mx.random.key(2)).astype(dtype)})
    if bits:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits)
    mx.eval(layer.parameters())
    return layer


def inputs(side: int = SIDE, dtype: mx.Dtype = mx.float32) -> mx.array:
    return mx.random.normal((2, 3, side), key=mx.random.key(3)).astype(dtype)


@pytest.fixture
def blas(monkeypatch):
    """Sets whether the (Linux) BLAS counts as multi-threaded, whatever this machine has."""
    monkeypatch.setattr(backend_compute.platform, "system", lambda: "Linux")
    return lambda threaded: monkeypatch.setattr(backend_compute, "threaded_blas", lambda: threaded)


def row_major(weight: mx.array) -> bool:
    return bool(np.asarray(weight.view(mx.uint16) if weight.dtype == mx.bfloat16 else weight).flags["C_CONTIGUOUS"])


def test_the_threaded_blas_is_the_one_in_this_process():
    preloaded = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    expected = platform.system() == "Linux" and any(
        Path(library).name.startswith(backend_compute.THREADED_BLAS_PREFIXES) for library in preloaded)
    assert backend_compute.threaded_blas() == expected


def test_float32_weights_move_to_input_major_storage_with_the_same_values(blas):
    blas(threaded=True)
    layer = linear()
    before_weight, before_out = np.array(layer.weight), layer(inputs())
    names = [name for name, _ in tree_flatten(layer.parameters())]
    assert row_major(layer.weight)

    counts = arrange_for_backend(layer, device=CPU)

    assert counts == {"input_major": 1, "split": 0}
    assert not row_major(layer.weight) and layer.weight.shape == (SIDE, SIDE)
    np.testing.assert_array_equal(np.array(layer.weight), before_weight)
    assert [name for name, _ in tree_flatten(layer.parameters())] == names
    np.testing.assert_allclose(np.array(layer(inputs())), np.array(before_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, bits", [(mx.bfloat16, None), (mx.float16, None), (mx.float32, 4), (mx.float32, 8),
                                         (mx.float32, None)])
def test_single_threaded_products_are_split_bit_identically(dtype, bits, blas):
    """Float32 is split only where the BLAS is single-threaded (else it moves, above)."""
    blas(threaded=False)
    layer = linear(dtype, bits)
    x = inputs(dtype=dtype)
    before = layer(x)
    parameters = dict(tree_flatten(layer.parameters()))

    counts = arrange_for_backend(layer, device=CPU)

    assert counts["split"] == (1 if backend_compute.split_count(CPU) > 1 else 0)
    if counts["split"]:
        assert isinstance(layer, SplitQuantizedLinear if bits else SplitLinear)
    after = dict(tree_flatten(layer.parameters()))
    assert after.keys() == parameters.keys() and all(after[k] is parameters[k] for k in after)
    assert mx.array_equal(layer(x), before).item()
    assert mx.array_equal(mx.compile(layer)(x), before).item()


def test_float32_on_macos_is_left_to_accelerate(blas, monkeypatch):
    blas(threaded=True)
    monkeypatch.setattr(backend_compute.platform, "system", lambda: "Darwin")
    layer = linear()
    assert arrange_for_backend(layer, device=CPU) == {"input_major": 0, "split": 0}
    assert type(layer) is nn.Linear and row_major(layer.weight)


def test_split_covers_every_output_row_once(monkeypatch):
    monkeypatch.setattr(backend_compute, "split_count", lambda device=None: 3)
    layer = linear(mx.bfloat16, side=SIDE + 1)
    x = inputs(SIDE + 1, mx.bfloat16)
    before = layer(x)
    arrange_for_backend(layer, device=CPU)
    assert layer.streams == 3
    assert mx.array_equal(layer(x), before).item()


def test_small_linears_and_gpus_are_left_alone(blas):
    blas(threaded=True)
    small = linear(mx.bfloat16, side=256)
    assert arrange_for_backend(small, device=CPU) == {"input_major": 0, "split": 0}
    assert type(small) is nn.Linear
    for dtype, bits in ((mx.float32, None), (mx.bfloat16, None), (mx.float32, 4)):
        layer = linear(dtype, bits)
        assert arrange_for_backend(layer, device=GPU) == {"input_major": 0, "split": 0}
        assert type(layer) in (nn.Linear, nn.QuantizedLinear)
        assert row_major(layer.weight)


@pytest.mark.parametrize("chunk", [1, 5])
def test_attending_to_the_filled_cache_equals_the_whole_cache(chunk):
    """Steps at positions on both sides of bucket boundaries: the same (scale, shift) whether a
    step reads the whole cache or only its filled part rounded up to 8 positions."""
    config = scaled_config(64, latent=8, text_length=12, text_dim=32)
    flow = seeded_flow(config)
    block = flow.blocks[-1]
    layout = TokenLayout(config.token_channels, 8, 8, 1)
    prefix = config.txt_size
    cos, sin = rope_tables(layout, prefix, config.pt_seq_len, config.head_dim, config.rope_theta, True)
    text = mx.random.normal((2, prefix, config.txt_dim), key=mx.random.key(4))
    tokens = mx.random.normal((2, layout.token_count, config.token_channels), key=mx.random.key(5))
    runs = {bucket: MLXBlockRunner(block, cos, sin, prefix, layout.token_count, attention_bucket=bucket)
            for bucket in (8, prefix + layout.token_count)}
    outputs = {}
    for bucket, run in runs.items():
        run.start(2, text)
        outputs[bucket] = []
        for index in range(0, layout.token_count - chunk, chunk):
            a, b = run.step(tokens[:, index : index + chunk], index)
            mx.eval(a, b, *run.pending)
            outputs[bucket].append((np.array(a), np.array(b)))
    assert runs[8].visible_length(prefix + 1) == 16 and runs[8].visible_length(prefix + layout.token_count) == prefix + layout.token_count
    for (a, b), (a_full, b_full) in zip(*outputs.values()):
        np.testing.assert_allclose(a, a_full, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b, b_full, rtol=0, atol=1e-6)


def test_a_lazily_loaded_flow_is_arranged_within_one_extra_matrix(blas, tmp_path):
    """Loaded lazily (the text encoder runs first), the flow's float32 weights are copied into
    (in, out) storage when read; read one array at a time, as the pipeline does, the peak is
    the model plus about one matrix, not the model twice."""
    blas(threaded=True)
    config = scaled_config(512, latent=8, text_length=8, text_dim=64)
    folder = tmp_path / "flow"
    folder.mkdir()
    config.save(folder)
    save_weights(folder, seeded_flow(config))
    write_manifest(folder, FlowConfig.KIND)
    size = sum(value.nbytes for _, value in tree_flatten(load_flow(folder).parameters()))
    largest = max(value.nbytes for _, value in tree_flatten(load_flow(folder).parameters()))

    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    flow = load_flow(folder, evaluate=False)
    read_parameters(flow)

    assert not row_major(flow.blocks[-1].layers[0].mlp.fc1.weight)
    assert mx.get_peak_memory() - base < size + 2 * largest < 1.5 * size


@pytest.mark.parametrize("rows", [2, 3])
def test_attention_split_by_rows_is_bit_identical(rows, monkeypatch):
    monkeypatch.setattr(backend_compute, "split_count", lambda device=None: 2)
    heads, length, dim = 8, backend_compute.MIN_SPLIT_CACHE // (8 * 64), 64
    q = mx.random.normal((rows, heads, 3, dim), key=mx.random.key(6))
    keys = mx.random.normal((rows, heads, length, dim), key=mx.random.key(7))
    values = mx.random.normal((rows, heads, length, dim), key=mx.random.key(8))
    mask = mx.arange(length)[None, :] <= (length - 3 + mx.arange(3))[:, None]
    whole = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125, mask=mask)
    assert mx.array_equal(backend_compute.attend(q, keys, values, 0.125, mask), whole).item()
    assert mx.array_equal(mx.compile(backend_compute.attend)(q, keys, values, 0.125, mask), whole).item()
