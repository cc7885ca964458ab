"""The T5 text encoder against the official `encode_text` outputs in fixtures/t5.

Tolerances are those of fixtures/t5/README.md §5: token ids, masks and position buckets exactly;
text states within atol 1e-5 (max-abs), which the smallest porting bug measured there (RMS-norm
eps 1e-5 instead of 1e-6, 4.8e-5) exceeds; padded rows exactly 0.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.convert.t5 import convert_t5
from mlx_starflow.config import T5Config
from mlx_starflow.errors import ConfigError, WeightsError
from mlx_starflow.model_io import read_manifest
from mlx_starflow.t5 import relative_position_bucket
from mlx_starflow.text_encoder import TextEncoder, load_text_encoder

STATES_ATOL = 1e-5
LENGTHS = {"short": 16, "cfg": 16, "full": 128, "tokenizer_only": 16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
LAYOUTS = {
    ".": ("config.json", "model.safetensors"),
    "sharded": (
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ),
    "pytorch_bin": ("config.json", "pytorch_model.bin"),
}


@pytest.fixture(scope="module")
def t5_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "t5"


@pytest.fixture(scope="module")
def oracle(t5_dir: Path) -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in mx.load(str(t5_dir / "fixtures.safetensors")).items()}


@pytest.fixture(scope="module")
def captions(t5_dir: Path) -> dict[str, list[str]]:
    return json.loads((t5_dir / "fixtures.json").read_text())["captions"]


def hf_folder(t5_dir: Path, layout: str, dest: Path) -> Path:
    """A Hugging Face-style folder: the fixture's checkpoint in one layout plus the tokenizer files."""
    dest.mkdir()
    for name in LAYOUTS[layout]:
        (dest / name).symlink_to(t5_dir / layout / name)
    for name in TOKENIZER_FILES:
        (dest / name).symlink_to(t5_dir / name)
    return dest


