"""What the command-line tests share: running `starflow` in this process, and the rule every
refused input must follow (exit 1, one `error:` line, no traceback)."""

from __future__ import annotations

from pathlib import Path

from mlx_starflow.app.cli import main

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
"""The shipped demo model: small enough for a real generation inside a test."""


def run(capsys, *args) -> tuple[int, str, str]:
    """`starflow ARGS` (each argument str()-ed): exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit 1 with a single `error: …` line on stderr that names every fragment."""
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, err
