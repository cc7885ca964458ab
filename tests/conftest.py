"""Shared test set-up: where the official-code fixtures live.

The fixtures are outputs of the official PyTorch implementation, kept beside the repository in
`../shared/fixtures`; `STARFLOW_FIXTURES` points elsewhere.
"""

import os
from pathlib import Path

import mlx.core as mx
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("STARFLOW_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()

mx.set_default_device(mx.cpu)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES}; put ../shared beside the repository or set STARFLOW_FIXTURES")
    return FIXTURES


@pytest.fixture(scope="session")
def cli_models(fixtures_dir, tmp_path_factory) -> Path:
    """The fixture checkpoints converted once per session by `starflow convert`: `text` (tiny
    T5 + flow + VAE, a 64×64 text-to-image model) and `label` (the 16×16 pixel label model).
    Tests only read them."""
    from mlx_starflow.app.cli import main

    root, sf = tmp_path_factory.mktemp("cli_models"), fixtures_dir / "starflow"
    assert main(["convert", str(sf / "model.pth"), "--config", str(sf / "config.yaml"), "--out", str(root / "text"),
                 "--text-encoder", str(fixtures_dir / "t5"), "--vae", str(fixtures_dir / "vae")]) == 0
    assert main(["convert", str(sf / "label_model" / "model.pth"), "--config", str(sf / "label_model" / "config.yaml"),
                 "--out", str(root / "label")]) == 0
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Fetching, converting or loading a model fails the test: every command must check its
    input first (on the default model a late check costs a 27 GB download)."""
    from mlx_starflow.app.commands import edit, generate, interpolate, invert, rank, score, vary

    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the input was checked")

    monkeypatch.setattr(generate, "resolve_model", refuse)
    monkeypatch.setattr(generate, "load", refuse)
    for command in (score, rank, invert, edit, vary, interpolate):
        monkeypatch.setattr(command, "load_pipeline", refuse)