@pytest.fixture(scope="module")
def converted(t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model converted once from each checkpoint layout."""
    root = tmp_path_factory.mktemp("t5")
    return {layout: convert_t5(hf_folder(t5_dir, layout, root / f"src{i}"), root / f"out{i}") for i, layout in enumerate(LAYOUTS)}


@pytest.fixture(scope="module")
def encoder(converted: dict[str, Path]) -> TextEncoder:
    return load_text_encoder(converted["."])


def test_relative_position_buckets_match_exactly(oracle: dict[str, np.ndarray]) -> None:
    buckets = relative_position_bucket(mx.array(oracle["relative_position"]), num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.array(buckets), oracle["relative_position_bucket"])


@pytest.mark.parametrize("name", ["short", "cfg", "full", "tokenizer_only"])
def test_token_ids_and_masks_match_exactly(encoder: TextEncoder, oracle: dict, captions: dict, name: str) -> None:
    ids, mask = encoder.tokenize(captions[name], LENGTHS[name])
    np.testing.assert_array_equal(np.array(ids), oracle[f"{name}.input_ids"])
    np.testing.assert_array_equal(np.array(mask), oracle[f"{name}.attention_mask"])


@pytest.mark.parametrize("name", ["short", "cfg", "full"])
def test_text_states_match_official(encoder: TextEncoder, oracle: dict, captions: dict, name: str) -> None:
    states = np.array(encoder.encode(captions[name], LENGTHS[name]))
    expected = oracle[f"{name}.text_states"]
    assert states.dtype == np.float32 and states.shape == expected.shape
    assert np.abs(states - expected).max() <= STATES_ATOL
    padded = oracle[f"{name}.attention_mask"] == 0
    assert np.all(states[padded] == 0.0)


def test_empty_prompt_is_eos_then_padding(encoder: TextEncoder, oracle: dict) -> None:
    ids, mask = encoder.tokenize([""], 16)
    assert np.array(ids).tolist() == [[1] + [0] * 15]
    assert np.array(mask).tolist() == [[1] + [0] * 15]
    np.testing.assert_allclose(np.array(encoder.encode("", 16))[0], oracle["short.text_states"][0], rtol=0, atol=STATES_ATOL)


def test_count_tokens_reports_truncation(encoder: TextEncoder, captions: dict, oracle: dict) -> None:
    counts = encoder.count_tokens(captions["short"])
    truncated = [count > 16 for count in counts]
    ends_with_eos_at_last_slot = (oracle["short.input_ids"][:, -1] == 1).tolist()
    assert truncated == ends_with_eos_at_last_slot
    assert counts[1] == 17 and counts[0] == 1


def test_layouts_convert_to_identical_weights_and_outputs(converted: dict[str, Path], captions: dict) -> None:
    reference = mx.load(str(converted["."] / "model.safetensors"))
    states = {}
    for layout, folder in converted.items():
        weights = mx.load(str(folder / "model.safetensors"))
        assert sorted(weights) == sorted(reference)
        for name, value in weights.items():
            assert value.dtype == mx.float32
            np.testing.assert_array_equal(np.array(value), np.array(reference[name]), err_msg=f"{layout}: {name}")
        states[layout] = np.array(load_text_encoder(folder).encode(captions["cfg"], 16))
    for layout, value in states.items():
        np.testing.assert_array_equal(value, states["."], err_msg=layout)


def test_converted_folder_is_complete(converted: dict[str, Path]) -> None:
    folder = converted["sharded"]
    manifest = read_manifest(folder, verify_hashes=True)
    assert manifest["kind"] == T5Config.KIND
    assert set(manifest["files"]) == {"config.json", "model.safetensors", *TOKENIZER_FILES}
    sources = [source["path"] for source in manifest["sources"]]
    # shard 2 holds only decoder weights and lm_head: the encoder is not made from it
    assert "model-00001-of-00002.safetensors" in sources and "model-00002-of-00002.safetensors" not in sources
    config = T5Config.load(folder)
    assert (config.d_model, config.num_layers, config.vocab_size, config.layer_norm_epsilon) == (32, 2, 1024, 1e-6)


def test_sharded_folder_without_the_decoder_shard_converts(t5_dir: Path, converted: dict, tmp_path: Path) -> None:
    """flan-t5-xl as the hub downloads it for us: the index and only the shards holding encoder weights."""
    src = hf_folder(t5_dir, "sharded", tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    folder = convert_t5(src, tmp_path / "out")
    assert mx.load(str(folder / "model.safetensors")).keys() == mx.load(str(converted["."] / "model.safetensors")).keys()


def test_sharded_folder_without_an_encoder_shard_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    src = hf_folder(t5_dir, "sharded", tmp_path / "src")
    (src / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"names shard model-00001-of-00002\.safetensors, which is missing"):
        convert_t5(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_to_float16_keeps_values_within_rounding(t5_dir: Path, converted: dict, tmp_path: Path) -> None:
    folder = convert_t5(hf_folder(t5_dir, ".", tmp_path / "src"), tmp_path / "out", dtype="float16")
    assert T5Config.load(folder).dtype == "float16"
    half = mx.load(str(folder / "model.safetensors"))
    full = mx.load(str(converted["."] / "model.safetensors"))
    for name, value in half.items():
        assert value.dtype == mx.float16
        np.testing.assert_array_equal(np.array(value), np.array(full[name].astype(mx.float16)))


def test_missing_tokenizer_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    src = hf_folder(t5_dir, ".", tmp_path / "src")
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        convert_t5(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_gated_config_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    src = hf_folder(t5_dir, ".", tmp_path / "src")
    hf = json.loads((t5_dir / "config.json").read_text())
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps({**hf, "feed_forward_proj": "relu"}))
    with pytest.raises(ConfigError, match="feed_forward_proj 'relu'"):
        convert_t5(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_key_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    src = hf_folder(t5_dir, ".", tmp_path / "src")
    weights = mx.load(str(t5_dir / "model.safetensors"))
    del weights["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    (src / "model.safetensors").unlink()
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    with pytest.raises(WeightsError, match=r"missing keys \[encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        convert_t5(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(t5_dir: Path, tmp_path: Path) -> None:
    src = hf_folder(t5_dir, ".", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        convert_t5(src, out)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(FileExistsError, match="--force will not replace it"):
        convert_t5(src, out, force=True)
    assert (out / "keep.txt").read_text() == "user data", "--force never deletes what we did not write"
    (out / "keep.txt").unlink()
    convert_t5(src, out, force=True)
    convert_t5(src, out, force=True)
    assert (out / "model.safetensors").is_file()
