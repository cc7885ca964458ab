"""`starflow info`: what is installed and cached, or what one model folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer
from mlx.utils import tree_flatten
from rich.console import Console
from rich.table import Column, Table

from mlx_starflow.convert.hub import cached_repos, converted_models, folder_bytes, hub_cache, models_folder
from mlx_starflow.config import FlowConfig, LabelConfig, T5Config, VAEConfig, read_json_object
from mlx_starflow.errors import ConfigError, InputError, StarFlowError
from mlx_starflow.flow import StarFlow
from mlx_starflow.model_folder import read_model_folder
from mlx_starflow.model_io import MODEL_KIND, folder_kind, read_manifest, verify_folder
from mlx_starflow.pipeline import available_memory
from mlx_starflow.t5 import T5Encoder
from mlx_starflow.vae import VAE

DEMO_MODEL = Path(__file__).resolve().parents[2] / "weights" / "demo"
"""The small demo model of a repository checkout (absent from an installed wheel)."""
LOCAL_WEIGHTS = Path("weights")
"""Where `make convert` and the README's `starflow convert --out weights/…` put models, relative
to the working directory; listed beside the models folder."""

stdout = Console(highlight=False)


def info(
    paths: Optional[list[Path]] = typer.Argument(
        None, help="Model folders to describe, or folders of model folders (such as weights/) to list; "
                   "without any: the models folder, ./weights, the Hugging Face cache and the machine."),
    verify: bool = typer.Option(False, "--verify", help="Check every file of each model folder given against the sha256 "
                                                         "its manifest records (reads all the weights once)."),
) -> None:
    """Show converted models, the Hugging Face cache and the machine, or the parts of the model folders given."""
    if verify and not paths:
        raise InputError("--verify checks the model folders you name, e.g. starflow info --verify weights/starflow-3b")
    if paths:
        for path in paths:
            show_path(path, verify)
        return
    stdout.print(f"mlx {mx.__version__} on {mx.default_device()}, {available_memory() / 2**30:.1f} GiB of memory for generation")
    stdout.print(f"models folder {models_folder()} (STARFLOW_HOME moves it)", soft_wrap=True)
    models = Table(Column("converted model", overflow="fold"), "state", "flow", "size")
    for path, current, size in converted_models():
        models.add_row(path.name, "ready" if current else "stale or incomplete (redone on next use)", flow_summary(path), gigabytes(size))
    if DEMO_MODEL.is_dir():
        models.add_row(str(DEMO_MODEL), "shipped demo", flow_summary(DEMO_MODEL), gigabytes(folder_bytes(DEMO_MODEL)))
    shown = {DEMO_MODEL.resolve()}
    for folder in (LOCAL_WEIGHTS, DEMO_MODEL.parent):
        for path in model_folders_in(folder):
            if path.resolve() not in shown:
                shown.add(path.resolve())
                models.add_row(str(path), model_state(path), flow_summary(path), gigabytes(folder_bytes(path)))
    stdout.print(models if models.row_count else "no converted models yet")
    stdout.print(f"Hugging Face cache {hub_cache()}", soft_wrap=True)
    repos = Table("repository", "state", "size", "snapshot")
    for repo in cached_repos():
        state = "complete" if repo.complete else ("incomplete" if repo.folder else "not downloaded")
        repos.add_row(repo.repo_id, state, gigabytes(repo.bytes) if repo.folder else "", repo.folder.name[:12] if repo.folder else "")
    stdout.print(repos)


def show_path(path: Path, verify: bool) -> None:
    """A model folder is described (and verified); a folder of model folders lists them."""
    inside = model_folders_in(path) if folder_kind(path) is None else []
    if not inside:
        describe_model(path)
        if verify:
            stdout.print(f"verified {path}: {verify_folder(path)} files match the sha256 in their manifests", soft_wrap=True)
        return
    models = Table(Column("model folder", overflow="fold"), "state", "flow", "size", title=str(path), title_justify="left")
    for folder in inside:
        models.add_row(str(folder), model_state(folder), flow_summary(folder), gigabytes(folder_bytes(folder)))
    stdout.print(models)
    for folder in inside if verify else []:
        stdout.print(f"verified {folder}: {verify_folder(folder)} files match the sha256 in their manifests", soft_wrap=True)


def model_folders_in(folder: Path) -> list[Path]:
    """The model folders directly inside `folder` (those our manifest names a model), sorted."""
    if not folder.is_dir():
        return []
    return [path for path in sorted(folder.iterdir()) if path.is_dir() and folder_kind(path) == MODEL_KIND]


def model_state(folder: Path) -> str:
    """"ready", or why the folder cannot be used (a half-written, stale or damaged conversion)."""
    try:
        read_model_folder(folder)
    except StarFlowError as e:
        return f"unusable: {e}"
    return "ready"


def describe_model(folder: Path) -> None:
    """Components with dtype, quantisation, parameters and bytes, the size the model generates,
    and where it came from (converted files, or the training run)."""
    manifest = read_manifest(folder)
    if manifest.get("kind") != MODEL_KIND:
        raise ConfigError(f"{folder} is a {manifest.get('kind')!r} component folder, not a model; "
                          f"pass the model folder that contains it ({folder.resolve().parent})")
    read_model_folder(folder)  # its components list, their manifests and configs checked before they are shown
    table = Table("component", "kind", "dtype", "parameters", "size", title=f"{folder} ({manifest.get('name', folder.name)})", title_justify="left")
    for component in manifest.get("components", []):
        part = folder / component
        files = read_manifest(part).get("files", {})
        config = read_json_object(part / "config.json", "convert the model again")
        table.add_row(component, config.get("kind", "?"), dtype_text(config), parameter_count(part), gigabytes(sum(f["bytes"] for f in files.values())))
    stdout.print(table)
    if (folder / "flow").is_dir():
        flow = FlowConfig.load(folder / "flow")
        stdout.print(
            f"flow: {flow.num_blocks} blocks with {'/'.join(map(str, flow.layers_per_block))} layers, width {flow.channels}, "
            f"condition {flow.txt_size}×{flow.txt_dim}; images {flow.image_side}x{flow.image_side} by default, "
            f"sides multiples of {flow.size_multiple}", soft_wrap=True,
        )
    for source in manifest.get("sources", []):
        stdout.print(source_text(source), soft_wrap=True)
    if isinstance(manifest.get("training"), dict):
        stdout.print(training_text(manifest["training"]), soft_wrap=True)


def source_text(source: dict) -> str:
    """One source entry, whatever it records: a converted file (path, sha256) or a training
    run's config and command; digests are shortened."""
    fields = []
    for key, value in source.items():
        if key == "component":
            continue
        shown = f"{value[:16]}…" if key.endswith("sha256") and isinstance(value, str) else value
        fields.append(f"{key.replace('_', ' ')} {shown}")
    component = f" {source['component']}" if "component" in source else ""
    return f"source{component}: " + ", ".join(fields)


