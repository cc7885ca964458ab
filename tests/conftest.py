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
