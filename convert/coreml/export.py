"""`export_coreml(model_dir, out, ...)`: a converted model folder → a folder of Core ML packages.

Built directly from our converted weights with the MIL builder; no PyTorch. Everything is
checked before anything is built, the packages are written into a temporary folder that
becomes `out` only when complete, and `manifest.json` (the contract with the Swift package)
is written last.
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_starflow.config import FlowConfig, VAEConfig
from mlx_starflow.errors import ConfigError
from mlx_starflow.model_folder import ModelParts, load_model_folder
from mlx_starflow.model_io import atomic_folder, check_output_folder
from mlx_starflow.samplers import Jacobi, Sequential
from mlx_starflow.text_encoder import TOKENIZER_FILE

from .builder import PRECISIONS
from .compress import COMPRESSIONS, PALETTE_GROUP, PALETTES, WeightCompression
from .coremltools_api import TARGETS, ct, quiet
from .flow import (
    COTANGENT,
    FORWARD,
    HIDDEN_COTANGENT,
    KV_CACHE_MODES,
    POSITION,
    PREFILL,
    SCALE_LOGIT,
    SHIFT,
    TEXT,
    TOKENS,
    TOKENS_COTANGENT,
    VJP,
    Z,
    BlockPlan,
    block_programs,
    cache_names,
    io_name,
    step_name,
    updated_name,
    weight_bytes,
)
from .flow_graph import ATTENTION_LAYOUTS, block_arrays, rope_table
from .manifest import FORMAT, LICENSE, write_manifest
from .package import HIDDEN_IN, HIDDEN_OUT, PackageInfo, group_layers, package_weight_bytes, save_package
from .step_tables import MASK, ROPE_COS, ROPE_SIN, StepTables, table_file
from .text_encoder import ATTENTION_MASK, INPUT_IDS, TEXT_STATES, text_encoder_program
from .text_encoder import weight_bytes as text_weight_bytes
from .vae import IMAGE, LATENT, decoder_program, encoder_program

log = logging.getLogger(__name__)

IOS_PACKAGE_LIMIT = 1_000_000_000
"""Weight bytes per package on iOS (see `package.group_layers`)."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float16"
    compress: str | None = None
    attention: str = "original"
    target: str = "macOS15"
    height: int | None = None
    width: int | None = None
    jacobi_block_sizes: tuple[int, ...] = (16,)
    batch_size: int = 1
    score_step: bool = True
    vae_encoder: bool = False
    kv_cache: str = "state"
    max_package_bytes: float | None = None
    compile: bool = False
    state_fallback: bool = False
    step_tables: bool = False
    palette_group_size: int = PALETTE_GROUP

    def check(self) -> None:
        """Every option a user can get wrong, as a one-line `ConfigError` naming the fix."""
        choices = {"dtype": (self.dtype, tuple(PRECISIONS)), "attention": (self.attention, ATTENTION_LAYOUTS),
                   "target": (self.target, tuple(TARGETS)), "kv_cache": (self.kv_cache, KV_CACHE_MODES)}
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"--{option.replace('_', '-')} must be one of {', '.join(allowed)}, not {value!r}")
        if self.compress is not None and self.compress not in COMPRESSIONS:
            raise ConfigError(f"--compress must be one of {', '.join(COMPRESSIONS)} (or omitted), not {self.compress!r}")
        if self.palette_group_size < 1:
            raise ConfigError(f"--palette-group-size must be at least 1, not {self.palette_group_size}")
        if not self.jacobi_block_sizes or min(self.jacobi_block_sizes) < 1:
            raise ConfigError(f"--jacobi-block-size must be at least 1, not {list(self.jacobi_block_sizes)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, not {self.batch_size}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be positive, not {value}")
        if self.compile and platform.system() != "Darwin":
            raise ConfigError(f"--compile needs the Core ML compiler, which only macOS has (this is {platform.system()}); "
                              "export here without it and compile on a Mac, or let the app compile once (the Swift package caches it)")
        if self.score_step and self.attention != "original":
            raise ConfigError(f"--attention {self.attention} cannot carry the score-step gradient in the flow blocks; "
                              "pass --no-score-step (decode without the denoise) or use --attention original")

    @property
    def package_limit(self) -> float | None:
        if self.max_package_bytes is not None:
            return self.max_package_bytes
        return IOS_PACKAGE_LIMIT if self.target.startswith("iOS") else None


