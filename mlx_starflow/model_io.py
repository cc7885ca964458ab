"""Converted component folders: atomic writing, the manifest, and strict weight loading.

A component folder holds `config.json`, `model.safetensors` and `manifest.json`. The
manifest is written last and records each file's size and sha256, so a folder whose
manifest is missing or disagrees with its files is a half-written or stale conversion.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
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
from .errors import ConfigError, ModelNotFound, OutputExists, StarFlowError, WeightsError, listing, name_os_error

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "mlx-starflow"
FORMAT_VERSION = 1
MODEL_KIND = "starflow.model"
"""Kind of a model folder's top manifest: components (flow/, labels/ or text_encoder/, vae/, …)."""
VERIFIED_FILE = ".verified.json"
"""Per folder: the size, mtime and sha256 of each file when its hash last matched the manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(out: str | Path, force: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the body succeeds.

    An existing `out` is refused unless `force`, and even then replaced only when our own
    manifest names it a folder of `kind` (any of ours when None): `--force` never deletes a
    user's unrelated files. The old folder goes only after the new one is complete, so a failure
    never leaves a half-written or missing model; a concurrent run that wrote `out` meanwhile
    is not overwritten. Temporaries that an interrupted run of ours left beside `out` go first.
    """
    out = Path(out)
    check_output_folder(out, force, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; a model folder is an ordinary folder
    try:
        yield tmp
        if out.exists() and force:
            check_replaceable(out, kind)
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            _claim(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        name_os_error(error, out)
        raise


def check_output_folder(out: Path, force: bool, kind: str | None) -> None:
    """Refuse an existing `out` that may not be written: without `force` any (offering --force
    only where it would work), with it one `check_replaceable` refuses. Commands call this before
    their slow work; `atomic_folder` calls it again."""
    if out.exists() or out.is_symlink():
        check_replaceable(out, kind)
        if not force:
            raise OutputExists(f"{out} already exists; pass --force to replace it")


def _claim(tmp: Path, out: Path) -> None:
    """Rename `tmp` to a free `out`; another run that took the name first wins, and this one says so."""
    if out.exists():
        raise OutputExists(f"{out} was written by another run meanwhile; choose another output or pass --force")
    try:
        tmp.rename(out)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputExists(f"{out} was written by another run meanwhile; choose another output or pass --force") from None
        raise


def folder_kind(folder: str | Path) -> str | None:
    """What our manifest says a folder is (`starflow.model`, …, or the format of another of our
    outputs, e.g. a Core ML export), or None for a folder we did not write (or whose manifest is
    damaged, a FIFO, or too big or deep to be one of ours)."""
    manifest = read_marker(Path(folder) / MANIFEST_FILE)
    if manifest is None or not str(manifest.get("format", "")).startswith(FORMAT_NAME):
        return None
    return str(manifest.get("kind") if manifest.get("format") == FORMAT_NAME else manifest.get("format"))


def check_replaceable(out: Path, kind: str | None) -> None:
    """Refuse to replace `out` unless it is empty or our manifest names it a previous output of `kind`."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    found = folder_kind(out) if out.is_dir() and not out.is_symlink() else None
    if found is None or (kind is not None and found != kind):
        what = "a folder of another kind" if found else "not a folder this program wrote"
        raise OutputExists(f"{out} already exists and is {what} (its manifest.json does not name it a {kind or 'mlx-starflow'} output), "
                           f"so --force will not replace it; remove it yourself or choose another output")


_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-(\d+)-")
"""Names of our temporaries: `.NAME.tmp-PID-…` (being written) and `.NAME.old-PID-…` (being replaced)."""


def is_stale_temporary(path: Path) -> bool:
    """Whether `path` is a temporary folder of ours whose process is gone (a killed run's leftover)."""
    match = _TEMPORARY.match(path.name)
    return bool(match) and path.is_dir() and not path.is_symlink() and not process_alive(int(match.group(2)))


def remove_stale_temporaries(out: Path) -> None:
    """Remove the leftovers of killed runs of ours beside `out`; a live run's temporaries stay."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        if path.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and is_stale_temporary(path):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs: a temporary named after a dead process is a leftover."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        elif not (top and path.name == MANIFEST_FILE) and path.name != VERIFIED_FILE:
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
    if not (path.exists() or path.is_symlink()):
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: the conversion did not finish or this is not a converted folder; convert it again")
    manifest = read_json_object(path, "convert the model again")  # refuses a FIFO or device without opening it
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{folder} was written by an incompatible converter (format {manifest.get('format')!r} "
            f"version {manifest.get('format_version')!r}); convert it again with this version"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(i, dict) and "bytes" in i and "sha256" in i for i in files.values()):
        raise ConfigError(f"{path} is malformed (its files list); convert the model again")
    sources = manifest.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(source, dict) for source in sources):
        raise ConfigError(f"{path} is malformed (its sources list); convert the model again")
    for name, info in files.items():
        parts = Path(name).parts
        # a listed file must lie inside the folder and be a name the OS accepts (else stat raises)
        if not parts or Path(name).is_absolute() or ".." in parts or "\0" in name or any(len(p.encode()) > 255 for p in parts):
            raise ConfigError(f"{path} is malformed (it lists {name[:60]!r}, not a file inside the folder); convert the model again")
        file = folder / name
        if not file.is_file():
            raise ConfigError(f"{folder} is incomplete: {name} is missing; convert it again")
        if file.stat().st_size != info["bytes"]:
            raise ConfigError(f"{folder} is stale or damaged: {name} has {file.stat().st_size} bytes, the manifest says {info['bytes']}; convert it again")
        if verify_hashes and sha256_file(file) != info["sha256"]:
            raise ConfigError(f"{folder} is damaged: {name} does not match its sha256 in the manifest; convert it again")
    return manifest


def verify_changed(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Hash the files of a folder whose size or mtime changed since their hash last matched the
    manifest (all of them on the first load after conversion), and record the new stat.

    The record lives in the folder itself (`.verified.json`, written atomically), so it moves
    and is deleted with it; where the folder is read-only the record cannot be kept and the
    check hashes again next time, which is slow but still right.
    """
    folder = Path(folder)
    record = _read_record(folder)
    changed = {}
    for name, info in manifest.get("files", {}).items():
        stat = (folder / name).stat()
        seen = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": info["sha256"]}
        if record.get(name) != seen:
            changed[name] = seen
    for name, seen in changed.items():
        if sha256_file(folder / name) != seen["sha256"]:
            raise WeightsError(f"{folder} is damaged: {name} does not match its sha256 in the manifest; convert it again")
    if changed:
        _write_record(folder, {**record, **changed})


def verify_folder(path: str | Path) -> int:
    """Hash every file that a model or component folder's manifests list (components
    included) against its sha256, whatever the record says; returns the number of files checked.

    For `starflow info --verify`: a damaged file is a `WeightsError` naming it.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    checked = 0
    for name, info in manifest["files"].items():
        if sha256_file(folder / name) != info["sha256"]:
            raise WeightsError(f"{folder} is damaged: {name} does not match its sha256 in the manifest; convert it again")
        checked += 1
        if Path(name).name == MANIFEST_FILE and Path(name).parent != Path("."):
            checked += verify_folder(folder / Path(name).parent)
    with contextlib.suppress(OSError):
        stats = {name: (folder / name).stat() for name in manifest["files"]}
        _write_record(folder, {name: {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": manifest["files"][name]["sha256"]}
                               for name, st in stats.items()})
    return checked


def read_marker(path: Path) -> dict[str, Any] | None:
    """A JSON object of ours that only tells something (a manifest read to recognise a folder, a
    verification record, a run marker), or None when it is missing, not a regular file, or
    damaged: the caller then treats the folder as not ours or not verified, never as an error."""
    try:
        return read_json_object(path, "")
    except StarFlowError:
        return None


def _read_record(folder: Path) -> dict[str, Any]:
    """A damaged record means nothing was verified: every file is hashed again and the record rewritten."""
    return read_marker(folder / VERIFIED_FILE) or {}


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically; a folder we cannot write to keeps no record."""
    tmp = folder / f"{VERIFIED_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / VERIFIED_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def save_weights(folder: str | Path, module: nn.Module) -> None:
    """Write a module's parameters to the folder's `model.safetensors` (MLX's writer)."""
    mx.save_safetensors(str(Path(folder) / WEIGHTS_FILE), dict(tree_flatten(module.parameters())))


def load_weights(module: nn.Module, folder: str | Path, evaluate: bool = True) -> None:
    """Load `model.safetensors` strictly: every parameter present, nothing extra, same shapes.

    With `evaluate=False` the weights stay mapped, unread, until their first use, so a part
    loaded early costs no memory while another part (the text encoder) runs first.
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} has no {WEIGHTS_FILE}; convert the model again")
    verify_changed(folder, read_manifest(folder))
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
    if evaluate:
        read_parameters(module)


def read_parameters(module: nn.Module) -> None:
    """Evaluate a module's parameters one array at a time.

    A weight loaded lazily and then changed lazily (`backend_compute` copies float32 weights
    into another layout) holds both its read and its copy until evaluated; one at a time, a
    model costs its size plus one matrix, where evaluating all at once would hold it twice.
    """
    for _, value in tree_flatten(module.parameters()):
        mx.eval(value)

