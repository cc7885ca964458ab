"""The CLI's error contract: a user's mistake or the machine's failure is one `error:` line and
exit 1; anything else is a bug, reported as one `internal error` line that names `--debug`.
Every size and count a user gives is checked against its documented limit before any model is
fetched or any array allocated, and non-finite numbers are refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import mlx_starflow.app.commands.demo_data as demo_data_command
import mlx_starflow.app.commands.generate as generate_command
from mlx_starflow.app.cli import installed_version, main
from mlx_starflow.app.limits import MAX_BATCH, MAX_DEMO_COUNT, MAX_DEMO_SIZE, MAX_IMAGE_SIDE, MAX_IMAGES
from mlx_starflow.errors import InputError, OutputExists, StarFlowError, environment_error
from mlx_starflow.native import NativeCallFailed, call_native
from mlx_starflow.pipeline import StarFlowPipeline
from cli_runs import DEMO, one_error_line, run


def test_a_value_error_from_deep_inside_is_an_internal_error(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("[matmul] Last dimension of first input with shape (1,8) must match second (4,4)")

    monkeypatch.setattr(generate_command, "resolve_model", broken)
    code, _, err = run(capsys, "generate", "cat", "-o", tmp_path / "out")
    assert code == 1
    assert err.startswith("internal error: ValueError: [matmul]") and "--debug" in err, err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="matmul"):
        main(["--debug", "generate", "cat", "-o", str(tmp_path / "out")])


def test_a_value_error_mid_generation_is_an_internal_error_and_writes_nothing(monkeypatch, capsys, tmp_path):
    def broken(self, *args, **kwargs):
        raise ValueError("[reshape] Cannot reshape array of size 48 into shape (1,3,4,5)")

    monkeypatch.setattr(StarFlowPipeline, "decode", broken)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "generate", "red circle", "--model", DEMO, "-W", 8, "-H", 8, "--seed", 0, "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[-1].startswith("internal error: ValueError: [reshape]") and "--debug" in lines[-1], err
    assert "wrote" not in stdout and (not out.exists() or list(out.iterdir()) == [])


@pytest.mark.parametrize("failure,fragments", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"), ["/data/out/model.safetensors", "No space left", "free some disk space"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), ["/ro/x", "Read-only file system", "writable"]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/secret"), ["/root/secret", "Permission denied", "permissions"]),
])
def test_machine_failures_are_user_errors_naming_the_file(monkeypatch, capsys, tmp_path, failure, fragments):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(generate_command, "resolve_model", fail)
    code, _, err = run(capsys, "generate", "cat", "-o", tmp_path / "out")
    one_error_line(code, err, *fragments)


def test_other_os_errors_stay_internal_errors(monkeypatch, capsys, tmp_path):
    def fail(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(generate_command, "resolve_model", fail)
    code, _, err = run(capsys, "generate", "cat", "-o", tmp_path / "out")
    assert code == 1 and err.startswith("internal error: OSError") and "--debug" in err, err


def test_error_types_keep_the_builtin_contracts():
    """Library callers that catch ValueError / FileExistsError keep working."""
    assert issubclass(InputError, ValueError) and issubclass(InputError, StarFlowError)
    assert issubclass(OutputExists, FileExistsError) and issubclass(OutputExists, StarFlowError)
    assert environment_error(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert "x.bin" in str(environment_error(OSError(errno.ENOSPC, "No space left on device", "x.bin")))


@pytest.mark.parametrize("args,fragments", [
    (["generate", "cat", "-W", "100000"], ["--width 100000", f"{MAX_IMAGE_SIDE:,}"]),
    (["generate", "cat", "-H", str(MAX_IMAGE_SIDE + 8)], ["--height", f"{MAX_IMAGE_SIDE:,}"]),
    (["generate", "cat", "-n", "100000000000"], ["--num-images", f"{MAX_IMAGES:,}"]),
    (["generate", "cat", "-b", str(MAX_BATCH + 1)], ["--batch-size", str(MAX_BATCH)]),
    (["generate", "cat", "-g", "nan"], ["--guidance", "finite"]),
    (["generate", "cat", "-g", "inf"], ["--guidance", "finite"]),
    (["generate", "cat", "--jacobi-threshold", "nan"], ["--jacobi-threshold", "finite"]),
    (["score", "none.png", "-W", "100000"], ["--width", f"{MAX_IMAGE_SIDE:,}"]),
    (["demo-data", "{tmp}/dd", "--size", "100000"], ["--size", f"{MAX_DEMO_SIZE:,}"]),
    (["demo-data", "{tmp}/dd", "--count", str(MAX_DEMO_COUNT + 1)], ["--count", f"{MAX_DEMO_COUNT:,}"]),
    (["demo-data", "{tmp}/dd", "--count", "100000", "--size", "1024"], ["GiB", "--count or --size"]),
    (["demo-data", "{tmp}/dd", "--count", "0"], ["--count", "at least 1"]),
    (["export-coreml", "{tmp}/m", "--out", "{tmp}/cm", "--width", "100000"], ["--width", f"{MAX_IMAGE_SIDE:,}"]),
    (["export-coreml", "{tmp}/m", "--out", "{tmp}/cm", "--batch-size", "100000"], ["--batch-size", str(MAX_BATCH)]),
    (["train", "{tmp}/data", "--config", "c.yaml", "--out", "{tmp}/run", "-g", "nan"], ["--guidance", "finite"]),
    (["train", "{tmp}/data", "--config", "c.yaml", "--out", "{tmp}/run", "--lr", "inf"], ["--lr", "finite"]),
    (["train", "{tmp}/data", "--config", "c.yaml", "--out", "{tmp}/run", "--grad-clip", "nan"], ["--grad-clip", "finite"]),
    (["train", "{tmp}/data", "--config", "c.yaml", "--out", "{tmp}/run", "--weight-decay", "-inf"], ["--weight-decay", "finite"]),
])
def test_sizes_and_numbers_are_checked_before_anything_runs(no_model, monkeypatch, capsys, tmp_path, args, fragments):
    def refuse(*a, **k):
        raise AssertionError("the command started before its options were checked")

    monkeypatch.setattr(demo_data_command, "write_demo_data", refuse)
    code, _, err = run(capsys, *[arg.format(tmp=tmp_path) for arg in args], *([] if args[0] != "generate" else ["-o", tmp_path / "out"]))
    one_error_line(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_prompts_that_are_not_utf8_or_not_files(no_model, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", b"caf\xe9".decode("utf-8", "surrogateescape"), "-o", out)
    one_error_line(code, err, "not valid UTF-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    code, _, err = run(capsys, "generate", "-f", latin1, "-o", out)
    one_error_line(code, err, str(latin1), "UTF-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    code, _, err = run(capsys, "generate", "-f", fifo, "-o", out)
    one_error_line(code, err, str(fifo), "not a regular file")
    assert time.monotonic() - started < 5, "a FIFO must be refused, not read"
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:
        f.truncate(64 * 2**20)
    code, _, err = run(capsys, "generate", "-f", huge, "-o", out)
    one_error_line(code, err, str(huge), "MiB")
    code, _, err = run(capsys, "generate", "-f", tmp_path, "-o", out)
    one_error_line(code, err, "not a regular file")
    assert not out.exists()


def test_prompt_given_twice_and_both_prompt_forms_refused(no_model, capsys, tmp_path):
    code, _, err = run(capsys, "generate", "cat", "--prompt", "dog", "-o", tmp_path / "out")
    one_error_line(code, err, "PROMPT", "--prompt")


def test_prompt_option_is_the_positional_prompt(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--prompt", "red circle", "--model", DEMO, "--seed", "0", "--sequential",
                         "-o", tmp_path / "option.png")
    assert code == 0, err
    code, out, err = run(capsys, "generate", "red circle", "--model", DEMO, "--seed", "0", "--sequential",
                         "-o", tmp_path / "positional.png")
    assert code == 0, err
    assert (tmp_path / "option.png").read_bytes() == (tmp_path / "positional.png").read_bytes()


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.startswith(f"starflow {installed_version()} (mlx ") and not err


def test_a_native_panic_is_one_error_and_prints_nothing(capfd, tmp_path):
    """pyo3 panics derive from BaseException and Rust writes their backtrace to fd 2 itself."""
    from tokenizers import Tokenizer

    damaged = tmp_path / "tokenizer.json"
    damaged.write_text('{"version": "1.0", "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}, '
                       '"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]], "unk_id": 0}}')
    with pytest.raises(NativeCallFailed, match="precompiled_charsmap"):
        call_native(Tokenizer.from_file, str(damaged))
    captured = capfd.readouterr()
    assert "panicked" not in captured.err and "backtrace" not in captured.err, captured.err


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """SIGTERM during demo-data: exit 130 as for Ctrl-C, and no temporary folder or partial output is left."""
    out = tmp_path / "data"
    command = [sys.executable, "-c", "import sys; from mlx_starflow.app.cli import run; sys.argv[0] = 'starflow'; run()",
               "demo-data", str(out), "--count", str(MAX_DEMO_COUNT), "--size", "8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not any(tmp_path.iterdir()) and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert list(tmp_path.iterdir()) == [], "the temporary folder must be removed"


def test_convert_with_a_tokenizer_that_makes_the_library_panic(fixtures_dir, tmp_path, capfd):
    text_encoder = tmp_path / "t5"
    shutil.copytree(fixtures_dir / "t5", text_encoder)
    tokenizer = json.loads((text_encoder / "tokenizer.json").read_text())
    tokenizer["normalizer"]["precompiled_charsmap"] = "AAAA"
    (text_encoder / "tokenizer.json").write_text(json.dumps(tokenizer))
    starflow = fixtures_dir / "starflow"
    out = tmp_path / "model"
    code = main(["convert", str(starflow / "model.pth"), "--config", str(starflow / "config.yaml"), "--out", str(out),
                 "--text-encoder", str(text_encoder), "--vae", str(fixtures_dir / "vae")])
    err = capfd.readouterr().err
    one_error_line(code, err, str(text_encoder / "tokenizer.json"), "cannot be read as a tokenizer")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["t5"]