def image_size(config: FlowConfig, options: ExportOptions) -> tuple[int, int]:
    """(height, width) in pixels: the training size unless given; divisible by the VAE factor × patch."""
    height, width = options.height or config.image_side, options.width or config.image_side
    unit = config.size_multiple
    if height % unit or width % unit:
        raise ConfigError(
            f"image size {width}x{height} is not divisible by {unit} (VAE factor {config.vae_factor} × patch size "
            f"{config.patch_size}); pick --width and --height that are multiples of {unit}"
        )
    return height, width


def check_palette_groups(parts: ModelParts, options: ExportOptions) -> None:
    """A palette's group of output channels must divide every compressed kernel's output width
    (checked before anything is built: coremltools would silently skip such a kernel)."""
    if options.compress not in PALETTES:
        return
    widths = {"flow width": parts.config.channels}
    if parts.text_encoder is not None:
        t5 = parts.text_encoder.encoder.config
        widths.update({"text encoder width": t5.d_model, "text encoder MLP width": t5.d_ff, "text encoder heads × head width": t5.num_heads * t5.d_kv})
    for name, width in widths.items():
        if width % options.palette_group_size:
            raise ConfigError(f"--palette-group-size {options.palette_group_size} does not divide the {name} ({width}); "
                              f"pick a group size that divides it (16 or 32 for the released model)")