def training_text(record: dict) -> str:
    """The training record's outcome: steps, time, hardware and held-out bits per dimension."""
    parts = [f"{record.get('step', '?')} steps"]
    if record.get("train_seconds") is not None:
        parts.append(f"{record['train_seconds'] / 60:.0f} min on {record.get('hardware', '?')}")
    if record.get("heldout_bits_per_dim") is not None:
        eight_bit = record.get("heldout_bits_per_dim_8bit")
        parts.append(f"held-out bits/dim {record['heldout_bits_per_dim']}" + (f" (8-bit: {eight_bit})" if eight_bit is not None else ""))
    return "trained: " + "; ".join(parts)


def parameter_count(folder: Path) -> str:
    """Parameters from the config alone (MLX builds the module lazily, nothing is allocated)."""
    kind = read_json_object(folder / "config.json", "convert the model again").get("kind")
    builders = {FlowConfig.KIND: lambda: StarFlow(FlowConfig.load(folder)), T5Config.KIND: lambda: T5Encoder(T5Config.load(folder)),
                VAEConfig.KIND: lambda: VAE(VAEConfig.load(folder))}
    if kind == LabelConfig.KIND:
        return f"{LabelConfig.load(folder).num_classes} labels"
    if kind not in builders:
        return ""
    count = sum(value.size for _, value in tree_flatten(builders[kind]().parameters()))
    return f"{count / 1e6:,.1f} M"


def dtype_text(config: dict) -> str:
    quantization = config.get("quantization")
    return str(config.get("dtype", "")) + (f", {quantization['bits']}-bit" if quantization else "")


def flow_summary(folder: Path) -> str:
    try:
        return dtype_text(read_json_object(folder / "flow" / "config.json", "convert the model again"))
    except ConfigError:
        return "?"


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
