"""`starflow convert` end to end: the CLI, dtypes, quantisation, and bad input.

Every bad input must give one line on stderr, exit code 1, no traceback and no output folder.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_starflow import load_flow
from mlx_starflow.errors import ConfigError
from cli_runs import one_error_line, run

SAMPLE_TOL = 2e-4


@pytest.fixture(scope="module")
def sf(fixtures_dir):
    return fixtures_dir / "starflow"


@pytest.fixture(scope="module")
def inputs(sf):
    return mx.load(str(sf / "inputs.safetensors"))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """`starflow ARGS`: exit code and stderr (what every convert test checks)."""
    code, _, err = run(capsys, *args)
    return code, err


def convert_args(sf, src, out, *extra):
    return ["convert", sf / src, "--config", sf / "config.yaml", "--out", out, *extra]


def test_cli_conversion_reproduces_the_official_samples(sf, inputs, tmp_path, capsys):
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", tmp_path / "m"))
    assert code == 0, err
    flow = load_flow(tmp_path / "m")
    ref = mx.load(str(sf / "sample.safetensors"))
    sample = flow.sample(inputs["noise"], inputs["y_cfg"], guidance=2.5)
    assert mx.abs(sample - ref["g2p5.seq.6"]).max().item() < SAMPLE_TOL
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["components"] == ["flow"]
    assert len(manifest["sources"][0]["sha256"]) == 64


@pytest.mark.parametrize("src", ["model_fp16.pth", "model_bf16.pth"])
def test_half_precision_checkpoints_convert_to_the_same_rounded_weights(sf, tmp_path, capsys, src):
    """A float16/bfloat16 checkpoint holds the float32 weights rounded; converting it at float32 must
    give exactly those rounded values (the reader widens without loss)."""
    half = mx.float16 if "fp16" in src else mx.bfloat16
    assert run_cli(capsys, *convert_args(sf, "model.pth", tmp_path / "full"))[0] == 0
    assert run_cli(capsys, *convert_args(sf, src, tmp_path / "half"))[0] == 0
    full = mx.load(str(tmp_path / "full" / "flow" / "model.safetensors"))
    from_half = mx.load(str(tmp_path / "half" / "flow" / "model.safetensors"))
    assert set(full) == set(from_half)
    for name, value in full.items():
        assert mx.array_equal(value.astype(half).astype(mx.float32), from_half[name]), name


@pytest.mark.parametrize("extra,kind", [
    (["--dtype", "float16"], "float16"),
    (["--dtype", "bfloat16"], "bfloat16"),
    (["--quantize", "8"], "q8"),
    (["--quantize", "4", "--dtype", "float16"], "q4"),
])
def test_reduced_precision_models_load_and_sample(sf, inputs, tmp_path, capsys, extra, kind):
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", tmp_path / kind, *extra))
    assert code == 0, err
    flow = load_flow(tmp_path / kind)
    quantized = [m for _, m in flow.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == (4 * 7 if kind.startswith("q") else 0)
    assert flow.blocks[5].proj_out.weight.dtype != mx.uint32
    sample = flow.sample(inputs["noise"], inputs["y_cfg"], guidance=2.5)
    assert sample.dtype == mx.float32 and mx.all(mx.isfinite(sample)).item()


def test_label_model_gets_its_vocabulary(sf, tmp_path, capsys):
    out = tmp_path / "label"
    code, err = run_cli(capsys, "convert", sf / "label_model" / "model.pth", "--config", sf / "label_model" / "config.yaml", "--out", out)
    assert code == 0, err
    labels = json.loads((out / "labels" / "config.json").read_text())["labels"]
    assert labels[3] == "cat" and len(labels) == 10


def assert_clean_failure(code: int, err: str, out, *fragments: str) -> None:
    one_error_line(code, err, *fragments)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_config_shape_mismatch_names_key_and_shapes(sf, tmp_path, capsys):
    yaml = (sf / "config.yaml").read_text().replace("- channels: 128", "- channels: 256")
    (tmp_path / "wide.yaml").write_text(yaml)
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", sf / "model.pth", "--config", tmp_path / "wide.yaml", "--out", out)
    assert_clean_failure(code, err, out, "blocks.0.proj_in.weight", "[128, 4]", "[256, 4]")


def test_existing_output_is_refused_without_force(sf, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", out))
    assert code == 1 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only a previous conversion, never a folder of the user's files
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", out, "--force"))
    assert code == 1 and "will not replace it" in err
    assert (out / "keep.txt").read_text() == "mine"
    again = tmp_path / "again"
    assert run_cli(capsys, *convert_args(sf, "model.pth", again))[0] == 0
    assert run_cli(capsys, *convert_args(sf, "model.pth", again, "--force"))[0] == 0
    load_flow(again)


def test_missing_input(sf, tmp_path, capsys):
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, "no_such.pth", out))
    assert_clean_failure(code, err, out, "no_such.pth")


def test_truncated_checkpoint(sf, tmp_path, capsys):
    data = (sf / "model.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", tmp_path / "cut.pth", "--config", sf / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out)


def test_legacy_format_is_refused(sf, tmp_path, capsys):
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, "model_legacy_format.pth", out))
    assert_clean_failure(code, err, out, "legacy")


def test_malicious_pickle_is_refused_and_never_runs(sf, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = (b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", tmp_path / "evil.pth", "--config", sf / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out, "system")
    assert not marker.exists()


def test_unknown_key_is_listed(sf, tmp_path, capsys):
    from mlx_starflow.convert.pth_writer import save_pth
    from mlx_starflow.convert.checkpoint import open_checkpoint

    tensors = {k: t.numpy() for k, t in open_checkpoint(sf / "model.pth").items()}
    tensors["blocks.0.extra_gate.weight"] = tensors["blocks.0.proj_in.weight"]
    del tensors["blocks.3.final_norm.weight"]
    save_pth(tmp_path / "odd.pth", tensors)
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", tmp_path / "odd.pth", "--config", sf / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out, "blocks.0.extra_gate.weight", "blocks.3.final_norm.weight")


def test_keys_outside_the_flow_are_dropped_with_one_warning(sf, inputs, tmp_path, capsys, caplog):
    """The official loader (strict=False) ignores a learnable self-denoiser, EMA copies and later buffers."""
    from mlx_starflow.convert.pth_writer import save_pth
    from mlx_starflow.convert.checkpoint import open_checkpoint

    tensors = {k: t.numpy() for k, t in open_checkpoint(sf / "model.pth").items()}
    extra = {"denoiser.proj.weight": tensors["blocks.0.proj_in.weight"], "ema.blocks.0.proj_in.weight": tensors["blocks.0.proj_in.weight"],
             "noise_level_buffer": tensors["blocks.3.final_norm.weight"]}
    save_pth(tmp_path / "extra.pth", {**tensors, **extra})
    with caplog.at_level("WARNING"):
        code, err = run_cli(capsys, *convert_args(sf, tmp_path / "extra.pth", tmp_path / "m"))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "dropped 3 keys" in warnings[0] and "denoiser, ema, noise_level_buffer" in warnings[0]
    manifest = json.loads((tmp_path / "m" / "flow" / "manifest.json").read_text())
    assert sorted(manifest["dropped_keys"]) == sorted(extra)
    ref = mx.load(str(sf / "sample.safetensors"))
    sample = load_flow(tmp_path / "m").sample(inputs["noise"], inputs["y_cfg"], guidance=2.5)
    assert mx.abs(sample - ref["g2p5.seq.6"]).max().item() < SAMPLE_TOL


def test_a_key_given_twice_under_wrappers_is_refused(sf, tmp_path, capsys):
    from mlx_starflow.convert.pth_writer import save_pth
    from mlx_starflow.convert.checkpoint import open_checkpoint

    tensors = {k: t.numpy() for k, t in open_checkpoint(sf / "model.pth").items()}
    tensors["module.blocks.0.proj_in.weight"] = tensors["blocks.0.proj_in.weight"]
    save_pth(tmp_path / "twice.pth", tensors)
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", tmp_path / "twice.pth", "--config", sf / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out, "given twice", "module.blocks.0.proj_in.weight")


def test_text_encoder_is_float32_whatever_the_flow_dtype(sf, fixtures_dir, tmp_path, capsys):
    """The official sampler runs flan-t5-xl in float32; --text-encoder-dtype chooses otherwise."""
    from mlx_starflow.config import FlowConfig, T5Config

    base = [*convert_args(sf, "model.pth", tmp_path / "m"), "--dtype", "bfloat16", "--text-encoder", fixtures_dir / "t5"]
    code, err = run_cli(capsys, *base)
    assert code == 0, err
    assert FlowConfig.load(tmp_path / "m" / "flow").dtype == "bfloat16"
    assert T5Config.load(tmp_path / "m" / "text_encoder").dtype == "float32"
    assert all(v.dtype == mx.float32 for v in mx.load(str(tmp_path / "m" / "text_encoder" / "model.safetensors")).values())
    base[base.index(tmp_path / "m")] = tmp_path / "half"
    code, err = run_cli(capsys, *base, "--text-encoder-dtype", "bfloat16")
    assert code == 0, err
    assert T5Config.load(tmp_path / "half" / "text_encoder").dtype == "bfloat16"
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", tmp_path / "bad"), "--text-encoder-dtype", "int8")
    assert_clean_failure(code, err, tmp_path / "bad", "--text-encoder-dtype must be one of")


def _damaged_checkpoint(sf, path, name, values):
    from mlx_starflow.convert.pth_writer import save_pth
    from mlx_starflow.convert.checkpoint import open_checkpoint

    tensors = {k: t.numpy() for k, t in open_checkpoint(sf / "model.pth").items()}
    tensors[name] = values(tensors[name])
    save_pth(path, tensors)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(sf, tmp_path, capsys, value):
    def poison(array):
        array = array.copy()
        array.flat[7] = value
        return array

    _damaged_checkpoint(sf, tmp_path / "nan.pth", "blocks.2.attn_blocks.0.mlp.main.0.weight", poison)
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, tmp_path / "nan.pth", out))
    assert_clean_failure(code, err, out, "tensor blocks.2.attn_blocks.0.mlp.main.0.weight holds NaN or infinite values")


def test_bool_and_int_storages_are_refused(sf, tmp_path, capsys):
    import numpy as np

    _damaged_checkpoint(sf, tmp_path / "bool.pth", "blocks.0.proj_in.weight", lambda a: a > 0)
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, tmp_path / "bool.pth", out))
    assert_clean_failure(code, err, out, "weights must be float32/float16/bfloat16, but blocks.0.proj_in.weight (bool)")
    _damaged_checkpoint(sf, tmp_path / "int.pth", "blocks.1.proj_out.bias", lambda a: a.astype(np.int64))
    code, err = run_cli(capsys, *convert_args(sf, tmp_path / "int.pth", out))
    assert_clean_failure(code, err, out, "blocks.1.proj_out.bias (int64)")


def test_devices_fifos_and_folders_are_refused_at_once(sf, tmp_path, capsys):
    import os
    import signal
    from pathlib import Path

    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    out = tmp_path / "m"

    def hung(signum, frame):
        raise TimeoutError("the converter blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        for src in (fifo, Path("/dev/zero")):
            code, err = run_cli(capsys, *convert_args(sf, src, out))
            assert_clean_failure(code, err, out, "is not a regular file (a device, FIFO or socket)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    code, err = run_cli(capsys, *convert_args(sf, folder, out))
    assert_clean_failure(code, err, out, "is a folder, not a checkpoint file; pass the weights file itself")


@pytest.mark.parametrize("edit, message", [
    ("patch_size: 0", "patch_size 0 is out of range: allowed 1 … 64"),
    ("img_size: 0", "img_size 0 is out of range: allowed 1 … 16384"),
    ("txt_size: 0", "txt_size is 0 but the config names a condition"),
    ("blocks: 0", "blocks 0 is out of range: allowed 1 … 1024"),
    ("noise_std: .nan", "noise_std is nan; allowed: a finite number in [0.0, 100.0]"),
    ("layers_per_block: 1 0 1 1 1 2", "layers_per_block has a 0 (an identity block), which this port does not implement"),
    ("layers_per_block: 1 1 1 1 2 2", "checkpoint does not match the config: missing keys [blocks.4.attn_blocks.1."),
    ("layers_per_block: 1 1 1 1 1 -2", "layers_per_block count -2 is out of range: allowed 1 … 1024"),
    ("channels: many", "channels must be an integer in 1 … 65536, not 'many'"),
    ("use_softplus: 2", "use_softplus is 2; allowed: 0 or 1"),
    ("drop_label: 1.5", "drop_label is 1.5; allowed: a finite number in [0.0, 1.0]"),
])
def test_yaml_values_are_range_checked(sf, tmp_path, capsys, edit, message):
    key = edit.split(":")[0]
    lines = [line for line in (sf / "config.yaml").read_text().splitlines() if not line.startswith(f"- {key}:")]
    (tmp_path / "config.yaml").write_text("\n".join([*lines, f"- {edit}"]) + "\n")
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", sf / "model.pth", "--config", tmp_path / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out, message)


def test_converted_configs_are_range_checked_on_load(sf, tmp_path, capsys):
    from mlx_starflow.config import FlowConfig

    assert run_cli(capsys, *convert_args(sf, "model.pth", tmp_path / "m"))[0] == 0
    config = tmp_path / "m" / "flow" / "config.json"
    original = json.loads(config.read_text())
    for key, value, message in (("noise_std", float("nan"), "noise_std must be a finite number"),
                                ("patch_size", 0, "patch_size 0 is out of range: allowed 1 … 8"),
                                ("layers_per_block", [1, 0], "each layers_per_block count 0 is out of range")):
        config.write_text(json.dumps({**original, key: value}))
        with pytest.raises(ConfigError, match=message):
            FlowConfig.load(config.parent)


def test_vae_scaling_factor_nan_is_refused(sf, fixtures_dir, tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "diffusion_pytorch_model.safetensors").symlink_to(fixtures_dir / "vae" / "diffusion_pytorch_model.safetensors")
    hf = json.loads((fixtures_dir / "vae" / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**hf, "scaling_factor": float("nan")}))
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", out), "--vae", vae)
    assert_clean_failure(code, err, out, "scaling_factor must be a finite number in (0.0, 1000.0]")


def test_wrapper_prefixes_are_stripped(sf, tmp_path, capsys):
    from mlx_starflow.convert.pth_writer import save_pth
    from mlx_starflow.convert.checkpoint import open_checkpoint

    tensors = {f"module._orig_mod.{k}": t.numpy() for k, t in open_checkpoint(sf / "model.pth").items()}
    save_pth(tmp_path / "wrapped.pth", tensors)
    code, err = run_cli(capsys, "convert", tmp_path / "wrapped.pth", "--config", sf / "config.yaml", "--out", tmp_path / "m")
    assert code == 0, err


def test_unsupported_switch_is_named(sf, tmp_path, capsys):
    (tmp_path / "swiglu.yaml").write_text((sf / "config.yaml").read_text() + "- use_swiglu: 1\n")
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", sf / "model.pth", "--config", tmp_path / "swiglu.yaml", "--out", out)
    assert_clean_failure(code, err, out, "use_swiglu")


def test_bad_option_values(sf, tmp_path, capsys):
    out = tmp_path / "m"
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", out, "--quantize", "3"))
    assert_clean_failure(code, err, out, "--quantize")
    code, err = run_cli(capsys, *convert_args(sf, "model.pth", out, "--dtype", "int8"))
    assert_clean_failure(code, err, out, "--dtype")


def test_loading_detects_half_written_and_stale_folders(sf, tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli(capsys, *convert_args(sf, "model.pth", out))[0] == 0
    stale = tmp_path / "stale"
    shutil.copytree(out, stale)
    with open(stale / "flow" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="stale or damaged"):
        load_flow(stale)
    half = tmp_path / "half"
    shutil.copytree(out, half)
    (half / "flow" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="did not finish"):
        load_flow(half)
    config = json.loads((out / "flow" / "config.json").read_text())
    config["version"] = 99
    (out / "flow" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError):
        load_flow(out)


def test_compressed_pickle_is_refused_before_it_is_inflated(sf, tmp_path, capsys):
    """A deflated data.pkl could inflate to gigabytes (a zip bomb); torch never writes one."""
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\x80\x02}q\x00." + b"\0" * (8 << 20))
    out = tmp_path / "m"
    code, err = run_cli(capsys, "convert", tmp_path / "bomb.pth", "--config", sf / "config.yaml", "--out", out)
    assert_clean_failure(code, err, out, "compressed")


def test_damaged_weights_of_the_right_size_are_a_clear_error(sf, tmp_path, capsys):
    from mlx_starflow.errors import WeightsError

    out = tmp_path / "m"
    assert run_cli(capsys, *convert_args(sf, "model.pth", out))[0] == 0
    weights = out / "flow" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        load_flow(out)
