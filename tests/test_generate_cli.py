"""`starflow generate`, `info` and `score` through the CLI, on the tiny fixture models and the
shipped demo model.

The tiny T5 (width 32, text length 16), flow (8×8 latent) and VAE (factor 8) fit together into
a 64×64 text-to-image model. Every bad input must print one line on stderr, exit 1, show no
traceback and leave no file behind.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from PIL import Image

import mlx_starflow.app.commands.generate as generate_command
from mlx_starflow import load
from mlx_starflow.errors import ModelNotFound
from mlx_starflow.image import pil_to_uint8
from mlx_starflow.samplers import default_sampler
from mlx_starflow.pipeline import StarFlowPipeline
from cli_runs import DEMO, one_error_line, run

PROMPT = "a film still of a cat playing piano"
EIGHT_BIT_SHIFT = math.log2(127.5)
"""8-bit bits/dim = bits/dim of [-1, 1] pixels + log2(127.5): the pixel scale's Jacobian."""


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_clean_failure(code: int, err: str, out_dir, *fragments: str) -> None:
    one_error_line(code, err, *fragments)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_generate_end_to_end_is_reproducible(cli_models, tmp_path, capsys):
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    code, out, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text", "--seed", 42, "--output", first)
    assert code == 0, err
    assert f"wrote {first}" in out and "image(s) in" in out
    assert "" not in out.splitlines(), "stdout carries results only; progress bars go to stderr"
    with Image.open(first) as image:
        assert image.size == (64, 64) and image.format == "PNG"
        meta = dict(image.text)
    assert meta["prompt"] == PROMPT and meta["seed"] == "42" and meta["guidance"] == "3.6"
    assert meta["sampler"] == default_sampler().describe() and meta["size"] == "64x64" and meta["model"] == "model"
    assert run(capsys, "generate", PROMPT, "--model", cli_models / "text", "--seed", 42, "-o", second)[0] == 0
    assert run(capsys, "generate", PROMPT, "--model", cli_models / "text", "--seed", 43, "-o", other)[0] == 0
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))


def test_several_images_non_square_into_a_folder(cli_models, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "generate", "a red panda", "--model", cli_models / "text", "-n", 2, "--seed", 5,
                         "--width", 96, "--height", 64, "--sequential", "--guidance", 0, "-o", out_dir)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["a-red-panda-5.png", "a-red-panda-6.png"]
    with Image.open(out_dir / "a-red-panda-6.png") as image:
        assert image.size == (96, 64) and image.text["seed"] == "6" and image.text["sampler"] == "sequential"
    code, _, err = run(capsys, "generate", "a red panda", "--model", cli_models / "text", "--seed", 5, "--guidance", 0,
                       "--sequential", "-o", out_dir)
    assert code == 0, err
    assert (out_dir / "a-red-panda-5-2.png").is_file(), "an existing file must get a new name, not be replaced"


def test_prompts_file_keeps_the_model_loaded_and_grids(cli_models, tmp_path, capsys, monkeypatch):
    loads = []
    real_load = generate_command.load
    monkeypatch.setattr(generate_command, "load", lambda folder, **options: loads.append(folder) or real_load(folder, **options))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\n\nship\ndog\n")
    out_dir = tmp_path / "grids"
    code, _, err = run(capsys, "generate", "--prompts-file", prompts, "--model", cli_models / "label", "-n", 2, "--seed", 1,
                       "--grid", "-o", out_dir)
    assert code == 0, err
    assert len(loads) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["3-prompts-1-grid.png"]
    with Image.open(out_dir / "3-prompts-1-grid.png") as image:
        assert image.size == (2 + 2 * 18, 2 + 3 * 18), "one row per prompt, one column per seed"
        assert image.text["seed"] == "1,2,1,2,1,2" and image.text["prompt"] == "cat | ship | dog"


