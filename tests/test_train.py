"""Training: the official objective and schedule, a tiny run that learns, resume, and bad input.

CLI failures must print one line, exit 1, and leave nothing behind (or nothing changed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_starflow.app.commands.train as train_command
import mlx_starflow.dataset as dataset_module
import mlx_starflow.train as train_module
from mlx_starflow.app.cli import main
from mlx_starflow.convert.model import convert_model
from mlx_starflow.convert.official_config import flow_config, read_official_config
from mlx_starflow import load_flow
from mlx_starflow.dataset import fit_square, load_image_folder
from mlx_starflow.demo_data import LABELS, render, write_demo_data
from mlx_starflow.errors import ConfigError, OutputExists
from mlx_starflow.flow import StarFlow
from mlx_starflow.model_folder import load_model_folder
from mlx_starflow.run_folder import check_new_run, claimed_run, read_run_state
from mlx_starflow.text_encoder import TextEncoder
from mlx_starflow.train import TrainSettings, fine_tune_base, learning_rate, new_label_model, objective, train

LOSS_TOL = 1e-5
"""Loss scalars against the official fixture (fixtures/starflow/README.md §7: 1e-5)."""
RESUME_TOL = 1e-6
"""A resumed run repeats the same float32 operations on the same inputs: equal up to rounding."""

TINY_YAML = """arguments:
- img_size: 16
- txt_size: 1
- channel_size: 3
- patch_size: 4
- channels: {channels}
- blocks: 2
- layers_per_block: 1 1
- noise_std: 0.1
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- text: shapes.vocab
- drop_label: 0.1
- soft_clip: 4
- latent_norm_regularization: 1e-4
"""


class OfficialSchedule:
    """The upstream CosineLRSchedule's behaviour, restated: lr starts at min_lr, `step()` runs after
    every optimizer update, and a value outside [min_lr, max_lr] is not applied."""

    def __init__(self, warmup: int, total: int, min_lr: float, max_lr: float):
        self.warmup, self.total, self.min_lr, self.max_lr = warmup, total, min_lr, max_lr
        self.start = min(min_lr, 1e-6)
        self.counter, self.lr = 0, min_lr

    def step(self) -> None:
        self.counter += 1
        if self.counter <= self.warmup:
            candidate = self.start + self.counter / self.warmup * (self.max_lr - self.start)
        else:
            t = (self.counter - self.warmup) / (self.total - self.warmup)
            candidate = self.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (self.max_lr - self.min_lr)
        if self.min_lr <= candidate <= self.max_lr:
            self.lr = candidate


@pytest.mark.parametrize("warmup,total,min_lr,max_lr", [(10, 100, 1e-6, 1e-3), (5, 50, 1e-4, 1e-3), (0, 20, 1e-6, 5e-4)])
def test_schedule_follows_the_official_cosine_schedule(warmup, total, min_lr, max_lr):
    official = OfficialSchedule(warmup, total, min_lr, max_lr)
    for update in range(total):
        assert learning_rate(update, max_lr, min_lr, warmup, total) == pytest.approx(official.lr, rel=1e-12), update
        official.step()


@pytest.fixture(scope="module")
def fixture_flow(fixtures_dir, tmp_path_factory):
    sf = fixtures_dir / "starflow"
    out = convert_model(sf / "model.pth", sf / "config.yaml", tmp_path_factory.mktemp("flow") / "m")
    return load_flow(out)


def test_objective_matches_the_official_training_loss(fixtures_dir, fixture_flow):
    inputs = mx.load(str(fixtures_dir / "starflow" / "inputs.safetensors"))
    ref = mx.load(str(fixtures_dir / "starflow" / "forward.safetensors"))
    loss, nll = objective(fixture_flow, inputs["x_noisy"], inputs["y"])
    assert abs(nll.item() - ref["loss"].item()) < LOSS_TOL
    assert abs(loss.item() - ref["train_loss"].item()) < LOSS_TOL
    assert abs(ref["train_loss"].item() - ref["loss"].item()) > 10 * LOSS_TOL, "the regulariser must be visible"


# ---- tiny runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_demo_data(root / "data", count=48, seed=0, size=16)
    (root / "tiny.yaml").write_text(TINY_YAML.format(channels=64))
    (root / "wide.yaml").write_text(TINY_YAML.format(channels=128))
    return root


def tiny_base(tiny, seed=0):
    official = read_official_config(tiny / "tiny.yaml")
    return new_label_model(flow_config(official, txt_dim=len(LABELS) + 1), LABELS, seed, {"config": "tiny.yaml"})


SETTINGS = dict(steps=6, batch_size=8, lr=3e-3, min_lr=1e-4, warmup_steps=2, heldout=0.25, checkpoint_every=3, sample_every=0)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def train_args(tiny, out, *extra):
    return ["train", tiny / "data", "--config", tiny / "tiny.yaml", "--out", out, "--batch-size", 8, "--lr", 3e-3,
            "--min-lr", 1e-4, "--warmup-steps", 5, "--heldout", 0.25, *extra]


def test_training_reduces_heldout_bits_per_dim(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 40, "--checkpoint-every", 20, "--sample-every", 20))
    assert code == 0, err
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    record = manifest["training"]
    assert record["heldout_bits_per_dim"] < record["heldout_bits_per_dim_at_start"] - 0.5, record
    assert record["heldout_bits_per_dim_8bit"] == pytest.approx(record["heldout_bits_per_dim"] + math.log2(127.5), abs=1e-3)
    assert record["step"] == 40 and record["heldout_images"] == 12 and record["training_images"] == 36
    assert record["command"].startswith("starflow train ") and "--seed 0" in record["command"]
    assert manifest["components"] == ["flow", "labels"]
    assert json.loads((out / "model" / "labels" / "config.json").read_text())["labels"] == list(LABELS)
    flow = load_flow(out / "model")
    assert flow.config.txt_dim == 13 and flow.config.noise_std == 0.1
    assert Image.open(out / "samples" / "step-000040.png").size[0] > 16


def collect(tiny, out, stop_after=None, resume=False):
    calls = []

    def stop() -> bool:
        """Asked once after every step, like a Ctrl-C flag."""
        calls.append(None)
        return stop_after is not None and len(calls) >= stop_after

    items = []
    data = load_image_folder(tiny / "data", 16)
    for item in train(tiny_base(tiny), data, out, TrainSettings(**SETTINGS), resume=resume, should_stop=stop):
        items.append(item)
        if item.step == 3 and stop_after is None:
            shutil.copytree(out / "optimizer", out.parent / f"{out.name}-optimizer-at-3")
    return items


def test_resume_continues_with_the_same_optimizer_state(tiny, tmp_path):
    straight = collect(tiny, tmp_path / "a")
    stopped = collect(tiny, tmp_path / "b", stop_after=3)
    assert [i.step for i in stopped] == [1, 2, 3] and stopped[-1].stopped and stopped[-1].checkpoint is not None
    at_three = mx.load(str(tmp_path / "a-optimizer-at-3" / "optimizer.safetensors"))
    saved = mx.load(str(tmp_path / "b" / "optimizer" / "optimizer.safetensors"))
    assert set(at_three) == set(saved) and saved["step"].item() == 3
    for name in at_three:
        assert mx.allclose(at_three[name], saved[name], rtol=RESUME_TOL, atol=1e-9).item(), name

    resumed = collect(tiny, tmp_path / "b", resume=True)
    assert [i.step for i in resumed] == [4, 5, 6]
    for mine, reference in zip(resumed, straight[3:]):
        assert mine.loss == pytest.approx(reference.loss, rel=RESUME_TOL, abs=1e-7)
        assert mine.lr == reference.lr
    final_a = mx.load(str(tmp_path / "a" / "optimizer" / "optimizer.safetensors"))
    final_b = mx.load(str(tmp_path / "b" / "optimizer" / "optimizer.safetensors"))
    for name in final_a:
        assert mx.allclose(final_a[name], final_b[name], rtol=RESUME_TOL, atol=1e-9).item(), name
    weights_a = mx.load(str(tmp_path / "a" / "model" / "flow" / "model.safetensors"))
    weights_b = mx.load(str(tmp_path / "b" / "model" / "flow" / "model.safetensors"))
    assert all(mx.allclose(weights_a[k], weights_b[k], rtol=RESUME_TOL, atol=1e-8).item() for k in weights_a)
    state = json.loads((tmp_path / "b" / "optimizer" / "state.json").read_text())
    assert state["step"] == 6


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_writes_a_checkpoint_that_resume_finishes(tiny, tmp_path, capsys, monkeypatch, signum):
    real = train_command.train_model

    def interrupted(*args, **kwargs):
        for item in real(*args, **kwargs):
            if item.step == 2:
                signal.raise_signal(signum)
            yield item

    monkeypatch.setattr(train_command, "train_model", interrupted)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 8, "--sample-every", 0))
    assert code == 130, err
    assert "stopped at step 3" in err and f"--resume {out}" in err
    assert json.loads((out / "model" / "manifest.json").read_text())["training"]["step"] == 3
    load_flow(out / "model")
    monkeypatch.setattr(train_command, "train_model", real)
    code, err = run_cli(capsys, *[a if a != "--out" else "--resume" for a in train_args(tiny, out, "--steps", 8, "--sample-every", 0)])
    assert code == 0, err
    assert json.loads((out / "model" / "manifest.json").read_text())["training"]["step"] == 8


WRITES = [(Path, "write_text"), (Path, "mkdir"), (Path, "rename"), (os, "replace"), (os, "symlink"), (shutil, "rmtree"),
          (mx, "save_safetensors"), (tempfile, "mkdtemp")]
"""Every way a checkpoint touches the disk: the test interrupts each call in turn."""


def test_a_checkpoint_interrupted_at_any_write_leaves_a_resumable_run(tiny, tmp_path, monkeypatch):
    """Ctrl-C twice (or a kill) may land anywhere in a checkpoint: the run must resume from the
    previous or the new checkpoint and end with the weights of an uninterrupted run."""
    collect(tiny, tmp_path / "straight")
    final = mx.load(str(tmp_path / "straight" / "model" / "flow" / "model.safetensors"))
    stopped = tmp_path / "stopped"
    collect(tiny, stopped, stop_after=3)
    calls = {"armed": False, "count": 0, "fail_at": 0}

    def counted(original):
        def write(*args, **kwargs):
            if calls["armed"]:
                calls["count"] += 1
                if calls["count"] == calls["fail_at"]:
                    raise KeyboardInterrupt
            return original(*args, **kwargs)
        return write

    for owner, name in WRITES:
        monkeypatch.setattr(owner, name, counted(getattr(owner, name)))
    real_save = train_module.save_checkpoint

    def save(out, model, optimizer, state, *rest):
        calls["armed"] = state["step"] == 6
        try:
            return real_save(out, model, optimizer, state, *rest)
        finally:
            calls["armed"] = False

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    fail_at = 0
    while True:
        fail_at += 1
        run = tmp_path / f"run-{fail_at}"
        shutil.copytree(stopped, run, symlinks=True)
        calls.update(count=0, fail_at=fail_at)
        try:
            collect(tiny, run, resume=True)
        except KeyboardInterrupt:
            pass
        else:
            break
        calls["fail_at"] = 0
        step = read_run_state(run)["step"]
        assert step in (3, 6), fail_at
        if step == 3:
            assert [item.step for item in collect(tiny, run, resume=True)] == [4, 5, 6]
        weights = mx.load(str(run / "model" / "flow" / "model.safetensors"))
        assert all(mx.allclose(final[k], weights[k], rtol=RESUME_TOL, atol=1e-8).item() for k in final), fail_at
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "a temporary was left behind"
    assert fail_at > 20, f"only {fail_at - 1} write points were exercised"


def test_a_killed_checkpoints_temporaries_are_removed_by_the_next(tiny, tmp_path):
    out = tmp_path / "run"
    collect(tiny, out, stop_after=3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / "checkpoints" / f".step-000006.tmp-{dead.pid}-x1y2z3"
    (leftover / "model").mkdir(parents=True)
    live = out / "checkpoints" / f".step-000006.tmp-{os.getpid()}-inuse"
    live.mkdir()
    collect(tiny, out, resume=True)
    assert not leftover.exists() and live.exists(), "only temporaries of dead processes go"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [live.name, "step-000006"]
    assert os.readlink(out / "latest") == "checkpoints/step-000006"


def test_force_starts_over_only_in_a_run_folder(tiny, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("years of work")
    code, err = run_cli(capsys, *train_args(tiny, mine, "--steps", 1, "--sample-every", 0, "--force"))
    assert_clean_failure(code, err, "not a training run folder", "--force will not")
    assert (mine / "notes" / "thesis.txt").read_text() == "years of work" and not (mine / "run.json").exists()
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny, run, "--steps", 2, "--sample-every", 0))[0] == 0
    (run / "keep.txt").write_text("mine")
    assert run_cli(capsys, *train_args(tiny, run, "--steps", 1, "--sample-every", 0, "--force"))[0] == 0
    assert json.loads((run / "model" / "manifest.json").read_text())["training"]["step"] == 1
    assert (run / "keep.txt").read_text() == "mine" and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]


# ---- text-conditioned latent models (the tiny fixture T5 + flow + VAE) ------------------------------


def test_fine_tuning_a_text_to_image_model(fixtures_dir, tmp_path, capsys):
    sf = fixtures_dir / "starflow"
    model = convert_model(sf / "model.pth", sf / "config.yaml", tmp_path / "t2i", text_encoder=fixtures_dir / "t5",
                          vae=fixtures_dir / "vae")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    captions = ["a red circle", "a blue square on grey", "yellow triangle", "green"]
    lines = []
    for i in range(8):
        Image.fromarray(render(1, i, size=64).transpose(1, 2, 0)).save(data / "images" / f"{i}.png")
        lines.append(f"images/{i}.png\t{captions[i % 4]}\n")
    (data / "captions.tsv").write_text("".join(lines))
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", data, "--init", model, "--out", out, "--steps", 3, "--batch-size", 4,
                        "--lr", 1e-4, "--heldout", 0.25, "--sample-every", 3)
    assert code == 0, err
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["components"] == ["flow", "text_encoder", "vae"]
    assert manifest["training"]["parent"]["parent"] == str(model.resolve())
    assert math.isfinite(manifest["training"]["heldout_bits_per_dim"]) and "heldout_bits_per_dim_8bit" not in manifest["training"]
    base = fine_tune_base(load_model_folder(out / "model"))
    assert isinstance(base.condition, TextEncoder) and base.vae is not None
    assert Image.open(out / "samples" / "step-000003.png").size == (4 * 66 + 2, 66 + 2)


# ---- bad input ---------------------------------------------------------------------------------------


def assert_clean_failure(code, err, *fragments):
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_unreadable_images_are_skipped_and_counted(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    (data / "images" / "000001.png").write_bytes(b"not a png")
    args = train_args(tiny, tmp_path / "run", "--steps", 1, "--sample-every", 0)
    args[1] = data
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "skipped 1 unreadable image" in err
    assert json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())["training"]["skipped_images"] == 1
    for png in (data / "images").glob("*.png"):
        png.write_bytes(b"broken")
    out = tmp_path / "none"
    code, err = run_cli(capsys, "train", data, "--config", tiny / "tiny.yaml", "--out", out)
    assert_clean_failure(code, err, "could be read")
    assert not out.exists()


def test_mixed_sizes_are_resized_then_centre_cropped():
    wide = np.zeros((3, 16, 48), np.uint8)
    wide[0, :, :16], wide[1, :, 16:32], wide[2, :, 32:] = 255, 255, 255
    square = fit_square(wide, 8)
    assert square.shape == (3, 8, 8)
    assert square[1].min() > 200 and square[0].max() < 60 and square[2].max() < 60, "the centre third survives"
    exact = np.random.RandomState(0).randint(0, 256, (3, 8, 8)).astype(np.uint8)
    assert fit_square(exact, 8) is exact
    assert fit_square(np.zeros((3, 4, 6), np.uint8), 8).shape == (3, 8, 8)


@pytest.mark.parametrize("case", ["empty", "missing_image", "no_captions", "bad_line", "unknown_class", "both_sources", "no_output", "big_batch"])
def test_bad_input_fails_in_one_line_and_writes_nothing(tiny, tmp_path, capsys, case):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    out = tmp_path / "run"
    args = train_args(tiny, out, "--steps", 2)
    args[1] = data
    expected = {"empty": "is empty", "missing_image": "ghost.png", "no_captions": "no captions file",
                "bad_line": "line 1 has no tab", "unknown_class": "purple star", "both_sources": "exactly one",
                "no_output": "exactly one", "big_batch": "larger than"}[case]
    if case == "empty":
        shutil.rmtree(data)
        data.mkdir()
    elif case == "missing_image":
        with open(data / "captions.tsv", "a") as f:
            f.write("images/ghost.png\tred circle\n")
    elif case == "no_captions":
        (data / "captions.tsv").unlink()
    elif case == "bad_line":
        (data / "captions.tsv").write_text("images/000000.png red circle\n")
    elif case == "unknown_class":
        model = tmp_path / "model"
        assert run_cli(capsys, *train_args(tiny, tmp_path / "first", "--steps", 1, "--sample-every", 0))[0] == 0
        shutil.copytree(tmp_path / "first" / "model", model)
        with open(data / "captions.tsv", "a") as f:
            f.write("images/000000.png\tpurple star\n")
        args = ["train", data, "--init", model, "--out", out, "--steps", 2, "--batch-size", 8]
    elif case == "both_sources":
        args += ["--init", tiny]
    elif case == "no_output":
        args.remove("--out")
        args.remove(out)
    elif case == "big_batch":
        args += ["--batch-size", 100]
    code, err = run_cli(capsys, *args)
    assert_clean_failure(code, err, expected)
    assert not out.exists()


def test_resume_refuses_another_config_and_changes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny, out, "--steps", 2, "--sample-every", 0))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    wide = train_args(tiny, out, "--steps", 4, "--sample-every", 0)
    wide[wide.index("--out")] = "--resume"
    wide[wide.index(tiny / "tiny.yaml")] = tiny / "wide.yaml"
    code, err = run_cli(capsys, *wide)
    assert_clean_failure(code, err, "different flow config", "channels")
    other_lr = train_args(tiny, out, "--steps", 4, "--sample-every", 0, "--lr", 1e-2)
    other_lr[other_lr.index("--out")] = "--resume"
    code, err = run_cli(capsys, *other_lr)
    assert_clean_failure(code, err, "different settings", "lr")
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 4))
    assert code == 1 and "--resume" in err
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    no_checkpoint = train_args(tiny, nothing, "--steps", 4)
    no_checkpoint[no_checkpoint.index("--out")] = "--resume"
    code, err = run_cli(capsys, *no_checkpoint)
    assert_clean_failure(code, err, "holds no training checkpoint")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_quantised_parent_is_refused(fixtures_dir, tmp_path):
    sf = fixtures_dir / "starflow" / "label_model"
    model = convert_model(sf / "model.pth", sf / "config.yaml", tmp_path / "q", quantize=8)
    with pytest.raises(ConfigError, match="quantised"):
        fine_tune_base(load_model_folder(model))


def test_new_models_start_close_to_the_identity(tiny):
    flow: StarFlow = tiny_base(tiny).flow
    for block in flow.blocks:
        assert mx.all(block.proj_out.weight == 0).item()
    again = tiny_base(tiny).flow
    assert mx.array_equal(flow.blocks[0].sos, again.blocks[0].sos)
    assert not mx.array_equal(flow.blocks[0].sos, tiny_base(tiny, seed=1).flow.blocks[0].sos)


# ---- hostile run folders, interruptions during setup, concurrent runs -----------------------------


DEEP_JSON = "[" * 200_000 + "]" * 200_000


def test_force_refuses_a_run_marker_nested_too_deep(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(DEEP_JSON)
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 1, "--sample-every", 0, "--force"))
    assert_clean_failure(code, err, "not a training run folder", "--force will not")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "run.json"] and (out / "run.json").read_text() == DEEP_JSON


def test_force_refuses_a_fifo_run_marker_without_waiting(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "run.json")
    script = "import sys; from mlx_starflow.app.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [str(a) for a in train_args(tiny, out, "--steps", 1, "--sample-every", 0, "--force")]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert_clean_failure(done.returncode, done.stderr, "not a training run folder")
    assert [p.name for p in out.iterdir()] == ["run.json"] and (out / "run.json").is_fifo()


def test_an_interruption_during_setup_stops_at_once_and_cleans_up(tiny, tmp_path, capsys, monkeypatch):
    """SIGTERM before the first step stops the run there (no step, no checkpoint), and the new run
    folder goes again: the same command can simply be run again."""
    real = train_module.encode_conditions

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "encode_conditions", interrupted)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 2, "--sample-every", 0))
    assert code == 130, err
    assert "stopped at step" not in err and not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the interrupt handler is restored"


def test_a_second_run_into_a_folder_in_use_is_refused(tiny, tmp_path, capsys):
    """Two runs started into the same new --out: the folder is claimed under a lock, so the one that
    comes second refuses instead of writing beside the first."""
    out = tmp_path / "run"
    with claimed_run(out, lambda: check_new_run(out, force=False)):
        for extra in ((), ("--force",)):
            code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 1, "--sample-every", 0, *extra))
            assert_clean_failure(code, err, f"{out} is in use by another training run")
        code, err = run_cli(capsys, *[a if a != "--out" else "--resume" for a in train_args(tiny, out, "--steps", 1)])
        assert code == 1, err
        assert [p.name for p in out.iterdir()] == [".run.lock"], "the first run's folder is left to it"
    code, err = run_cli(capsys, *train_args(tiny, out, "--steps", 1, "--sample-every", 0))
    assert code == 0, err


def test_the_loser_of_a_claim_race_refuses(tiny, tmp_path, monkeypatch):
    """Both runs found the folder free; the second to take the lock sees the first's lock held."""
    out = tmp_path / "run"
    taken = []

    def first_run_claims_meanwhile() -> None:
        if not taken:  # between this run's first check and its lock, another run takes the folder
            taken.append(claimed_run(out, lambda: None))
            taken[0].__enter__()

    with pytest.raises(OutputExists, match="in use by another training run"):
        with claimed_run(out, first_run_claims_meanwhile):
            pytest.fail("both runs went on")
    assert out.is_dir(), "the first run's folder stays"
    taken[0].__exit__(None, None, None)


