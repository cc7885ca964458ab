"""Converted component folders: atomic writing, the manifest, and strict weight loading.

A component folder holds `config.json`, `model.safetensors` and `manifest.json`. The
manifest is written last and records each file's size and sha256, so a folder whose
manifest is missing or disagrees with its files is a half-written or stale conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import read_json_object
from .errors import ConfigError, ModelNotFound, WeightsError, listing

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "mlx-starflow"
FORMAT_VERSION = 1
MODEL_KIND = "starflow.model"
"""Kind of a model folder's top manifest: components (flow/, labels/ or text_encoder/, vae/, …)."""


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the body succeeds.

    An existing `out` is refused unless `force`; with `force` it is replaced only after the
    new folder is complete, so a failure never leaves a half-written or missing model.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; a model folder is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: str | Path, kind: str, sources: list[dict[str, Any]] | None = None, **extra: Any) -> dict:
    """Write `manifest.json` last: the folder's files with size and sha256, plus provenance.

    `sources` names what the folder was made from (`{"path", "sha256"}` per file, or a parent
    model and a training command); `extra` adds free-form provenance keys.
    """
    folder = Path(folder)
    files = {}
    for path in sorted(_own_files(folder)):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources or [],
        "files": files,
        **extra,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _own_files(folder: Path, top: bool = True) -> list[Path]:
    """Files a manifest covers: a component subfolder (one with its own manifest) counts as that manifest."""
    found = []
    for path in folder.iterdir():
        if path.is_dir():
            found += [path / MANIFEST_FILE] if (path / MANIFEST_FILE).is_file() else _own_files(path, top=False)
        elif not (top and path.name == MANIFEST_FILE):
            found.append(path)
    return found


def read_manifest(folder: str | Path, verify_hashes: bool = False) -> dict:
    """Read and check a folder's manifest: every listed file present with its recorded size.

    Raises `ModelNotFound` for a missing folder and `ConfigError` for a half-written or stale one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFound(f"no model folder at {folder}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: the conversion did not finish or this is not a converted folder; convert it again")
    manifest = read_json_object(path, "convert the model again")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{folder} was written by an incompatible converter (format {manifest.get('format')!r} "
            f"version {manifest.get('format_version')!r}); convert it again with this version"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(i, dict) and "bytes" in i and "sha256" in i for i in files.values()):
        raise ConfigError(f"{path} is malformed (its files list); convert the model again")
    for name, info in files.items():
        file = folder / name
        if not file.is_file():
            raise ConfigError(f"{folder} is incomplete: {name} is missing; convert it again")
        if file.stat().st_size != info["bytes"]:
            raise ConfigError(f"{folder} is stale or damaged: {name} has {file.stat().st_size} bytes, the manifest says {info['bytes']}; convert it again")
        if verify_hashes and sha256_file(file) != info["sha256"]:
            raise ConfigError(f"{folder} is damaged: {name} does not match its sha256 in the manifest; convert it again")
    return manifest


def save_weights(folder: str | Path, module: nn.Module) -> None:
    """Write a module's parameters to the folder's `model.safetensors` (MLX's writer)."""
    mx.save_safetensors(str(Path(folder) / WEIGHTS_FILE), dict(tree_flatten(module.parameters())))


def load_weights(module: nn.Module, folder: str | Path) -> None:
    """Load `model.safetensors` strictly: every parameter present, nothing extra, same shapes."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} has no {WEIGHTS_FILE}; convert the model again")
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} is damaged ({e}); convert the model again") from None
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the config: missing {listing(missing)}, unexpected {listing(unexpected)}")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise WeightsError(f"{path}: {name} has shape {list(value.shape)}, the config implies {list(expected[name].shape)}")
    module.load_weights(list(weights.items()), strict=True)
    mx.eval(module.parameters())

