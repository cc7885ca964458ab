"""First run: fetch the official files from Hugging Face, convert them once, reuse the result.

`HUB_FILES` is the one table of which files the app needs from which repository. Files go
into `huggingface_hub`'s normal cache (`HF_HUB_CACHE`, or `HF_HOME/hub`); converted models go
into the models folder (`models_home()`), one folder per checkpoint sha256, dtype and
quantisation. Each converted folder records its origin (checkpoint sha256, the text-encoder and
VAE snapshot revisions) in its manifest, written last, so a stale or half-written conversion is found and
redone, and a finished one is reused without touching the network.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mlx_starflow.config import FlowConfig, LabelConfig, T5Config, VAEConfig
from mlx_starflow.errors import ConfigError, ModelNotFound, StarFlowError
from mlx_starflow.model_io import MODEL_KIND, read_manifest, sha256_file

from .checkpoint import atomic_file
from .model import convert_model
from .official_config import read_official_config

Notify = Callable[[str], None]

LICENCE_NOTICE = (
    "STARFlow's weights are an Apple Machine Learning Research Model: Apple licenses them for "
    "non-commercial research only (no commercial use, no use in products). Downloading and using "
    "them means accepting that licence; read it at https://huggingface.co/apple/starflow "
    "(LICENSE_MODEL in https://github.com/apple/ml-starflow). mlx-starflow never redistributes them."
)


@dataclass(frozen=True)
class RepoFiles:
    """What the app needs from one Hugging Face repository.

    Every `required` file; one complete weight layout from `layouts`, the first available
    preferred (a layout is a set of glob patterns; an `.index.json` also needs the shards it
    names); `optional` files when the repository has them.
    """

    repo_id: str
    required: tuple[str, ...]
    layouts: tuple[tuple[str, ...], ...] = ()
    optional: tuple[str, ...] = ()
    licence: str | None = None

    def describe(self) -> str:
        """The files in words, for messages that say what to download."""
        names = list(self.required)
        if self.layouts:
            names.append(" + ".join(self.layouts[0]) + (" (or another weight layout)" if len(self.layouts) > 1 else ""))
        return ", ".join(names)

    def download_command(self) -> str:
        patterns = [*self.required, *(self.layouts[0] if self.layouts else ())]
        return f"hf download {self.repo_id} " + " ".join(f"'{p}'" if "*" in p else p for p in patterns)


# The exact file names in apple/starflow could not be confirmed offline: the official README
# names the text-to-image checkpoint `starflow_3B_t2i_256x256.pth`. If the repository names
# it differently, this table (and HUB_MODELS below) is the one thing to edit.
HUB_FILES: dict[str, RepoFiles] = {
    "apple/starflow": RepoFiles("apple/starflow", required=("starflow_3B_t2i_256x256.pth",), licence=LICENCE_NOTICE),
    "google/flan-t5-xl": RepoFiles(
        "google/flan-t5-xl",
        required=("config.json", "tokenizer.json"),
        layouts=(
            ("model.safetensors",),
            ("model.safetensors.index.json", "model-*-of-*.safetensors"),
            ("pytorch_model.bin",),
            ("pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
        ),
        optional=("tokenizer_config.json", "special_tokens_map.json", "spiece.model"),
    ),
    "stabilityai/sd-vae-ft-ema": RepoFiles(
        "stabilityai/sd-vae-ft-ema",
        required=("config.json",),
        layouts=(("diffusion_pytorch_model.safetensors",), ("diffusion_pytorch_model.bin",)),
    ),
}


@dataclass(frozen=True)
class HubModel:
    """A model `starflow generate --model REPO` can fetch and convert by itself."""

    repo_id: str
    checkpoint: str
    config: str
    """An official YAML shipped in `convert/configs/`; its `text:` and `vae:` name the other repositories."""

    @property
    def name(self) -> str:
        return Path(self.checkpoint).stem

    def config_path(self) -> Path:
        return Path(str(resources.files("convert") / "configs" / self.config))


HUB_MODELS: dict[str, HubModel] = {
    "apple/starflow": HubModel("apple/starflow", "starflow_3B_t2i_256x256.pth", "starflow_3B_t2i_256x256.yaml"),
}
DEFAULT_MODEL = "apple/starflow"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIGESTS_FILE = "digests.json"


# ---- where things live ----------------------------------------------------------------------

def models_home() -> Path:
    """`STARFLOW_HOME`, else the user's cache folder: ~/Library/Caches/mlx-starflow on macOS,
    $XDG_CACHE_HOME/mlx-starflow or ~/.cache/mlx-starflow elsewhere."""
    if os.environ.get("STARFLOW_HOME"):
        return Path(os.environ["STARFLOW_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-starflow"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlx-starflow"


def models_folder() -> Path:
    return models_home() / "models"


def hub_cache() -> Path:
    """The Hugging Face cache `huggingface_hub` uses, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_requested(flag: bool) -> bool:
    """--offline, or huggingface_hub's own switch HF_HUB_OFFLINE."""
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def converted_name(name: str, sha256: str, dtype: str, quantize: int | None) -> str:
    return f"{name}-{sha256[:12]}-{dtype}" + (f"-q{quantize}" if quantize else "")


