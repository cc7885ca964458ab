"""The text-to-image pipeline on the tiny fixture models (`mlx_starflow.load` → generate).

Oracles: the official label-model samples (fixtures/starflow/label_model, sequential samples:
max-abs 2e-4, README §7), the official VAE decodes (fixtures/vae: `official_x` atol 2e-5, uint8
|Δ| ≤ 1 on at most 0.1 % of values, README §6) and the official loss (1e-5). The tiny T5 (width
32, text length 16), flow and VAE (factor 8) fit together into a 64×64 text-to-image model.
"""

from __future__ import annotations

import json
import math
import shutil
import weakref

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.convert.model import convert_model
from mlx_starflow import load
from mlx_starflow.config import FlowConfig
from mlx_starflow.errors import ConfigError, InputError, ModelNotFound
from mlx_starflow.image import decoded_to_uint8, pil_to_uint8
from mlx_starflow.labels import UnknownLabel
from mlx_starflow.model_folder import LazyTextEncoder
from mlx_starflow.pipeline import (ENCODE_CHUNK, MAX_SEED, check_sampling, check_seed, check_seeds, default_batch_size,
                                   parameter_bytes, seeded_noise)
from mlx_starflow.text_encoder import TextEncoder
from mlx_starflow.samplers import Jacobi, Sequential, default_sampler

SAMPLE_TOL = 2e-4
DECODE_TOL = 2e-5
LOSS_TOL = 1e-5
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def folders(fixtures_dir, tmp_path_factory):
    """Converted model folders: text + VAE + fine-tuned decoder, text + VAE, flow only, label."""
    sf, root = fixtures_dir / "starflow", tmp_path_factory.mktemp("models")
    common = {"text_encoder": fixtures_dir / "t5", "vae": fixtures_dir / "vae"}
    convert_model(sf / "model.pth", sf / "config.yaml", root / "text_ft", decoder=fixtures_dir / "vae" / "finetuned" / "pytorch_model.bin", **common)
    convert_model(sf / "model.pth", sf / "config.yaml", root / "text", **common)
    convert_model(sf / "model.pth", sf / "config.yaml", root / "flow_only")
    convert_model(sf / "label_model" / "model.pth", sf / "label_model" / "config.yaml", root / "label")
    return root


@pytest.fixture(scope="module")
def text_pipe(folders):
    return load(folders / "text")


@pytest.fixture(scope="module")
def label_pipe(folders):
    return load(folders / "label")


@pytest.fixture(scope="module")
def label_ref(fixtures_dir):
    return mx.load(str(fixtures_dir / "starflow" / "label_model" / "fixtures.safetensors"))


@pytest.fixture(scope="module")
def vae_ref(fixtures_dir):
    return mx.load(str(fixtures_dir / "vae" / "fixtures.safetensors"))


def final_sample(pipe, prompts, **settings):
    """The flow's last output and the images of a generation."""
    sample, images = None, []
    for item in pipe.iter_generate(prompts, **settings):
        if item.sample is not None and item.sample.output is not None:
            sample = item.sample.output
        images += [result.image for result in item.images]
    return sample, images


def assert_uint8_close(ours: np.ndarray, ref: np.ndarray) -> None:
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("guidance,key,prompts", [(2.5, "g2p5.seq.3", ["cat", "ship"]), (0.0, "g0.seq.3", ["cat", "ship"])])
def test_label_model_generation_matches_the_official_samples(label_pipe, label_ref, monkeypatch, guidance, key, prompts):
    """Condition rows (conditional, then the empty class), guidance and block order, end to end."""
    monkeypatch.setattr(label_pipe, "noise", lambda seeds, width, height: label_ref["noise"][: len(seeds)])
    sample, images = final_sample(label_pipe, prompts, seed=0, guidance=guidance, sampler=Sequential(), denoise="none", batch_size=2)
    assert mx.abs(sample - label_ref[key]).max().item() < SAMPLE_TOL
    ours = np.stack([pil_to_uint8(image) for image in images])
    assert_uint8_close(ours, decoded_to_uint8(label_ref[key]))


def test_score_is_the_official_loss_in_bits(label_pipe, label_ref):
    x = label_ref["x_noisy"]
    bits = [label_pipe.score(x[i : i + 1], prompt).item() for i, prompt in enumerate(["cat", "ship"])]
    nll = np.mean([b * math.log(2) - HALF_LOG_2PI for b in bits])
    assert abs(nll - label_ref["fwd.loss"].item()) < LOSS_TOL


