"""The MLX SD-VAE against the official STARFlow VAE wrapper (fixtures/vae, tiny sd-vae-ft-ema).

Tolerances are those of fixtures/vae/README.md §6: atol 2e-5 (max-abs) on latents and decoder
output, about 7× the largest difference between correct implementations and 800× below the
smallest porting bug; uint8 exactly from the fixture's own floats, and |Δ| ≤ 1 on at most
0.1 % of values from our own decode.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_starflow.convert.maps.vae import finetuned_to_diffusers
from mlx_starflow.convert.vae import convert_finetuned_decoder, convert_vae, read_diffusers_config
from mlx_starflow.config import VAEConfig
from mlx_starflow.errors import ConfigError, ModelNotFound, StarFlowError, WeightsError
from mlx_starflow.image import decoded_to_pil, decoded_to_uint8, read_image, uint8_to_model_input
from mlx_starflow.model_io import MANIFEST_FILE, VERIFIED_FILE, WEIGHTS_FILE
from mlx_starflow.vae import VAE, load_vae

ATOL = 2e-5
SCALING = 0.18215
FINETUNED_FILES = ("pytorch_model.bin", "dummy_model_sd-vae-ft-ema_0.30.pth")
CASES = {"square": ("inputs.images", "encode"), "wide": ("inputs.images_wide", "encode_wide")}
DECODES = {"square": ("inputs.z", "decode"), "wide": ("inputs.z_wide", "decode_wide")}


def max_abs(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


@pytest.fixture(scope="module")
def src(fixtures_dir: Path) -> Path:
    return fixtures_dir / "vae"


@pytest.fixture(scope="module")
def fx(src: Path) -> dict[str, mx.array]:
    return mx.load(str(src / "fixtures.safetensors"))


@pytest.fixture(scope="module")
def converted(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_vae(src, tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def vae(converted: Path) -> VAE:
    return load_vae(converted)


@pytest.fixture(scope="module")
def finetuned(src: Path, converted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {name: convert_finetuned_decoder(src / "finetuned" / name, converted, root / name) for name in FINETUNED_FILES}


def diffusers_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """A diffusers VAE folder like the fixture, with its tensors or config changed."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = mx.load(str(src / "diffusion_pytorch_model.safetensors"))
    mx.save_safetensors(str(dst / "diffusion_pytorch_model.safetensors"), edit_tensors(tensors) if edit_tensors else tensors)
    return dst


# encoder


@pytest.mark.parametrize("case", CASES)
def test_posterior_matches_official(vae: VAE, fx: dict, case: str) -> None:
    images, prefix = CASES[case]
    mean, logvar = vae.latent_distribution(fx[images])
    assert max_abs(mean * SCALING, fx[f"{prefix}.mean_scaled"]) < ATOL
    assert max_abs(logvar, fx[f"{prefix}.latent_logvar"]) < ATOL
    assert max_abs(mx.exp(0.5 * logvar), fx[f"{prefix}.latent_std"]) < ATOL


@pytest.mark.parametrize("case", CASES)
def test_encode_returns_scaled_mean_by_default(vae: VAE, fx: dict, case: str) -> None:
    images, prefix = CASES[case]
    assert max_abs(vae.encode(fx[images]), fx[f"{prefix}.mean_scaled"]) < ATOL


@pytest.mark.parametrize("case", CASES)
def test_encode_sample_with_official_noise_matches_official_z(vae: VAE, fx: dict, case: str) -> None:
    images, prefix = CASES[case]
    z = vae.encode(fx[images], sample=True, noise=fx[f"{prefix}.eps"])
    assert max_abs(z, fx[f"{prefix}.official_z"]) < ATOL
    assert max_abs(fx[f"{prefix}.mean_scaled"], fx[f"{prefix}.official_z"]) > 1e-2, "the fixture must tell a sample from the mean"


def test_encode_sample_from_key_is_reproducible_and_uses_the_formula(vae: VAE, fx: dict) -> None:
    images, key = fx["inputs.images"], mx.random.key(11)
    z = vae.encode(images, sample=True, key=key)
    noise = mx.random.normal(z.shape, key=key)
    expected = (fx["encode.latent_mean"] + fx["encode.latent_std"] * noise) * SCALING
    assert max_abs(z, expected) < ATOL
    assert max_abs(vae.encode(images, sample=True, key=key), z) == 0.0
    assert max_abs(vae.encode(images, sample=True, key=mx.random.key(12)), z) > 1e-2


def test_encode_refuses_noise_without_sample(vae: VAE, fx: dict) -> None:
    with pytest.raises(ValueError, match="sample=True"):
        vae.encode(fx["inputs.images"], noise=fx["encode.eps"])


# decoder


@pytest.mark.parametrize("case", DECODES)
def test_decode_matches_official(vae: VAE, fx: dict, case: str) -> None:
    latents, prefix = DECODES[case]
    assert max_abs(vae.decode(fx[latents]), fx[f"{prefix}.official_x"]) < ATOL