# ---- the Hugging Face cache -------------------------------------------------------------------

def complete_layout(folder: Path, files: RepoFiles) -> tuple[str, ...] | None:
    """The first weight layout present in full in `folder` (() when none is needed), else None."""
    if not all((folder / name).is_file() for name in files.required):
        return None
    if not files.layouts:
        return ()
    for layout in files.layouts:
        if all(_layout_part_present(folder, pattern) for pattern in layout):
            return layout
    return None


def _layout_part_present(folder: Path, pattern: str) -> bool:
    matches = [path for path in folder.glob(pattern) if path.is_file()]
    if not matches:
        return False
    for index in (path for path in matches if path.name.endswith(".index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not all((folder / shard).is_file() for shard in shards):
            return False
    return True


def local_snapshot(files: RepoFiles) -> Path | None:
    """The cached snapshot of `files.repo_id` (its `refs/main` revision) if it holds everything needed.

    Only the required files are named to huggingface_hub: it checks a snapshot against every file
    the patterns match in the repository, and a download fetched one weight layout, not all;
    the layout is checked here.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(files.repo_id, cache_dir=hub_cache(), local_files_only=True,
                                        allow_patterns=list(files.required)))
    except (OSError, ValueError):  # not cached, partly cached, or a name the cache cannot hold: not here
        return None
    return folder if complete_layout(folder, files) is not None else None


def download(files: RepoFiles, notify: Notify, still_missing: list[RepoFiles] | None = None) -> Path:
    """Download what `files` needs into the Hugging Face cache, choosing the weight layout the repository has.

    A failure names every repository still missing (`still_missing`, default this one) and how
    to fetch them by hand.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cache = hub_cache()
    if files.licence:
        notify(files.licence)
    notify(f"fetching {files.repo_id} from Hugging Face into its cache at {cache}")
    try:
        with _quiet_retries():
            listing = HfApi().list_repo_files(files.repo_id)
            layout = _first_available_layout(files, listing)
            patterns = [*files.required, *layout, *(name for name in files.optional if name in listing)]
            folder = Path(snapshot_download(files.repo_id, cache_dir=cache, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelNotFound(
            f"{files.repo_id} asks you to accept its licence first: accept it at https://huggingface.co/{files.repo_id}, "
            "log in with `hf auth login`, and run again"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"Hugging Face has no repository {files.repo_id} (or it is private); check the name, or log in with `hf auth login`") from None
    except StarFlowError:
        raise
    except Exception as error:  # network and hub failures come as many types; each becomes one actionable line
        reason = (str(error).strip().splitlines() or [""])[0]
        missing = still_missing or [files]
        wanted = "; ".join(f"{other.repo_id}: {other.describe()}" for other in missing)
        commands = " && ".join(other.download_command() for other in missing)
        raise ModelNotFound(
            f"could not download {files.repo_id} ({type(error).__name__}: {reason}); run again with a connection, or fetch "
            f"{wanted} with `{commands}` (into {cache}) and run with --offline"
        ) from None
    if complete_layout(folder, files) is None:
        raise ModelNotFound(f"the download of {files.repo_id} into {folder} is incomplete: it needs {files.describe()}; run again")
    return folder


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """huggingface_hub logs every retry of a failing request; the one-line error afterwards says
    what matters, so its warnings are held back unless debug logging is on."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_available_layout(files: RepoFiles, listing: list[str]) -> tuple[str, ...]:
    missing = [name for name in files.required if name not in listing]
    if missing:
        raise ModelNotFound(f"{files.repo_id} has no {', '.join(missing)}; the file table in convert/hub.py needs updating")
    if not files.layouts:
        return ()
    for layout in files.layouts:
        if all(fnmatch.filter(listing, pattern) for pattern in layout):
            return layout
    raise ModelNotFound(f"{files.repo_id} has none of the weight layouts this app reads ({files.layouts}); the file table in convert/hub.py needs updating")


def offline_message(missing: list[RepoFiles]) -> str:
    wanted = "; ".join(f"{files.repo_id}: {files.describe()}" for files in missing)
    commands = " && ".join(files.download_command() for files in missing)
    return (
        f"offline and not in the Hugging Face cache at {hub_cache()}: {wanted}. Download them once with a connection "
        f"(`{commands}`, or HF_HUB_CACHE=<folder> for another cache), or give a converted model folder with --model"
    )


# ---- checkpoint digests -----------------------------------------------------------------------

def checkpoint_digest(path: Path) -> str:
    """sha256 of a checkpoint, remembered by path, size and modification time (hashing 15 GB takes a while)."""
    real = path.resolve()
    stat = real.stat()
    memo_path = models_home() / DIGESTS_FILE
    memo = _read_json(memo_path)
    entry = memo.get(str(real))
    if isinstance(entry, dict) and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(real)
    memo[str(real)] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # the memo only saves time; an unwritable home must not stop generation
        _write_json(memo_path, memo)
    return digest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=1).encode())


# ---- resolving --model ------------------------------------------------------------------------

def resolve_model(
    model: str | None,
    dtype: str = "bfloat16",
    quantize: int | None = None,
    offline: bool = False,
    notify: Notify = lambda message: None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """A converted model folder for `--model`: a converted folder as it is; a checkpoint file or
    a known repository id (default apple/starflow) fetched, converted once, and reused.

    A checkpoint file is converted with the shipped config of the default model. `dtype` and
    `quantize` apply when converting; they are part of the converted folder's key.
    """
    model = model or DEFAULT_MODEL
    offline = offline_requested(offline)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        config = HUB_MODELS[DEFAULT_MODEL].config_path()
        return _converted(path.stem, config, path, dtype, quantize, offline, notify, progress)
    if REPO_ID.match(model):
        if model not in HUB_MODELS:
            raise ModelNotFound(
                f"{model!r} is neither a folder here nor a repository this app can convert ({', '.join(HUB_MODELS)}); "
                "pass a converted model folder or an official checkpoint file"
            )
        return _hub_model(HUB_MODELS[model], dtype, quantize, offline, notify, progress)
    raise ModelNotFound(f"no model at {model}; pass a converted model folder, an official checkpoint file, or {DEFAULT_MODEL}")


def _hub_model(hub_model: HubModel, dtype: str, quantize: int | None, offline: bool, notify: Notify,
               progress: Callable[[int, int], None] | None) -> Path:
    files = HUB_FILES[hub_model.repo_id]
    config = hub_model.config_path()
    checkpoint_folder = local_snapshot(files)
    if checkpoint_folder is None:
        missing = [files, *(other for other in companions(config) if local_snapshot(other) is None)]
        if offline:
            existing = find_converted(hub_model.name, dtype, quantize)
            if existing is not None:
                return existing
            raise ModelNotFound(offline_message(missing))
        checkpoint_folder = download(files, notify, missing)
    return _converted(hub_model.name, config, checkpoint_folder / hub_model.checkpoint, dtype, quantize, offline, notify, progress)


def companions(config: Path) -> list[RepoFiles]:
    """The text-encoder and VAE repositories an official YAML names (`text:`, `vae:`), from the file table."""
    official = read_official_config(config)
    found = []
    for repo_id in (official.text_encoder, official.vae):
        if repo_id is None:
            continue
        if repo_id not in HUB_FILES:
            raise ConfigError(f"{config.name} names {repo_id}, which the file table in convert/hub.py does not list")
        found.append(HUB_FILES[repo_id])
    return found


def _converted(name: str, config: Path, checkpoint: Path, dtype: str, quantize: int | None, offline: bool,
               notify: Notify, progress: Callable[[int, int], None] | None) -> Path:
    """The converted folder for this checkpoint, dtype and quantisation: reused when current, else (re)made."""
    sha256 = checkpoint_digest(checkpoint)
    out = models_folder() / converted_name(name, sha256, dtype, quantize)
    folders = {files.repo_id: local_snapshot(files) for files in companions(config)}
    missing = [HUB_FILES[repo_id] for repo_id, folder in folders.items() if folder is None]
    if missing and offline:
        if is_current(out, None):
            return out
        raise ModelNotFound(offline_message(missing))
    for index, files in enumerate(missing):
        folders[files.repo_id] = download(files, notify, missing[index:])
    origin = {"checkpoint_sha256": sha256, **{repo_id: folder.name for repo_id, folder in folders.items()}}
    if is_current(out, origin):
        return out
    notify(f"converting {name} ({dtype}{f', {quantize}-bit' if quantize else ''}) once into {out}")
    official = read_official_config(config)
    convert_model(
        checkpoint, config, out, dtype=dtype, quantize=quantize, force=out.exists(),
        text_encoder=folders.get(official.text_encoder) if official.text_encoder else None,
        vae=folders.get(official.vae) if official.vae else None,
        name=name, source_sha256=sha256, origin=origin, progress=progress,
    )
    return out


_COMPONENT_CONFIGS = {"flow": FlowConfig, "text_encoder": T5Config, "labels": LabelConfig, "vae": VAEConfig, "decoder": VAEConfig}


def is_current(folder: Path, origin: dict[str, str] | None) -> bool:
    """Whether `folder` is a complete conversion readable by this version (of `origin`, when given)."""
    try:
        manifest = read_manifest(folder)
        if manifest.get("kind") != MODEL_KIND:
            return False
        for component in manifest.get("components", []):
            read_manifest(folder / component)
            _COMPONENT_CONFIGS[component].load(folder / component)
    except (StarFlowError, KeyError, OSError, ValueError):
        return False
    if origin is None:
        return "origin" in manifest
    return manifest.get("origin") == origin


def find_converted(name: str, dtype: str, quantize: int | None) -> Path | None:
    """The newest current conversion of `name` at this dtype and quantisation (any checkpoint digest)."""
    suffix = f"-{dtype}" + (f"-q{quantize}" if quantize else "")
    candidates = [path for path in models_folder().glob(f"{name}-*{suffix}") if path.name.endswith(suffix) and is_current(path, None)]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


# ---- what is installed, for `starflow info` ---------------------------------------------------

@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    folder: Path | None
    complete: bool
    bytes: int


def cached_repos() -> Iterator[CachedRepo]:
    """Each repository of the file table: its cached snapshot, whether complete, and its size."""
    for files in HUB_FILES.values():
        folder = local_snapshot(files)
        partial = folder or _any_snapshot(files.repo_id)
        yield CachedRepo(files.repo_id, partial, folder is not None, folder_bytes(partial) if partial else 0)


def _any_snapshot(repo_id: str) -> Path | None:
    snapshots = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    folders = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    return folders[-1] if folders else None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files a folder holds (following the cache's links to their blobs)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def converted_models() -> list[tuple[Path, bool, int]]:
    """Each folder in the models folder: (path, current, bytes)."""
    folder = models_folder()
    if not folder.is_dir():
        return []
    return [(path, is_current(path, None), folder_bytes(path)) for path in sorted(folder.iterdir())
            if path.is_dir() and not path.name.startswith(".")]
