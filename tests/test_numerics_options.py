"""The flow's numerics switches through `mlx_starflow.load` and `starflow generate`.

`float32_compute` and `bfloat16_rope` themselves are checked in test_flow.py against the
official samples; here: that the front doors pass them to the flow, that a bfloat16 model with
float32 compute comes closer to the float32 model's images end to end, and that the PNG
metadata records a switch only when it is on (default images keep their recorded metadata).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from PIL import Image

from mlx_starflow import load
from mlx_starflow.app.cli import main
from mlx_starflow.convert.model import convert_model
from mlx_starflow.samplers import Sequential

SWITCHES = ("bfloat16_rope", "float32_compute")
SETTINGS = {"seed": 7, "sampler": Sequential(), "denoise": "none", "batch_size": 2}
PROMPTS = ["a red panda", "a film still of a cat playing piano"]


@pytest.fixture(scope="module")
def models(fixtures_dir, tmp_path_factory):
    """The fixture text model converted from its float32 and its bfloat16 checkpoints."""
    sf, root = fixtures_dir / "starflow", tmp_path_factory.mktemp("numerics")
    common = {"text_encoder": fixtures_dir / "t5", "vae": fixtures_dir / "vae"}
    convert_model(sf / "model.pth", sf / "config.yaml", root / "float32", **common)
    convert_model(sf / "model_bf16.pth", sf / "config.yaml", root / "bfloat16", dtype="bfloat16", **common)
    return root


def final_samples(pipe) -> mx.array:
    """The flow's samples (before decoding) for PROMPTS."""
    outputs = [item.sample.output for item in pipe.iter_generate(PROMPTS, **SETTINGS)
               if item.sample is not None and item.sample.output is not None]
    return outputs[-1]


def test_float32_compute_brings_a_bfloat16_model_closer_to_float32(models):
    reference = final_samples(load(models / "float32"))
    plain = load(models / "bfloat16")
    full = load(models / "bfloat16", float32_compute=True)
    assert plain.flow.blocks[-1].compute_dtype == mx.bfloat16 and full.flow.blocks[-1].compute_dtype == mx.float32
    plain_error = mx.mean(mx.abs(final_samples(plain) - reference)).item()
    full_error = mx.mean(mx.abs(final_samples(full) - reference)).item()
    assert full_error < 0.8 * plain_error, (full_error, plain_error)


def test_bfloat16_rope_reaches_the_flow_and_moves_the_samples(models):
    exact = load(models / "float32")
    rounded = load(models / "float32", bfloat16_rope=True)
    assert rounded.flow.bfloat16_rope and not exact.flow.bfloat16_rope
    assert mx.abs(final_samples(rounded) - final_samples(exact)).max().item() > 1e-3


def test_metadata_records_the_switches_only_when_on(models):
    default = load(models / "bfloat16").generate(PROMPTS[0], **SETTINGS)[0]
    assert not set(SWITCHES) & set(default.info)
    switched = load(models / "bfloat16", bfloat16_rope=True, float32_compute=True).generate(PROMPTS[0], **SETTINGS)[0]
    assert {name: switched.info[name] for name in SWITCHES} == {"bfloat16_rope": "on", "float32_compute": "on"}


@pytest.mark.parametrize("flags,recorded", [
    ([], {}),
    (["--float32-compute"], {"float32_compute": "on"}),
    (["--bfloat16-rope", "--float32-compute"], {"bfloat16_rope": "on", "float32_compute": "on"}),
])
def test_generate_flags(models, tmp_path, capsys, flags, recorded):
    out = tmp_path / "image.png"
    code = main(["generate", "a cat", "--model", str(models / "bfloat16"), "--seed", "1", "--sequential",
                 "--denoise", "none", "--output", str(out), *flags])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert {name: image.info[name] for name in SWITCHES if name in image.info} == recorded


def test_generate_help_documents_the_flags(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--bfloat16-rope" in text and "--float32-compute" in text and "float32 autocast" in text