def test_score_of_a_latent_model_uses_the_vae_posterior_mean(text_pipe, vae_ref):
    expected = text_pipe.flow.bits_per_dim(vae_ref["encode.mean_scaled"][:1], text_pipe.encode(["a red panda"]))
    ours = text_pipe.score(vae_ref["inputs.images"][:1], "a red panda")
    assert abs(ours.item() - expected.item()) < 1e-4


@pytest.mark.parametrize("fine_tuned,key", [(False, "decode"), (True, "decode_ft")])
def test_decoding_uses_the_vae_or_the_fine_tuned_decoder(folders, vae_ref, fine_tuned, key):
    pipe = load(folders / "text_ft")
    decoder = pipe.decoder if fine_tuned else pipe.vae
    assert mx.abs(decoder.decode(vae_ref["inputs.z"]) - vae_ref[f"{key}.official_x"]).max().item() < DECODE_TOL
    ours = np.stack([pil_to_uint8(image) for image in pipe.decode(vae_ref["inputs.z"], fine_tuned=fine_tuned)])
    assert_uint8_close(ours, np.array(vae_ref[f"{key}.uint8"]))


def test_default_denoise_is_the_decoder_when_the_folder_has_one(folders, text_pipe):
    assert load(folders / "text_ft").check_denoise(None) == "decoder"
    assert text_pipe.check_denoise(None) == "score"
    with pytest.raises(ConfigError, match="no fine-tuned decoder"):
        text_pipe.check_denoise("decoder")


def test_noise_is_numpys_legacy_generator_one_seed_per_image():
    noise = np.array(seeded_noise([7, 8], 4, 3, 5))
    for row, seed in enumerate([7, 8]):
        assert np.array_equal(noise[row], np.random.RandomState(seed).standard_normal((4, 3, 5)).astype(np.float32))


def test_text_generation_uses_conditional_then_empty_prompt_rows(text_pipe, monkeypatch):
    prompts = ["a red panda", "a film still of a cat playing piano"]
    noise = seeded_noise([3, 4], 4, 8, 8)
    uncond = text_pipe.encode([""])
    assert mx.all(uncond[0, 1:] == 0).item() and mx.any(uncond[0, 0] != 0).item()
    y = mx.concatenate([text_pipe.encode(prompts), uncond, uncond], axis=0)
    expected = text_pipe.flow.sample(noise, y, guidance=3.6, sampler=Jacobi())
    sample, _ = final_sample(text_pipe, prompts, seed=3, sampler=Jacobi(), denoise="none", batch_size=2)
    assert mx.abs(sample - expected).max().item() < 1e-5


def test_each_distinct_prompt_and_the_empty_prompt_are_encoded_once(text_pipe, monkeypatch):
    """A repeated prompt and a prompt equal to "" share rows with the guidance rows; the sample
    equals the one built from separately encoded rows."""
    prompts = ["a cat", "a dog", "a cat", ""]
    separate = [text_pipe.encode([prompt]) for prompt in prompts]
    y = mx.concatenate([*separate, *[separate[3]] * 4], axis=0)
    expected = text_pipe.flow.sample(seeded_noise([5, 6, 7, 8], 4, 8, 8), y, guidance=3.6)
    calls = []
    real_encode = text_pipe.condition.encode
    monkeypatch.setattr(text_pipe.condition, "encode", lambda batch, length: calls.append(list(batch)) or real_encode(batch, length))
    sample, _ = final_sample(text_pipe, prompts, seed=5, sampler=Sequential(), denoise="none", batch_size=4)
    assert calls == [["a cat", "a dog", ""]]
    assert mx.abs(sample - expected).max().item() < 1e-5


def test_distinct_prompts_beyond_one_encoder_call_keep_their_rows(text_pipe):
    prompts = [f"a cat number {i % 20}" for i in range(30)]
    states, rows = text_pipe.encode_distinct(prompts)
    assert states.shape[0] == 20 > ENCODE_CHUNK and rows[25] == 5
    assert mx.abs(states[mx.array(rows)] - text_pipe.encode(prompts)).max().item() < 1e-5


def test_a_seed_sequence_gives_each_image_its_own_seed(text_pipe):
    pair = text_pipe.generate(["a cat", "a cat"], seed=[22, 20], batch_size=1, sampler=Sequential(), denoise="none")
    assert [image.info["seed"] for image in pair] == ["22", "20"]
    for image, seed in zip(pair, (22, 20)):
        alone = text_pipe.generate("a cat", seed=seed, sampler=Sequential(), denoise="none")[0]
        assert np.array_equal(pil_to_uint8(image), pil_to_uint8(alone))