@pytest.mark.parametrize("args,fragment", [
    (("--steps", -5), "--steps must be at least 1, got -5"),
    (("--lr", -1), "--lr must be 0 or more, got -1.0"),
    (("--batch-size", 0), "--batch-size must be at least 1"),
    (("--min-lr", 1), "--min-lr must not exceed --lr"),
    (("--checkpoint-every", -1), "--checkpoint-every must be 0 or more"),
])
def test_bad_settings_name_their_option(tiny, tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(tiny, out, *args))
    assert_clean_failure(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("entry", ["../outside.png", "{root}/outside.png", "/etc/passwd", "images/link.png"])
def test_captions_naming_files_outside_the_data_folder_are_refused_unread(tiny, tmp_path, capsys, monkeypatch, entry):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    shutil.copyfile(data / "images" / "000000.png", tmp_path / "outside.png")
    (data / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    entry = entry.format(root=tmp_path)
    with open(data / "captions.tsv", "a") as f:
        f.write(f"{entry}\tred circle\n")
    opened = []
    real_read = dataset_module.read_image
    monkeypatch.setattr(dataset_module, "read_image", lambda path, *a, **k: opened.append(path) or real_read(path, *a, **k))
    out = tmp_path / "run"
    args = train_args(tiny, out, "--steps", 1)
    args[1] = data
    code, err = run_cli(capsys, *args)
    assert_clean_failure(code, err, "outside the data folder", entry)
    assert opened == [] and not out.exists()


def test_two_real_runs_into_one_new_folder_never_both_write(tiny, tmp_path):
    out = tmp_path / "run"
    script = "import sys; from mlx_starflow.app.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [str(a) for a in train_args(tiny, out, "--steps", 2, "--sample-every", 0)]
    runs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    results = [(run.returncode, err) for run, err in zip(runs, errors)]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert_clean_failure(1, loser, str(out))
    assert "in use by another training run" in loser or "already exists" in loser, loser
    assert read_run_state(out)["step"] == 2