def test_all_prompts_and_seeds_are_sampled_in_one_run(cli_models, tmp_path, capsys, monkeypatch):
    """One call for every prompt × seed, files in prompt-then-seed order, each image the one the
    library gives for the same prompts, seeds and batch (Jacobi ties an image to its batch)."""
    calls = []
    real_iter = StarFlowPipeline.iter_generate
    monkeypatch.setattr(StarFlowPipeline, "iter_generate", lambda self, *a, **k: calls.append(a) or real_iter(self, *a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\nship\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "generate", "--prompts-file", prompts, "--model", cli_models / "label", "-n", 2, "--seed", 1,
                         "--batch-size", 3, "-o", out_dir)
    assert code == 0, err
    assert len(calls) == 1
    names = ["cat-1.png", "cat-2.png", "ship-1.png", "ship-2.png"]
    assert [line.split("/")[-1] for line in out.splitlines() if line.startswith("wrote")] == names
    monkeypatch.setattr(StarFlowPipeline, "iter_generate", real_iter)
    expected = load(cli_models / "label").generate(["cat", "cat", "ship", "ship"], seed=[1, 2, 1, 2], batch_size=3)
    for name, image in zip(names, expected):
        assert np.array_equal(pixels(out_dir / name), pil_to_uint8(image).transpose(1, 2, 0)), name


def test_all_labels_grid(cli_models, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--all-labels", "--model", cli_models / "label", "--seed", 3, "--grid",
                       "-o", tmp_path / "all.png")
    assert code == 0, err
    with Image.open(tmp_path / "all.png") as image:
        assert image.size == (2 + 4 * 18, 2 + 3 * 18), "10 classes in a 4-column grid"
        assert image.text["prompt"].startswith("airplane | automobile")
    code, _, err = run(capsys, "generate", "--all-labels", "--model", cli_models / "text", "-o", tmp_path / "t.png")
    assert code == 1 and "label model" in err and not (tmp_path / "t.png").exists()


def test_empty_prompt_and_long_prompt(cli_models, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "", "--model", cli_models / "text", "--seed", 0, "-o", tmp_path / "u.png")
    assert code == 0, err
    with Image.open(tmp_path / "u.png") as image:
        assert image.text["prompt"] == ""
    code, _, err = run(capsys, "generate", " ".join(["piano"] * 40), "--model", cli_models / "text", "--seed", 0, "-o", tmp_path / "l.png")
    assert code == 0, err
    assert "note:" in err and "only the first 15" in err


@pytest.mark.parametrize("args,fragments", [
    (["-n", "0"], ["at least 1"]),
    (["--seed", "-1"], ["out of range"]),
    (["--seed", str(2**32)], ["out of range"]),
    (["--width", "60"], ["width 60", "multiple of 8"]),
    (["--denoise", "decoder"], ["no fine-tuned decoder"]),
    (["--quantize", "3"], ["--quantize"]),
])
def test_bad_options(cli_models, tmp_path, capsys, args, fragments):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text", "-o", out_dir, *args)
    assert_clean_failure(code, err, out_dir, *fragments)


@pytest.mark.parametrize("args,fragments", [
    (["--guidance", "-1"], ["--guidance", "0 or more"]),
    (["--jacobi-block-size", "0"], ["--jacobi-block-size"]),
    (["--jacobi-threshold", "-1"], ["--jacobi-threshold"]),
    (["--jacobi-max-iter", "0"], ["--jacobi-max-iter"]),
    (["--denoise", "foo"], ["--denoise", "score, decoder, none"]),
    (["--dtype", "float8"], ["--dtype", "float32, float16, bfloat16"]),
    (["--quantize", "3"], ["--quantize", "4, 8"]),
    (["--width", "0"], ["--width", "positive"]),
    (["--height", "-8"], ["--height", "positive"]),
    (["--seed", "-1"], ["--seed", "out of range"]),
    (["--batch-size", "0"], ["--batch-size"]),
])
def test_bad_options_fail_before_the_model_is_fetched(no_model, tmp_path, capsys, args, fragments):
    """On the default model a late check would cost a 27 GB download first."""
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "generate", PROMPT, "-o", out_dir, *args)
    assert_clean_failure(code, err, out_dir, *fragments)
    if args[0] in ("--dtype", "--quantize", "--width", "--height"):
        code, _, err = run(capsys, "score", tmp_path / "none.png", *args)
        assert_clean_failure(code, err, out_dir, *fragments)


def test_bad_models(cli_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STARFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "generate", PROMPT, "--model", tmp_path / "missing" / "model", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "no model at")
    code, _, err = run(capsys, "generate", PROMPT, "--model", "someone/unknown-model", "--offline", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "someone/unknown-model", "apple/starflow")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "generate", PROMPT, "--model", tmp_path / "empty", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "not a converted folder")
    code, _, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text" / "flow", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "not a model")
    code, _, err = run(capsys, "generate", "dragon", "--model", cli_models / "label", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "unknown label", "airplane")