def test_seed_sequences_are_checked():
    assert check_seeds([3, 1, 3], 3) == [3, 1, 3]
    assert check_seeds(7, 3) == [7, 8, 9]
    with pytest.raises(ValueError, match="2 seed.*3 prompt"):
        check_seeds([1, 2], 3)
    with pytest.raises(ValueError, match=f"seed {MAX_SEED + 1} is out of range"):
        check_seeds([0, MAX_SEED + 1], 2)


@pytest.mark.parametrize("settings,name", [
    ({"guidance": -1.0}, "--guidance"),
    ({"guidance": math.nan}, "--guidance"),
    ({"denoise_choice": "foo"}, "--denoise"),
])
def test_sampling_settings_are_checked_naming_the_option(text_pipe, settings, name):
    defaults = {"guidance": 3.6, "denoise_choice": None}
    with pytest.raises(InputError, match=name):
        check_sampling(**{**defaults, **settings})
    call = {("denoise" if key == "denoise_choice" else key): value for key, value in settings.items()}
    with pytest.raises(InputError, match=name):
        next(text_pipe.iter_generate("a cat", seed=0, **call))


@pytest.mark.parametrize("settings,name", [
    ({"block_size": 0}, "--jacobi-block-size"),
    ({"block_size": 2.5}, "--jacobi-block-size"),
    ({"threshold": -1e-3}, "--jacobi-threshold"),
    ({"threshold": math.inf}, "--jacobi-threshold"),
    ({"max_iter": 0}, "--jacobi-max-iter"),
])
def test_samplers_check_their_settings_naming_the_option(settings, name):
    with pytest.raises(InputError, match=name):
        Jacobi(**settings)


def test_samplers_describe_themselves_as_the_png_metadata_always_has():
    assert Sequential().describe() == "sequential"
    assert Jacobi().describe() == "jacobi block=16 threshold=0.001 max_iter=32"
    assert Jacobi(8, 1e-4, 5, coupled=True).describe() == "jacobi block=8 threshold=0.0001 max_iter=5 coupled"


def test_defaults_and_metadata(text_pipe):
    images = text_pipe.generate("a red panda", seed=11)
    assert len(images) == 1 and images[0].size == (64, 64)
    info = images[0].info
    assert info["prompt"] == "a red panda" and info["seed"] == "11" and info["guidance"] == "3.6"
    assert info["sampler"] == default_sampler().describe() and info["denoise"] == "score"
    assert info["size"] == "64x64" and info["model"] == "model"  # the checkpoint's file stem


def test_seeds_count_up_and_repeat_exactly(text_pipe):
    three = text_pipe.generate(["a cat"] * 3, seed=20, batch_size=1, sampler=Sequential())
    again = text_pipe.generate(["a cat"], seed=21, sampler=Sequential())
    assert [image.info["seed"] for image in three] == ["20", "21", "22"]
    assert np.array_equal(pil_to_uint8(three[1]), pil_to_uint8(again[0]))
    assert not np.array_equal(pil_to_uint8(three[0]), pil_to_uint8(three[1]))


def test_non_square_size(text_pipe):
    image = text_pipe.generate("a wide view", seed=1, width=96, height=64, denoise="none")[0]
    assert image.size == (96, 64)


def test_progress_runs_encode_then_blocks_deep_first_then_decode(text_pipe):
    items = list(text_pipe.iter_generate(["a", "b", "c"], seed=0, batch_size=2, sampler=Sequential()))
    assert items[0].phase == "encode" and items[-1].phase == "done"
    finished = [(item.batch, item.sample.block) for item in items if item.phase == "sample" and item.sample.output is not None]
    assert finished == [(b, k) for b in (0, 1) for k in (5, 4, 3, 2, 1, 0)]
    assert [len(item.images) for item in items if item.images] == [2, 1]
    assert [item.done for item in items if item.phase == "denoise"] == [1, 2, 1]
    assert set(items[-1].timings) == {"encode", "sample", "denoise", "decode"}


def test_long_prompt_is_truncated_with_a_note_and_empty_prompt_is_allowed(text_pipe):
    long = " ".join(["piano"] * 40)
    assert text_pipe.check_prompts([long, ""])[0].startswith("prompt 'piano piano")
    items = list(text_pipe.iter_generate([long, ""], seed=0, sampler=Sequential(), denoise="none"))
    assert len(items[0].notes) == 1 and "only the first 15" in items[0].notes[0]
    assert sum(len(item.images) for item in items) == 2


def test_label_model_rejects_unknown_labels_and_takes_the_empty_class(label_pipe):
    with pytest.raises(UnknownLabel, match="airplane"):
        label_pipe.generate("dragon", seed=0)
    assert label_pipe.generate("", seed=0, sampler=Sequential())[0].size == (16, 16)


