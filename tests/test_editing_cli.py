"""`starflow invert / generate --noise / edit / vary / interpolate / rank / score` through the CLI.

Mostly on the tiny label model (pixel space, 16×16): there the flow's output is the image, so
"reproduces exactly" can be checked on the PNG bytes' pixels. Sequential sampling at guidance 0
inverts the forward to ~1e-6 (fixture README §5), far below one 8-bit level (2/255 ≈ 0.008 in
[-1, 1]). Every bad input prints one line, exits 1 and writes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mlx_starflow.app.cli import main
from mlx_starflow.noise_file import load_noise
from cli_runs import one_error_line, run

EXACT = ["-g", "0", "--sequential", "--denoise", "none"]


@pytest.fixture(scope="module")
def cat_png(cli_models, tmp_path_factory):
    """A sample of the label model (so its pixels are something the model can produce)."""
    path = tmp_path_factory.mktemp("cat") / "cat.png"
    assert main(["generate", "cat", "--model", str(cli_models / "label"), "--seed", "3", "-o", str(path), *EXACT]) == 0
    return path


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_clean_failure(code: int, err: str, folder, *fragments: str, before: set | None = None) -> None:
    one_error_line(code, err, *fragments)
    assert set(folder.iterdir()) == (before or set())


def test_invert_then_generate_from_the_noise_gives_the_image_back(cli_models, cat_png, tmp_path, capsys):
    noise = tmp_path / "cat.safetensors"
    code, out, err = run(capsys, "invert", cat_png, "--prompt", "cat", "--out", noise, "--model", cli_models / "label", "--sequential")
    assert code == 0, err
    error = float(out.split("max |Δ latent| = ")[1].split()[0])
    assert error < 2e-4, out  # fixture README §7: sequential samples 2e-4
    stored = load_noise(noise)
    assert stored.noise.shape == (1, 3, 16, 16) and stored.prompts == ["cat"]
    assert stored.metadata["model"] == "model" and stored.metadata["size"] == "16x16" and "pixel" in stored.metadata["vae"]
    back = tmp_path / "back.png"
    code, _, err = run(capsys, "generate", "cat", "--noise", noise, "--model", cli_models / "label", "-o", back, *EXACT)
    assert code == 0, err
    assert np.array_equal(pixels(back), pixels(cat_png))
    with Image.open(back) as image:
        assert image.text["noise"] == "cat.safetensors row 0" and "seed" not in image.text
    # under another class the same noise gives another picture
    other = tmp_path / "other.png"
    assert run(capsys, "generate", "ship", "--noise", noise, "--model", cli_models / "label", "-o", other, *EXACT)[0] == 0
    assert np.abs(pixels(other) - pixels(cat_png)).max() > 8


def test_invert_a_text_model_image_and_sample_it_back(cli_models, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (80, 96, 3), dtype=np.uint8)).save(image)
    noise = tmp_path / "photo.safetensors"
    code, out, err = run(capsys, "invert", image, "-p", "a red panda", "-o", noise, "--model", cli_models / "text", "--sequential")
    assert code == 0, err
    assert float(out.split("max |Δ latent| = ")[1].split()[0]) < 2e-4, out
    assert load_noise(noise).noise.shape == (1, 4, 8, 8) and load_noise(noise).metadata["size"] == "64x64"


def test_edit_with_the_same_prompt_and_every_token_kept_is_the_image(cli_models, cat_png, tmp_path, capsys):
    same = tmp_path / "same.png"
    code, _, err = run(capsys, "edit", cat_png, "--prompt", "cat", "--source-prompt", "cat", "--keep", "1.0",
                       "--model", cli_models / "label", "-o", same, *EXACT)
    assert code == 0, err
    assert np.array_equal(pixels(same), pixels(cat_png))
    changed = tmp_path / "ship.png"
    code, _, err = run(capsys, "edit", cat_png, "--prompt", "ship", "--source-prompt", "cat", "--keep", "32", "--seed", "1",
                       "--model", cli_models / "label", "-o", changed, *EXACT)
    assert code == 0, err
    with Image.open(changed) as image:
        assert image.text["edit_source_prompt"] == "cat" and image.text["edit_keep"] == "32" and image.text["prompt"] == "ship"
        assert image.text["seed"] == "1" and image.text["source_image"] == "cat.png"


def test_vary_at_strength_zero_is_the_image_and_above_it_differs(cli_models, cat_png, tmp_path, capsys):
    code, out, err = run(capsys, "vary", cat_png, "-n", 2, "--strength", 0, "-p", "cat", "--seed", 4,
                         "--model", cli_models / "label", "-o", tmp_path / "v0.png", *EXACT)
    assert code == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == [str(tmp_path / "v0-1.png"), str(tmp_path / "v0-2.png")]
    assert np.array_equal(pixels(tmp_path / "v0-1.png"), pixels(cat_png))
    code, _, err = run(capsys, "vary", cat_png, "-n", 2, "--strength", 0.5, "-p", "cat", "--seed", 4,
                       "--model", cli_models / "label", "-o", tmp_path / "v5.png", *EXACT)
    assert code == 0, err
    first, second = pixels(tmp_path / "v5-1.png"), pixels(tmp_path / "v5-2.png")
    assert np.abs(first - pixels(cat_png)).max() > 8 and np.abs(first - second).max() > 8


def test_interpolate_between_seeds_ends_on_the_seeds_samples(cli_models, tmp_path, capsys):
    for seed in (11, 12):
        assert run(capsys, "generate", "dog", "--model", cli_models / "label", "--seed", seed, "-o", tmp_path / f"s{seed}.png", *EXACT)[0] == 0
    code, out, err = run(capsys, "interpolate", "--seeds", 11, 12, "-p", "dog", "--steps", 4, "--model", cli_models / "label",
                         "-o", tmp_path / "path.png", *EXACT)
    assert code == 0, err
    assert len(out.splitlines()) == 5  # the strip and 4 frames
    # slerp's end weights are 1 and 0 up to float rounding: at most one 8-bit level apart
    assert np.abs(pixels(tmp_path / "path-1.png") - pixels(tmp_path / "s11.png")).max() <= 1
    assert np.abs(pixels(tmp_path / "path-4.png") - pixels(tmp_path / "s12.png")).max() <= 1
    strip = pixels(tmp_path / "path.png")
    assert strip.shape == (16 + 4, 4 * 18 + 2, 3)  # make_grid: 2-pixel padding around each tile
    assert np.array_equal(strip[2:18, 2:18], pixels(tmp_path / "path-1.png"))


def test_generate_at_an_official_aspect_ratio(cli_models, tmp_path, capsys):
    """16:9 on the 16×16 label model (multiple 2): sqrt(256·16/9) = 21.3 → 22 wide, sqrt(256·9/16) = 12 high."""
    code, _, err = run(capsys, "generate", "cat", "--aspect-ratio", "16:9", "--model", cli_models / "label", "--seed", 1,
                       "-o", tmp_path / "wide.png", *EXACT)
    assert code == 0, err
    with Image.open(tmp_path / "wide.png") as image:
        assert image.size == (22, 12) and image.text["size"] == "22x12"


def test_rank_and_score_over_lists(cli_models, cat_png, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("ship\n\ncat\ndog\n")
    code, out, err = run(capsys, "rank", cat_png, "--captions", captions, "--model", cli_models / "label", "--json")
    assert code == 0, err
    ranking = json.loads(out)["ranking"]
    assert sorted(r["caption"] for r in ranking) == ["cat", "dog", "ship"]
    bits = [r["bits_per_dim"] for r in ranking]
    assert bits == sorted(bits) and ranking[0]["behind_best"] == 0
    second = tmp_path / "second.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(second)
    code, out, err = run(capsys, "score", cat_png, second, "-p", "cat", "-p", "ship", "--model", cli_models / "label", "--json")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert [(s["image"], s["prompt"]) for s in scores] == [(str(cat_png), "cat"), (str(cat_png), "ship"), (str(second), "cat"), (str(second), "ship")]
    by_caption = {r["caption"]: r["bits_per_dim"] for r in ranking}
    assert abs(scores[0]["bits_per_dim"] - by_caption["cat"]) < 1e-5 and abs(scores[1]["bits_per_dim"] - by_caption["ship"]) < 1e-5
    code, out, err = run(capsys, "score", second, "ship", "--model", cli_models / "label")  # the one-prompt form
    assert code == 0, err
    assert abs(float(out.split()[0]) - scores[3]["bits_per_dim"]) < 1e-4


def test_bad_input_is_one_line_and_writes_nothing(cli_models, cat_png, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    label, text = cli_models / "label", cli_models / "text"
    junk = work / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    captions = work / "empty.txt"
    captions.write_text("\n  \n")
    text_noise = work / "text.safetensors"
    image = work / "photo.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    assert run(capsys, "invert", image, "-p", "a cat", "-o", text_noise, "--model", text, "--no-check")[0] == 0
    before = set(work.iterdir())
    out = work / "out.png"
    cases = [
        (("invert", junk, "-p", "cat", "-o", work / "n.safetensors", "--model", label), ("cannot read", "junk.png")),
        (("invert", cat_png, "-p", "cat", "-o", work / "n.npy", "--model", label), (".safetensors",)),
        (("invert", cat_png, "-p", "dragon", "-o", work / "n.safetensors", "--model", label), ("unknown label",)),
        (("invert", cat_png, "-p", "cat", "-o", text_noise, "--model", label), ("already exists", "--force")),
        (("generate", "cat", "--noise", text_noise, "--model", label, "-o", out), ("4 channels", "samples 3")),
        (("generate", "cat", "--noise", work / "none.safetensors", "--model", label, "-o", out), ("no noise file",)),
        (("generate", "cat", "--noise", junk, "--model", label, "-o", out), ("cannot read",)),
        (("generate", "cat", "--noise", text_noise, "-n", 2, "--model", label, "-o", out), ("-n",)),
        (("generate", "cat", "--aspect-ratio", "4:3", "--model", label, "-o", out), ("4:3", "16:9")),
        (("generate", "cat", "--aspect-ratio", "16:9", "-W", 32, "--model", label, "-o", out), ("--aspect-ratio",)),
        (("rank", cat_png, "--captions", captions, "--model", label), ("no captions",)),
        (("rank", cat_png, "--model", label), ("--caption",)),
        (("vary", cat_png, "--strength", 1.5, "--model", label, "-o", out), ("strength", "[0, 1]")),
        (("vary", cat_png, "--strength", -0.1, "--model", label, "-o", out), ("strength",)),
        (("edit", cat_png, "-p", "ship", "--keep", 65, "--model", label, "-o", out), ("beyond the 64 tokens",)),
        (("edit", cat_png, "-p", "ship", "--keep", "half", "--model", label, "-o", out), ("--keep",)),
        (("edit", cat_png, "-p", "ship", "--keep", "1.5", "--model", label, "-o", out), ("[0, 1]",)),
        (("edit", junk, "-p", "ship", "--model", label, "-o", out), ("cannot read",)),
        (("edit", cat_png, "-p", "ship", "--model", label, "-o", work / "out.jpg"), (".png",)),
        (("interpolate", "--seeds", 1, 2, "--images", cat_png, cat_png, "--model", label, "-o", out), ("exactly one",)),
        (("interpolate", "--seeds", 1, 2, "--steps", 1, "--model", label, "-o", out), ("at least 2",)),
        (("interpolate", "--images", cat_png, work / "none.png", "--model", label, "-o", out), ("no image file",)),
        (("score", cat_png, junk, "-p", "cat", "--model", label), ("cannot read",)),
    ]
    for args, fragments in cases:
        code, _, err = run(capsys, *args)
        assert_clean_failure(code, err, work, *fragments, before=before)