def test_roundtrip_matches_official(vae: VAE, fx: dict) -> None:
    assert max_abs(vae.decode(fx["encode.official_z"]), fx["roundtrip.official_x"]) < ATOL


# pixels


@pytest.mark.parametrize("prefix", ["decode", "decode_wide", "decode_ft", "decode_ft_wide"])
def test_uint8_from_official_float_is_exact(fx: dict, prefix: str) -> None:
    ours = decoded_to_uint8(fx[f"{prefix}.official_x"])
    np.testing.assert_array_equal(ours, np.array(fx[f"{prefix}.uint8"]))


def test_pil_image_equals_official_png(fx: dict) -> None:
    (image,) = decoded_to_pil(fx["decode_wide.official_x"])
    np.testing.assert_array_equal(np.asarray(image), np.array(fx["decode_wide.saved_png"]))


@pytest.mark.parametrize("case", DECODES)
def test_uint8_from_our_decode_within_allowance(vae: VAE, fx: dict, case: str) -> None:
    latents, prefix = DECODES[case]
    ours = decoded_to_uint8(vae.decode(fx[latents])).astype(np.int16)
    official = np.array(fx[f"{prefix}.uint8"]).astype(np.int16)
    diff = np.abs(ours - official)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.001 * diff.size


@pytest.mark.parametrize("case", ["", "_wide"])
def test_model_input_from_uint8_is_exact(fx: dict, case: str) -> None:
    ours = uint8_to_model_input(np.array(fx[f"inputs.images{case}_u8"]))
    assert max_abs(ours, fx[f"inputs.images{case}"]) == 0.0


def test_png_file_reads_back_as_model_input(fx: dict, tmp_path: Path) -> None:
    pixels = np.array(fx["inputs.images_u8"])[0]
    Image.fromarray(pixels.transpose(1, 2, 0)).save(tmp_path / "in.png")
    assert max_abs(uint8_to_model_input(read_image(tmp_path / "in.png")), fx["inputs.images"][:1]) == 0.0


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"])
def test_corrupt_image_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(StarFlowError, match=r"cannot read .*broken\.png"):
        read_image(path)


def test_missing_image_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StarFlowError, match="no image file"):
        read_image(tmp_path / "absent.png")


# conversion