def test_outputs_are_never_replaced_silently_or_written_where_impossible(cli_models, tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    code, _, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text", "-o", taken)
    assert code == 1 and "--force" in err and len(err.strip().splitlines()) == 1
    assert taken.read_bytes() == b"mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text", "-o", blocker / "out")
    assert_clean_failure(code, err, tmp_path / "none", "cannot write", "is a file")
    code, _, err = run(capsys, "generate", PROMPT, "--model", cli_models / "text", "-o", tmp_path / "x.jpg")
    assert_clean_failure(code, err, tmp_path / "none", ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken.png"]


def test_prompt_input_errors(cli_models, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--model", cli_models / "text", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "--prompts-file")
    code, _, err = run(capsys, "generate", "--prompts-file", tmp_path / "none.txt", "--model", cli_models / "text", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "none.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    code, _, err = run(capsys, "generate", "--prompts-file", blank, "--model", cli_models / "text", "-o", out_dir)
    assert_clean_failure(code, err, out_dir, "no prompts")


def test_info_describes_models_and_caches(cli_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STARFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, err = run(capsys, "info", cli_models / "text")
    assert code == 0, err
    for fragment in ("flow", "text_encoder", "vae", "float32", "64x64", "multiples of 8"):
        assert fragment in out
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert str(tmp_path / "home") in out and "google/flan-t5-xl" in out and "not downloaded" in out


def test_info_on_the_shipped_demo_model(capsys):
    code, out, err = run(capsys, "info", DEMO)
    assert code == 0, err
    for fragment in ("flow", "labels", "12 labels", "32x32", "configs/demo.yaml", "starflow train", "trained: 3000 steps"):
        assert fragment in out, out


def test_info_lists_local_model_folders_and_verifies_them(tmp_path, capsys, monkeypatch):
    """Folders converted with `--out weights/…` are listed; `--verify` finds a flipped byte
    that leaves the file's size unchanged."""
    monkeypatch.setenv("STARFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "weights" / "my-model"
    shutil.copytree(DEMO, copy)
    (tmp_path / "weights" / "notes").mkdir()
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert "weights/my-model" in out and "notes" not in out
    code, out, err = run(capsys, "info", "weights")
    assert code == 0 and "weights/my-model" in out and "ready" in out, err
    code, out, err = run(capsys, "info", "--verify", copy)
    assert code == 0 and f"verified {copy}" in out, err
    weights = copy / "flow" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "info", "--verify", tmp_path / "weights")
    assert_clean_failure(code, err, tmp_path / "none", "model.safetensors", "sha256")
    code, out, err = run(capsys, "info", "--verify")
    assert_clean_failure(code, err, tmp_path / "none", "--verify", "model folders you name")


def test_generate_passes_local_companions_on(tmp_path, capsys, monkeypatch):
    seen = {}

    def resolve(model, *args, **kwargs):
        seen.update(kwargs, model=model)
        raise ModelNotFound("stopped after resolving")

    monkeypatch.setattr(generate_command, "resolve_model", resolve)
    code, _, err = run(capsys, "generate", PROMPT, "--model", tmp_path / "ckpt.pth", "--text-encoder", tmp_path / "t5",
                       "--vae", tmp_path / "vae", "--decoder", tmp_path / "decoder.bin", "-o", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "stopped after resolving")
    assert (seen["text_encoder"], seen["vae"], seen["decoder"]) == (tmp_path / "t5", tmp_path / "vae", tmp_path / "decoder.bin")


def test_info_on_a_component_folder_names_the_model_folder(capsys):
    code, out, err = run(capsys, "info", DEMO / "flow")
    assert_clean_failure(code, err, DEMO / "none", "component", str(DEMO))
    assert out == ""


def test_score_prints_bits_per_dim_and_refuses_a_corrupt_image(cli_models, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 30, 3), dtype=np.uint8)).save(good)
    code, out, err = run(capsys, "score", good, "cat", "--model", cli_models / "label")
    assert code == 0, err
    fields = out.split()
    assert fields[1] == "bits/dim" and fields[2] == "(8-bit:", out
    assert abs(float(fields[3].rstrip(")")) - float(fields[0]) - EIGHT_BIT_SHIFT) < 1e-3, out
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    code, _, err = run(capsys, "score", corrupt, "cat", "--model", cli_models / "label")
    assert_clean_failure(code, err, tmp_path / "none", "cannot read", "corrupt.png")


def test_score_of_a_latent_model_is_per_latent_dimension_and_notes_a_long_prompt(cli_models, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    code, out, err = run(capsys, "score", image, " ".join(["piano"] * 40), "--model", cli_models / "text")
    assert code == 0, err
    assert "per latent dimension" in out and "8-bit" not in out
    assert "note:" in err and "only the first 15" in err
