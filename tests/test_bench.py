"""Smoke tests of `make bench`'s measuring parts (no timing is asserted anywhere)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from benchmarks.converter_memory import _peak_rss_of
from benchmarks.full_width import Variant, build_block, head_bytes, layer_bytes
from benchmarks.models import scaled_config
from benchmarks.projection import bytes_per_image, layer_parameters
from benchmarks.run import write_json

MB = 1 << 20


def test_child_peak_rss_is_the_childs_own_not_the_parents():
    held = np.ones(300 * MB, dtype=np.uint8)
    small, _ = _peak_rss_of("pass")
    large, _ = _peak_rss_of("import numpy; numpy.ones(400 << 20, dtype=numpy.uint8)")
    assert held.sum() == 300 * MB
    assert small < 300 * MB < 400 * MB < large


def test_block_bytes_follow_width_layers_and_quantisation():
    config = scaled_config(128)
    width, hidden = 128, 512
    linear_params = width * 3 * width + width * width + width * hidden + hidden * width
    layer_params = linear_params + 3 * width + width + hidden + width + 4 * width  # biases, two LayerNorms
    assert layer_bytes(build_block(config, 1, True, Variant("float32", mx.float32))) == 4 * layer_params
    assert layer_bytes(build_block(config, 1, True, Variant("bfloat16", mx.bfloat16))) == 2 * layer_params
    quantised = build_block(config, 1, True, Variant("8-bit", mx.float32, 8))
    scales_and_biases = 2 * 4 * linear_params // 64
    assert layer_bytes(quantised) == linear_params + scales_and_biases + 4 * (layer_params - linear_params)
    assert head_bytes(quantised) > 0


def test_a_partial_run_keeps_the_other_sections_of_bench_json(tmp_path):
    path = tmp_path / "build" / "bench.json"
    write_json(path, {"backend": "cpu", "deep_step": {"float32": {"ms": 1.0}}}, partial=False)
    write_json(path, {"backend": "cpu", "batch_throughput": {"1": 2.0}}, partial=True)
    assert json.loads(path.read_text()) == {"backend": "cpu", "deep_step": {"float32": {"ms": 1.0}},
                                            "batch_throughput": {"1": 2.0}}
    write_json(path, {"backend": "gpu"}, partial=False)
    assert json.loads(path.read_text()) == {"backend": "gpu"}


def test_projection_reads_the_3b_models_weights_once_per_token():
    assert layer_parameters() == 113_286_144  # one width-3072 layer of the official model
    assert round(bytes_per_image("float16") / 1e12, 1) == 7.9
    assert round(bytes_per_image("4-bit") / 1e12, 1) == 2.2