def test_converted_folder_layout(converted: Path) -> None:
    written = sorted(p.name for p in converted.iterdir() if p.name != VERIFIED_FILE)  # the record a load adds
    assert written == ["config.json", MANIFEST_FILE, WEIGHTS_FILE]
    manifest = json.loads((converted / MANIFEST_FILE).read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert VAEConfig.load(converted) == VAEConfig(block_out_channels=(16, 32, 32, 32), norm_num_groups=8)


def test_legacy_layout_gives_identical_weights(src: Path, converted: Path, tmp_path: Path) -> None:
    legacy = convert_vae(src / "legacy_layout", tmp_path / "legacy")
    assert VAEConfig.load(legacy) == VAEConfig.load(converted)
    ours, theirs = mx.load(str(converted / WEIGHTS_FILE)), mx.load(str(legacy / WEIGHTS_FILE))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert mx.array_equal(ours[name], theirs[name]), name


def test_legacy_config_defaults_scaling_factor(src: Path) -> None:
    assert "scaling_factor" not in json.loads((src / "legacy_layout" / "config.json").read_text())
    assert read_diffusers_config(src / "legacy_layout" / "config.json").scaling_factor == SCALING


def test_float16_conversion_casts_every_weight(src: Path, converted: Path, tmp_path: Path) -> None:
    half = mx.load(str(convert_vae(src, tmp_path / "half", dtype="float16") / WEIGHTS_FILE))
    full = mx.load(str(converted / WEIGHTS_FILE))
    assert VAEConfig.load(tmp_path / "half").dtype == "float16"
    for name, value in full.items():
        assert half[name].dtype == mx.float16 and mx.array_equal(half[name], value.astype(mx.float16)), name


# fine-tuned decoder


@pytest.mark.parametrize("name", FINETUNED_FILES)
@pytest.mark.parametrize("case", DECODES)
def test_finetuned_decoder_matches_official(finetuned: dict, fx: dict, name: str, case: str) -> None:
    latents, prefix = DECODES[case]
    decoder = load_vae(finetuned[name])
    ours = decoder.decode(fx[latents])
    assert max_abs(ours, fx[prefix.replace("decode", "decode_ft") + ".official_x"]) < ATOL
    assert max_abs(ours, fx[f"{prefix}.official_x"]) > 0.1, "must not be the base decoder"


def test_finetuned_layouts_give_identical_decoder_only_weights(finetuned: dict) -> None:
    first, second = (mx.load(str(finetuned[name] / WEIGHTS_FILE)) for name in FINETUNED_FILES)
    assert sorted(first) == sorted(second)
    assert all(name.startswith(("decoder.", "post_quant_conv.")) for name in first)
    for name in first:
        assert mx.array_equal(first[name], second[name]), name


def test_finetuned_layouts_are_detected() -> None:
    assert finetuned_to_diffusers(["encoder.0.conv_in.weight", "decoder.1.conv_out.bias"]) == (
        "sequential",
        {"encoder.conv_in.weight": "encoder.0.conv_in.weight", "decoder.conv_out.bias": "decoder.1.conv_out.bias"},
    )
    assert finetuned_to_diffusers(["vae.post_quant_conv.weight"]) == ("wrapper", {"post_quant_conv.weight": "vae.post_quant_conv.weight"})
    with pytest.raises(WeightsError, match="not a STARFlow fine-tuned VAE decoder"):
        finetuned_to_diffusers(["model.encoder.conv_in.weight"])


def test_decoder_only_folder_cannot_encode(finetuned: dict, fx: dict) -> None:
    decoder = load_vae(finetuned[FINETUNED_FILES[0]])
    assert not decoder.config.has_encoder
    with pytest.raises(ConfigError, match="only a decoder"):
        decoder.encode(fx["inputs.images"])


def test_finetuned_decoder_from_diffusers_base_folder(src: Path, finetuned: dict, tmp_path: Path) -> None:
    out = convert_finetuned_decoder(src / "finetuned" / FINETUNED_FILES[0], src, tmp_path / "decoder")
    ours, reference = mx.load(str(out / WEIGHTS_FILE)), mx.load(str(finetuned[FINETUNED_FILES[0]] / WEIGHTS_FILE))
    assert all(mx.array_equal(ours[name], reference[name]) for name in reference) and sorted(ours) == sorted(reference)


# bad input


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no VAE at"):
        convert_vae(tmp_path / "absent", tmp_path / "out")


def test_folder_without_diffusers_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers VAE folder"):
        convert_vae(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "_class_name": "UNet2DConditionModel"}, "not an AutoencoderKL"),
        (lambda c: {**c, "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
        (lambda c: {**c, "act_fn": "gelu"}, "act_fn"),
        (lambda c: {**c, "use_tiling_magic": True}, "use_tiling_magic"),
    ],
)
def test_unsupported_config_is_refused(src: Path, tmp_path: Path, edit, message: str) -> None:
    folder = diffusers_copy(src, tmp_path / "bad", edit_config=edit)
    with pytest.raises(ConfigError, match=message):
        convert_vae(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_key_is_listed(src: Path, tmp_path: Path) -> None:
    folder = diffusers_copy(src, tmp_path / "extra", edit_tensors=lambda t: {**t, "decoder.extra_head.weight": mx.zeros((3,))})
    with pytest.raises(WeightsError, match=r"unknown keys \[decoder\.extra_head\.weight"):
        convert_vae(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_key_is_listed(src: Path, tmp_path: Path) -> None:
    drop = "decoder.up_blocks.3.resnets.0.conv_shortcut.bias"
    folder = diffusers_copy(src, tmp_path / "short", edit_tensors=lambda t: {k: v for k, v in t.items() if k != drop})
    with pytest.raises(WeightsError, match=r"missing weights \[decoder\.stages\.3\.resnets\.0\.shortcut\.bias"):
        convert_vae(folder, tmp_path / "out")


def test_weights_of_another_width_are_refused(src: Path, tmp_path: Path) -> None:
    folder = diffusers_copy(src, tmp_path / "other", edit_config=lambda c: {**c, "latent_channels": 8})
    with pytest.raises(WeightsError, match="the config needs"):
        convert_vae(folder, tmp_path / "out")


def test_finetuned_file_with_foreign_keys_is_refused(src: Path, converted: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(foreign), {"model.decoder.conv_in.weight": mx.zeros((32, 4, 3, 3))})
    with pytest.raises(WeightsError, match="not a STARFlow fine-tuned VAE decoder"):
        convert_finetuned_decoder(foreign, converted, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(src: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "vae"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        convert_vae(src, out)
    assert (out / "keep.txt").is_file()
    with pytest.raises(FileExistsError, match="--force will not replace it"):
        convert_vae(src, out, force=True)
    assert (out / "keep.txt").read_text() == "user data", "--force never deletes what we did not write"
    shutil.copytree(converted, out, dirs_exist_ok=True)
    (out / "keep.txt").unlink()
    convert_vae(src, out, force=True)
    assert mx.array_equal(mx.load(str(out / WEIGHTS_FILE))["decoder.conv_in.weight"], mx.load(str(converted / WEIGHTS_FILE))["decoder.conv_in.weight"])


def test_half_written_folder_is_refused(converted: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(converted, tmp_path / "copy"))
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match="did not finish"):
        load_vae(copy)
