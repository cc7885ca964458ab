"""Programs → saved `.mlpackage`s: convert, compress, combine functions, stamp metadata.

Every package gets the same metadata recipe (model name, source checkpoint sha256, image
size, text length, precision, compression, licence note), set after functions are combined
because `save_multifunction` drops user metadata. Functions of one package share weights:
`save_multifunction` stores identical constants once.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_starflow import __version__
from mlx_starflow.errors import ConfigError

from .compress import PALETTE_GROUP, PALETTES, compress_model
from .coremltools_api import TARGETS, Program, ct, quiet

AUTHOR = "mlx-starflow Core ML exporter (weights: Apple STARFlow)"
HIDDEN_IN, HIDDEN_OUT = "hidden", "next_hidden"
"""Hidden states passed from one package of a split model to the next (float32)."""


@dataclass(frozen=True)
class PackageInfo:
    """What every package says about itself, plus per-package extras."""

    model_name: str
    source_sha256: str
    license: str
    image: tuple[int, int]
    text_length: int
    precision: str
    compression: str | None
    attention: str
    target: str
    description: str
    extra: dict[str, str] = field(default_factory=dict)
    palette_group_size: int = PALETTE_GROUP

    def user_metadata(self) -> dict[str, str]:
        return {
            "model_name": self.model_name,
            "source_sha256": self.source_sha256,
            "image_height": str(self.image[0]),
            "image_width": str(self.image[1]),
            "text_length": str(self.text_length),
            "precision": self.precision,
            "compression": self.compression or "none",
            **({"palette_group_size": str(self.palette_group_size)} if self.compression in PALETTES else {}),
            "attention": self.attention,
            "target": self.target,
            "shapes": "fixed: exported for one image size; export again for another",
            "exporter_version": __version__,
            **self.extra,
        }


SKIPPED_PASSES = ("common::fuse_elementwise_to_batchnorm",)
"""coremltools 9 rewrites a per-channel mul+add as batch_norm with variance 1 and epsilon 1e-5,
scaling the result by 1/√(1+1e-5) (a 5e-6 relative error), and the rewrite fails on float16
graphs; the group norms' affine would hit it."""


def convert(program: Program, target: str) -> ct.models.MLModel:
    """MIL program → ML Program model. Precision is already explicit in the ops, so the converter
    runs at float32 and inserts no casts."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(SKIPPED_PASSES))
    with quiet():
        return ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=TARGETS[target],
            compute_precision=ct.precision.FLOAT32,
            pass_pipeline=pipeline,
        )


def save_package(programs: dict[str, Program], path: Path, info: PackageInfo, compress_ops: dict[str, int] | None = None) -> None:
    """Convert and save `programs` (function name → program) as one package at `path`.

    `compress_ops` maps op types to the weight-size threshold above which their weights are
    compressed with `info.compression`; nothing else is compressed.
    """
    models = {}
    for name, program in programs.items():
        model = convert(program, info.target)
        if info.compression and compress_ops:
            model = compress_model(model, info.compression, compress_ops, info.palette_group_size)
        models[name] = model
    if len(models) == 1 and "main" in models:
        _stamp(models["main"], info).save(str(path))
        return
    with tempfile.TemporaryDirectory(prefix="starflow-coreml-") as tmp, quiet():
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            single = Path(tmp) / f"{name}.mlpackage"
            model.save(str(single))
            descriptor.add_function(str(single), src_function_name="main", target_function_name=name)
        descriptor.default_function_name = next(iter(models))
        combined = Path(tmp) / "combined.mlpackage"
        ct.utils.save_multifunction(descriptor, str(combined))
        stamped = _stamp(ct.models.MLModel(str(combined), skip_model_load=True), info)
        stamped.save(str(path))


def _stamp(model: ct.models.MLModel, info: PackageInfo) -> ct.models.MLModel:
    model.author = AUTHOR
    model.license = info.license
    model.version = __version__
    model.short_description = info.description
    metadata = info.user_metadata()
    for key, value in metadata.items():
        model.user_defined_metadata[key] = value
    return model


def package_weight_bytes(path: Path) -> int:
    """Bytes of a package's weight files."""
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0


def group_layers(num_layers: int, per_layer: float, outside: float, limit: float | None) -> tuple[tuple[int, ...], ...]:
    """Consecutive layer groups of near-equal size, each package's weights under `limit`.

    `outside` (embeddings, projections) is counted against every group, since it lands in the
    first or the last one. For iOS, packages stay under 1 GB of weights, as ml-stable-diffusion
    splits its UNet for iPhones and iPads.
    """
    if limit is None or num_layers * per_layer + outside <= limit:
        return (tuple(range(num_layers)),)
    if per_layer + outside > limit:
        raise ConfigError(f"one layer ({per_layer / 1e9:.3f} GB) does not fit the {limit / 1e9:.3f} GB package limit; compress the weights (--compress)")
    per_group = int((limit - outside) // per_layer)
    count = -(-num_layers // per_group)
    bounds = np.linspace(0, num_layers, count + 1).round().astype(int)
    return tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(count))
