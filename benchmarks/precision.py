"""Reduced-precision conversions vs float32: forward z and sample differences.

Runs on the official tiny fixture model when `../shared/fixtures` is present (else skipped):
each variant is converted from the same checkpoint through `starflow convert` and compared with
the float32 conversion on the same inputs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_starflow.convert.model import convert_model
from mlx_starflow import load_flow

VARIANTS = (
    ("float16", {"dtype": "float16"}),
    ("bfloat16", {"dtype": "bfloat16"}),
    ("8-bit (float16 rest)", {"dtype": "float16", "quantize": 8}),
    ("4-bit (float16 rest)", {"dtype": "float16", "quantize": 4}),
)


def fixtures_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    return Path(os.environ.get("STARFLOW_FIXTURES", default))


def run() -> tuple[str, dict]:
    sf = fixtures_dir() / "starflow"
    if not (sf / "model.pth").is_file():
        return f"### Precision: skipped (no fixtures at {sf})", {}
    inputs = mx.load(str(sf / "inputs.safetensors"))
    lines = ["### Precision vs float32 (official tiny fixture model, |z| ≤ 7.4, |sample| ≤ 9.2)", "",
             "| weights | forward z max diff | sample g0 max diff | sample g2.5 max diff |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="starflow-precision-") as tmp:
        def outputs(name: str, **options) -> tuple[mx.array, mx.array, mx.array]:
            out = Path(tmp) / name.split()[0]
            convert_model(sf / "model.pth", sf / "config.yaml", out, **options)
            flow = load_flow(out)
            z, _ = flow.forward(inputs["x_noisy"], inputs["y"])
            return z, flow.sample(inputs["noise"], inputs["y"]), flow.sample(inputs["noise"], inputs["y_cfg"], guidance=2.5)

        reference = outputs("float32")
        record = {}
        for name, options in VARIANTS:
            diffs = [mx.abs(a - b).max().item() for a, b in zip(outputs(name, **options), reference)]
            record[name] = dict(zip(("forward_z", "sample_g0", "sample_g2.5"), diffs))
            lines.append(f"| {name} | " + " | ".join(f"{d:.2e}" for d in diffs) + " |")
    return "\n".join(lines), {"precision_max_diff": record}