@pytest.mark.parametrize("seed,count", [(-1, 1), (MAX_SEED + 1, 1), (MAX_SEED - 1, 3)])
def test_seed_out_of_range(seed, count):
    with pytest.raises(ValueError, match="out of range"):
        check_seed(seed, count)


def test_seed_bounds_and_random_seed():
    assert check_seed(MAX_SEED - 2, 3) == MAX_SEED - 2
    assert 0 <= check_seed(None, 5) <= MAX_SEED - 4
    with pytest.raises(ValueError, match="at least 1"):
        check_seed(0, 0)


def test_size_must_be_a_multiple_of_the_vae_factor(text_pipe):
    with pytest.raises(ValueError, match="width 60 is not a positive multiple of 8.*use 56 or 64"):
        text_pipe.check_size(60, None)


def test_default_batch_size_rule():
    """Per image: 2 × the deep block's KV cache = 2 × 24 layers × (K, V) × 2 rows × (128 + 1024) × 3072 × 2 bytes."""
    config = FlowConfig(in_channels=4, latent_size=32, patch_size=1, channels=3072, layers_per_block=(2, 2, 2, 2, 2, 24),
                        txt_size=128, txt_dim=2048, vae_factor=8, dtype="bfloat16")
    per_image = 2 * 24 * 2 * 2 * 1152 * 3072 * 2
    assert default_batch_size(config, 1024, 3.6, weight_bytes=10 * 2**30, memory=32 * 2**30) == int((0.6 * 32 * 2**30 - 10 * 2**30) // per_image)
    assert default_batch_size(config, 1024, 3.6, weight_bytes=0, memory=512 * 2**30) == 8
    assert default_batch_size(config, 1024, 3.6, weight_bytes=10 * 2**30, memory=16 * 2**30) == 1


def test_loading_refuses_what_is_not_a_complete_model(folders, tmp_path):
    with pytest.raises(ModelNotFound, match="no model at"):
        load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not a converted folder"):
        load(tmp_path)
    with pytest.raises(ConfigError, match="component, not a model"):
        load(folders / "text" / "flow")
    with pytest.raises(ConfigError, match="--text-encoder"):
        load(folders / "flow_only")
    stale = tmp_path / "stale"
    shutil.copytree(folders / "text", stale)
    with open(stale / "vae" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="stale or damaged"):
        load(stale)
    old = tmp_path / "old"
    shutil.copytree(folders / "text", old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ConfigError, match="incompatible"):
        load(old)


def test_the_text_encoder_is_released_before_sampling_and_images_are_unchanged(folders, monkeypatch):
    """Default `load`: T5 is read for the encoding and released before the first flow step; a
    second call reads it again; the images equal those of a pipeline that keeps it."""
    pipe = load(folders / "text")
    assert isinstance(pipe.condition, LazyTextEncoder) and not pipe.condition.held
    held_while_sampling = []
    real_sample = pipe.flow.iter_sample

    def spy(*args, **kwargs):
        held_while_sampling.append(pipe.condition.held)
        yield from real_sample(*args, **kwargs)

    monkeypatch.setattr(pipe.flow, "iter_sample", spy)
    settings = {"seed": 3, "sampler": Sequential(), "batch_size": 1}
    released = [pipe.generate(["a cat", "a dog"], **settings), pipe.generate(["a cat", "a dog"], **settings)]
    assert held_while_sampling == [False] * 4 and not pipe.condition.held
    kept = load(folders / "text", keep_text_encoder=True)
    encoder = kept.condition
    assert isinstance(encoder, TextEncoder)
    expected = [pil_to_uint8(image) for image in kept.generate(["a cat", "a dog"], **settings)]
    assert kept.condition is encoder
    for images in released:
        assert all(np.array_equal(pil_to_uint8(image), want) for image, want in zip(images, expected))


def test_releasing_the_text_encoder_frees_its_weights(folders):
    pipe = load(folders / "text")
    mx.eval(pipe.flow.parameters())  # read at the release otherwise (left unread while T5 runs)
    encoder = pipe.condition.get()
    mx.eval(encoder.encoder.parameters())
    weights = parameter_bytes(encoder.encoder)
    gone = weakref.ref(encoder)
    del encoder
    holding = mx.get_active_memory()
    states, _ = pipe.encode_distinct(["a cat", ""])
    assert states.shape == (2, 16, 32)
    assert gone() is None and not pipe.condition.held
    assert holding + states.nbytes - mx.get_active_memory() >= weights > 0


def test_the_text_encoder_is_released_when_encoding_fails(folders, monkeypatch):
    pipe = load(folders / "text")
    monkeypatch.setattr(TextEncoder, "encode", lambda self, prompts, length: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pipe.encode(["a cat"])
    assert not pipe.condition.held
