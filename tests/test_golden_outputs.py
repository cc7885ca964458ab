"""Generated images stay the same image for the same command.

`golden_outputs.json` holds, for a handful of `starflow generate` commands on the shipped demo
model and the tiny fixture models, the SHA-256 of the decoded RGB pixels and the PNG text
metadata, recorded from the code before the sampler, model-folder and weight-map seams were
introduced. A refactor that changes one pixel, or one recorded setting, fails here. Metadata
keys added later (new settings) are allowed; recorded ones must keep their values.

Re-record only for a deliberate change of the images: `STARFLOW_RECORD_GOLDEN=1 pytest
tests/test_golden_outputs.py`, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_starflow.app.cli import main
from cli_runs import DEMO

GOLDEN = Path(__file__).with_name("golden_outputs.json")
RECORD = os.environ.get("STARFLOW_RECORD_GOLDEN") == "1"
JACOBI = ["--jacobi-block-size", "16", "--jacobi-threshold", "1e-3", "--jacobi-max-iter", "32"]

CASES = {
    "demo-sequential": ["generate", "red circle", "--model", "{demo}", "--seed", "0", "--sequential"],
    "demo-jacobi": ["generate", "blue square", "--model", "{demo}", "--seed", "1", "--jacobi", *JACOBI],
    "demo-grid-sequential": ["generate", "--model", "{demo}", "--all-labels", "--grid", "--sequential", "--seed", "0"],
    "text-sequential": ["generate", "a film still of a cat playing piano", "--model", "{text}", "--seed", "42", "--sequential"],
    "text-jacobi": ["generate", "a film still of a cat playing piano", "--model", "{text}", "--seed", "42", "--jacobi", *JACOBI],
    "text-jacobi-unguided": ["generate", "a red panda", "--model", "{text}", "--seed", "5", "--guidance", "0", "--jacobi", *JACOBI],
    "label-jacobi": ["generate", "cat", "--model", "{label}", "--seed", "3", "--jacobi", *JACOBI],
}


@pytest.fixture(scope="module")
def models(cli_models) -> dict[str, Path]:
    return {"demo": DEMO, "text": cli_models / "text", "label": cli_models / "label"}


def fingerprint(path: Path) -> dict:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
        metadata = {key: str(value) for key, value in image.info.items() if isinstance(value, str)}
    return {"pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "shape": list(pixels.shape), "metadata": metadata}


def test_generate_gives_the_recorded_images(models, tmp_path):
    recorded = {} if RECORD else json.loads(GOLDEN.read_text())
    seen = {}
    for name, template in CASES.items():
        out = tmp_path / f"{name}.png"
        args = [arg.format(**{key: str(value) for key, value in models.items()}) for arg in template]
        assert main([*args, "--output", str(out)]) == 0, name
        seen[name] = fingerprint(out)
    if RECORD:
        GOLDEN.write_text(json.dumps(seen, indent=2, sort_keys=True) + "\n")
        pytest.skip("recorded golden outputs")
    for name, expected in recorded.items():
        got = seen[name]
        assert got["shape"] == expected["shape"], name
        assert got["pixels_sha256"] == expected["pixels_sha256"], f"{name}: the image changed"
        changed = {key: (value, got["metadata"].get(key)) for key, value in expected["metadata"].items()
                   if got["metadata"].get(key) != value}
        assert not changed, f"{name}: recorded metadata changed: {changed}"