def export_coreml(
    model_dir: str | Path,
    out: str | Path,
    dtype: str = "float16",
    compress: str | None = None,
    attention: str = "original",
    target: str = "macOS15",
    width: int | None = None,
    height: int | None = None,
    jacobi_block_sizes: tuple[int, ...] = (16,),
    batch_size: int = 1,
    score_step: bool = True,
    vae_encoder: bool = False,
    force: bool = False,
    kv_cache: str = "state",
    max_package_bytes: float | None = None,
    compile: bool = False,
    state_fallback: bool = False,
    step_tables: bool = False,
    palette_group_size: int = PALETTE_GROUP,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Export a converted model folder to Core ML packages in `out` (see the module docstring).

    `jacobi_block_sizes` adds a step function per Jacobi chunk size (next to the 1-token step);
    `batch_size` is the number of images per flow-block call (rows: batch_size, or twice that
    in the guided deep block). `kv_cache="io"` (caches as inputs/outputs instead of float16 state) and
    `max_package_bytes` exist for numerical checks and tests; the defaults are what the Swift
    package runs. `compile` (macOS only) also writes each package compiled, as `<name>.mlmodelc`
    beside it, for an app to bundle. `state_fallback` adds every sampling function a twin with
    the caches as inputs/outputs (`cache_io` in the manifest), which the Swift package uses when
    a device refuses one Core ML state shared by several functions. `step_tables` makes the step
    functions take their RoPE rows and causal mask as inputs (no runtime gather, for the Neural
    Engine), with each block's table written beside the packages. `palette_group_size` is the
    number of output channels sharing one lookup table when `compress` is a palette.
    """
    options = ExportOptions(dtype, compress, attention, target, height, width, tuple(jacobi_block_sizes), batch_size,
                            score_step, vae_encoder, kv_cache, max_package_bytes, compile, state_fallback, step_tables,
                            palette_group_size)
    options.check()
    out = Path(out)
    check_output_folder(out, force, FORMAT)
    parts = load_model_folder(model_dir, decoder=False)
    height_px, width_px = image_size(parts.config, options)
    check_palette_groups(parts, options)
    exporter = _Exporter(parts, options, height_px, width_px, progress)
    with atomic_folder(out, force=force, kind=FORMAT) as tmp:
        exporter.write(tmp)
    return out


class _Exporter:
    """Writes the packages and the manifest of one export."""

    def __init__(self, parts: ModelParts, options: ExportOptions, height: int, width: int,
                 progress: Callable[[int, int], None] | None):
        self.parts, self.options = parts, options
        self.config = parts.config
        self.height, self.width = height, width
        self.latent = (height // self.config.vae_factor, width // self.config.vae_factor)
        self.grid = (self.latent[0] // self.config.patch_size, self.latent[1] // self.config.patch_size)
        self.text_length = self.config.txt_size if parts.flow.blocks[-1].has_text else 0
        self.progress = progress
        self.plans = [self._plan(i) for i in range(self.config.num_blocks)]
        with_encoder = options.vae_encoder and parts.vae is not None and parts.vae.config.has_encoder
        self.total = (sum(len(p.layer_groups) for p in self.plans) + (parts.text_encoder is not None)
                      + (parts.vae is not None) + with_encoder)
        self.done = 0

    def info(self, description: str, compressed: bool = True, **extra: str) -> PackageInfo:
        """Package metadata; the VAE is never compressed."""
        o = self.options
        return PackageInfo(self.parts.folder.path.name, self.parts.folder.source_sha256, LICENSE, (self.height, self.width),
                           self.text_length, o.dtype, o.compress if compressed else None, o.attention, o.target, description, extra,
                           o.palette_group_size)

    def _advance(self, name: str) -> None:
        self.done += 1
        log.info("wrote %s", name)
        if self.progress:
            self.progress(self.done, self.total)

    def _plan(self, index: int) -> BlockPlan:
        block = self.parts.flow.blocks[index]
        tokens = self.grid[0] * self.grid[1]
        samplers = [Sequential(), *(Jacobi(size) for size in self.options.jacobi_block_sizes)]
        chunks = tuple(sorted({sampler.chunk(tokens) for sampler in samplers}))
        per_layer, outside = weight_bytes(self.config, self.options.dtype, self.options.compress)
        groups = group_layers(self.config.layers_per_block[index], per_layer, outside, self.options.package_limit)
        rows = self.options.batch_size * (2 if block.has_text else 1)
        return BlockPlan(index, block.flipped, block.has_text, rows, self.grid,
                         self.text_length if block.has_text else 0, chunks, groups, score=self.options.score_step,
                         step_tables=self.options.step_tables, cache_io=self.options.state_fallback and self.options.kv_cache == "state")

    def write(self, folder: Path) -> None:
        manifest: dict[str, Any] = {
            "model": {"name": self.parts.folder.path.name, "source_sha256": self.parts.folder.source_sha256, "license": LICENSE},
            "precision": self.options.dtype, "compression": self.options.compress,
            **({"palette_group_size": self.options.palette_group_size} if self.options.compress in PALETTES else {}),
            "attention": self.options.attention, "target": self.options.target, "kv_cache": self.options.kv_cache,
            "batch": self.options.batch_size,
            "image": {"height": self.height, "width": self.width, "channels": self._image_channels()},
            "latent": {"channels": self.config.in_channels, "height": self.latent[0], "width": self.latent[1],
                       "patch_size": self.config.patch_size},
            "condition": self._condition(folder),
            "text_encoder": self._text_encoder(folder),
            "flow": {"use_softplus": self.config.use_softplus, "noise_std": self.config.noise_std,
                     "blocks": [self._block(folder, plan) for plan in self.plans]},
            "score_step": self._score_step(),
            "vae": self._vae(folder),
        }
        manifest["weight_bytes"] = {p.name: package_weight_bytes(p) for p in sorted(folder.glob("*.mlpackage"))}
        if self.options.compile:
            for package in sorted(folder.glob("*.mlpackage")):
                with quiet():
                    ct.utils.compile_model(str(package), str(package.with_suffix(".mlmodelc")))
        write_manifest(folder, manifest)

    def _image_channels(self) -> int:
        return self.parts.vae.config.out_channels if self.parts.vae else self.config.in_channels

    def _condition(self, folder: Path) -> dict[str, Any] | None:
        if self.parts.labels is not None:
            labels = list(self.parts.labels.labels)
            return {"kind": "labels", "length": 1, "dim": len(labels) + 1, "labels": labels}
        if self.parts.text_encoder is None:
            return None
        shutil.copyfile(self.parts.folder.path / "text_encoder" / TOKENIZER_FILE, folder / TOKENIZER_FILE)
        return {"kind": "text", "length": self.text_length, "dim": self.config.txt_dim, "tokenizer": TOKENIZER_FILE}

    def _text_encoder(self, folder: Path) -> dict[str, Any] | None:
        encoder = self.parts.text_encoder
        if encoder is None:
            return None
        config = encoder.encoder.config
        per_layer, outside = text_weight_bytes(config, self.options.dtype, self.options.compress)
        groups = group_layers(config.num_layers, per_layer, outside, self.options.package_limit)
        names = ["TextEncoder.mlpackage"] if len(groups) == 1 else [f"TextEncoder_{i}.mlpackage" for i in range(len(groups))]
        threshold = {"linear": config.d_model * config.d_model - 1}
        for name, layers in zip(names, groups):
            program = text_encoder_program(encoder.encoder, self.text_length, self.options.dtype, layers)
            save_package({"main": program}, folder / name, self.info("T5 encoder: token ids and mask → masked text states", layers=_span(layers)), threshold)
        self._advance("TextEncoder")
        return {"package": names[0], "packages": names, "hidden": {"input": HIDDEN_IN, "output": HIDDEN_OUT},
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK}, "output": TEXT_STATES}

    def _block(self, folder: Path, plan: BlockPlan) -> dict[str, Any]:
        arrays = block_arrays(self.parts.flow, plan.index)
        compression = (WeightCompression(self.options.compress, self.config.channels * self.config.channels - 1,
                                         self.options.palette_group_size) if self.options.compress else None)
        names = ([f"FlowBlock{plan.index}.mlpackage"] if len(plan.layer_groups) == 1
                 else [f"FlowBlock{plan.index}_{g}.mlpackage" for g in range(len(plan.layer_groups))])
        for group, name in enumerate(names):
            programs = block_programs(self.config, arrays, plan, group, self.options.attention, self.options.dtype,
                                      self.options.kv_cache, compression)
            description = f"STARFlow block {plan.index}: cached step over a chunk of tokens at a position"
            if plan.score:
                description += "; forward and vjp of the score-step denoise"
            save_package(programs, folder / name, self.info(description, block=str(plan.index), layers=_span(plan.layer_groups[group])))
            self._advance(name)
        entry: dict[str, Any] = {
            "index": plan.index, "package": names[0], "packages": names, "flipped": plan.flipped, "has_text": plan.has_text,
            "rows": plan.rows, "tokens": plan.tokens, "token_channels": self.config.token_channels,
            "text_length": plan.text_length, "cache_length": plan.cache_length,
            "sos": [float(v) for v in arrays["sos"].reshape(-1)],
            "functions": {"step": {str(n): step_name(n) for n in plan.chunk_sizes}, **({"prefill": PREFILL} if plan.has_text else {}),
                          **({"forward": FORWARD, "vjp": VJP} if plan.score else {})},
            "inputs": {"tokens": TOKENS, "position": POSITION, **({"text": TEXT} if plan.has_text else {})},
            "outputs": {"scale_logit": SCALE_LOGIT, "shift": SHIFT},
            "hidden": {"input": HIDDEN_IN, "output": HIDDEN_OUT},
            "layers": [list(g) for g in plan.layer_groups],
        }
        if plan.step_tables:
            StepTables(*rope_table(self.config, *plan.grid, plan.text_length, plan.cache_length)).write(folder / table_file(plan.index))
            entry["step_tables"] = {"file": table_file(plan.index), "head_dim": self.config.head_dim,
                                    "inputs": {"rope_cos": ROPE_COS, "rope_sin": ROPE_SIN, "mask": MASK}}
        caches = {name: updated_name(name) for g in plan.layer_groups for layer in g for name in cache_names(layer)}
        if self.options.kv_cache == "io":
            entry["caches"] = caches
        if plan.cache_io:
            functions = entry["functions"]
            entry["cache_io"] = {"functions": {"step": {size: io_name(name) for size, name in functions["step"].items()},
                                               **({"prefill": io_name(PREFILL)} if plan.has_text else {})},
                                 "caches": caches}
        return entry

    def _score_step(self) -> dict[str, Any] | None:
        """Where the score step lives: the `forward`/`vjp` functions of every flow block's packages."""
        if not self.options.score_step:
            return None
        return {"noise_std": self.config.noise_std,
                "inputs": {"tokens": TOKENS, "hidden": HIDDEN_IN, "cotangent": COTANGENT, **({"text": TEXT} if self.text_length else {})},
                "outputs": {"z": Z, "next_hidden": HIDDEN_OUT, "tokens_cotangent": TOKENS_COTANGENT, "hidden_cotangent": HIDDEN_COTANGENT}}

    def _vae(self, folder: Path) -> dict[str, Any] | None:
        vae = self.parts.vae
        if vae is None:
            return None
        config: VAEConfig = vae.config
        save_package({"main": decoder_program(vae, *self.latent, self.options.dtype)}, folder / "VAEDecoder.mlpackage",
                     self.info("SD-VAE decoder: latent / scaling_factor → raw image (clamp to [-1, 1] after)", compressed=False))
        self._advance("VAEDecoder")
        entry = {"package": "VAEDecoder.mlpackage", "scaling_factor": config.scaling_factor, "factor": config.downsample_factor,
                 "input": LATENT, "output": IMAGE, "divide_by_scaling_factor": True}
        if self.options.vae_encoder and config.has_encoder:
            save_package({"main": encoder_program(vae, self.height, self.width, self.options.dtype)}, folder / "VAEEncoder.mlpackage",
                         self.info("SD-VAE encoder: image in [-1, 1] → scaled posterior mean (the flow's latent)", compressed=False))
            self._advance("VAEEncoder")
            entry.update(encoder_package="VAEEncoder.mlpackage", encoder_input=IMAGE, encoder_output=LATENT)
        return entry


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}"
