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
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mlx_starflow.errors import ConfigError, InputError, ModelNotFound, StarFlowError
from mlx_starflow.model_folder import read_model_folder
from mlx_starflow.model_io import folder_kind, read_marker, sha256_file

from .checkpoint import open_checkpoint
from .tensors import atomic_file
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

    Every `required` file, then the first of `layouts` the repository has (a layout is a tuple
    of file names; an `.index.json` brings the shards it names, only those holding a tensor
    under `needed_keys` when that is set); failing those, the one file whose name matches
    `pick`; `optional` files when the repository has them. `expected` lists the files the real
    repository gives today, for the hand-download command of the offline message.
    """

    repo_id: str
    required: tuple[str, ...]
    layouts: tuple[tuple[str, ...], ...] = ()
    needed_keys: tuple[str, ...] = ()
    pick: str | None = None
    optional: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()
    licence: str | None = None

    def download_command(self) -> str:
        return f"hf download {self.repo_id} " + " ".join(self.expected)


# The file names of the real repositories, as listed on huggingface.co. apple/starflow's
# text-to-image checkpoint is the name the official README gives; should the repository name
# it otherwise, `pick` finds it by pattern.
HUB_FILES: dict[str, RepoFiles] = {
    "apple/starflow": RepoFiles(
        "apple/starflow",
        required=(),
        layouts=(("starflow_3B_t2i_256x256.pth",),),
        pick=r"(?i)^(?!.*(t2v|starflow[-_]v)).*t2i.*\.(pth|pt|safetensors)$",
        expected=("starflow_3B_t2i_256x256.pth",),
        licence=LICENCE_NOTICE,
    ),
    "google/flan-t5-xl": RepoFiles(
        "google/flan-t5-xl",
        required=("config.json", "tokenizer.json"),
        layouts=(("model.safetensors.index.json",), ("model.safetensors",), ("pytorch_model.bin.index.json",), ("pytorch_model.bin",)),
        needed_keys=("encoder.", "shared."),
        optional=("tokenizer_config.json", "special_tokens_map.json", "spiece.model"),
        expected=("config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"),
    ),
    "stabilityai/sd-vae-ft-ema": RepoFiles(
        "stabilityai/sd-vae-ft-ema",
        required=("config.json",),
        layouts=(("diffusion_pytorch_model.safetensors",), ("diffusion_pytorch_model.bin",)),
        expected=("config.json", "diffusion_pytorch_model.safetensors"),
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
        return Path(str(resources.files(__package__) / "configs" / self.config))


HUB_MODELS: dict[str, HubModel] = {
    "apple/starflow": HubModel("apple/starflow", "starflow_3B_t2i_256x256.pth", "starflow_3B_t2i_256x256.yaml"),
}
DEFAULT_MODEL = "apple/starflow"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIGESTS_FILE = "digests.json"
MAX_REF_BYTES = 1024
"""A cache ref holds one commit hash."""


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


# ---- which files, in a listing or a snapshot ----------------------------------------------------

ReadIndex = Callable[[str], Any]
"""Reads an `.index.json` of the repository by name (from the snapshot, or downloaded first)."""


def select_files(files: RepoFiles, names: Collection[str], read_index: ReadIndex) -> list[str] | None:
    """The files to use out of `names` (a repository listing, or a snapshot's files): the
    required ones and one weight layout, or None when `names` lacks them."""
    if not all(name in names for name in files.required):
        return None
    if not files.layouts and files.pick is None:
        return list(files.required)
    for layout in files.layouts:
        chosen = _layout_files(layout, names, files.needed_keys, read_index)
        if chosen is not None:
            return [*files.required, *chosen]
    picked = picked_files(files, names)
    return [*files.required, picked[0]] if len(picked) == 1 else None


def picked_files(files: RepoFiles, names: Collection[str]) -> list[str]:
    """The names matching the table's pattern for the weight file (several: ambiguous)."""
    return sorted(name for name in names if files.pick and re.match(files.pick, name))


def _layout_files(layout: tuple[str, ...], names: Collection[str], needed_keys: tuple[str, ...],
                  read_index: ReadIndex) -> list[str] | None:
    chosen: list[str] = []
    for name in layout:
        if name not in names:
            return None
        chosen.append(name)
        if name.endswith(".index.json"):
            shards = index_shards(read_index(name), needed_keys)
            if shards is None or not all(shard in names for shard in shards):
                return None
            chosen += shards
    return chosen


def index_shards(index: Any, needed_keys: tuple[str, ...]) -> list[str] | None:
    """The shards a Hugging Face index names for the tensors under `needed_keys` (all when
    empty), in order; None for an index that is not one."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) and Path(shard).name == shard for shard in weight_map.values()):
        return None
    shards = [shard for key, shard in weight_map.items() if not needed_keys or str(key).startswith(needed_keys)]
    return list(dict.fromkeys(shards)) or None


def cached_snapshot(repo_id: str) -> Path | None:
    """The cache's snapshot folder of the repository's `refs/main` revision, read from disk
    (no huggingface_hub import, no network: an offline answer comes at once)."""
    base = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = base / "refs" / "main"
    try:
        if not ref.is_file() or ref.stat().st_size > MAX_REF_BYTES:  # a FIFO or a huge file is no revision
            return None
        revision = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = base / "snapshots" / revision
    return snapshot if revision and "/" not in revision and snapshot.is_dir() else None


def local_files(folder: Path, files: RepoFiles) -> list[str] | None:
    """The files of `files` a local folder (a snapshot or the user's own) holds in full, else None."""
    names = {path.name for path in folder.iterdir() if path.is_file()} if folder.is_dir() else set()
    return select_files(files, names, lambda name: _read_json(folder / name))


def local_snapshot(files: RepoFiles) -> Path | None:
    """The cached snapshot of `files.repo_id` if it holds everything the app needs from it."""
    folder = cached_snapshot(files.repo_id)
    return folder if folder is not None and local_files(folder, files) is not None else None


def download(files: RepoFiles, notify: Notify, still_missing: list[RepoFiles] | None = None) -> Path:
    """Download what `files` needs into the Hugging Face cache: the repository's listing
    first, then an index (to fetch only the shards needed), then the chosen files.

    A failure names every repository still missing (`still_missing`, default this one) and how
    to fetch them by hand.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cache = hub_cache()
    if files.licence:
        notify(files.licence)
    notify(f"fetching {files.repo_id} from Hugging Face into its cache at {cache}")
    try:
        with _quiet_retries():
            listing = HfApi().list_repo_files(files.repo_id)

            def read_index(name: str) -> Any:
                return _read_json(Path(hf_hub_download(files.repo_id, name, cache_dir=cache)))

            chosen = select_files(files, listing, read_index)
            if chosen is None:
                raise ModelNotFound(_unusable_listing(files, listing))
            patterns = [*chosen, *(name for name in files.optional if name in listing)]
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
        raise ModelNotFound(f"could not download {files.repo_id} ({type(error).__name__}: {reason}); run again with a connection, "
                            f"or fetch by hand into {cache} and run with --offline:\n" + _fetch_by_hand(still_missing or [files])) from None
    if local_files(folder, files) is None:
        raise ModelNotFound(f"the download of {files.repo_id} into {folder} is incomplete; run again")
    return folder


def _unusable_listing(files: RepoFiles, listing: list[str]) -> str:
    """Why a repository's files do not do: the candidates found, or the files it has."""
    picked = picked_files(files, listing)
    if len(picked) > 1:
        return f"{files.repo_id} holds several text-to-image checkpoints ({', '.join(picked)}); download the one you want and pass it with --model FILE"
    shown = ", ".join(sorted(listing)[:20]) + (f", … {len(listing)} in all" if len(listing) > 20 else "")
    return f"{files.repo_id} has none of the files this app reads (it has {shown}); pass local files with --model/--text-encoder/--vae"


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


def _fetch_by_hand(missing: list[RepoFiles]) -> str:
    return "\n".join(files.download_command() for files in missing)


def offline_message(missing: list[RepoFiles]) -> str:
    """One line that says what is missing and the ways out, then one `hf download` command per repository."""
    names = ", ".join(files.repo_id for files in missing)
    return (f"offline, and the Hugging Face cache at {hub_cache()} lacks {names}: run once with a connection, pass local "
            f"files (--model FILE, --text-encoder DIR, --vae DIR), or fetch them by hand:\n" + _fetch_by_hand(missing))


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
    """An index or the digest memo, read with the bounded JSON reader; a damaged one reads as empty
    (an unusable index, a digest computed again)."""
    return read_marker(path) or {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=1).encode())


# ---- resolving --model ------------------------------------------------------------------------

COMPANION_ROLES = ("text_encoder", "vae")
"""The official YAML's companion repositories (`text:`, `vae:`), by the option that replaces each."""


def resolve_model(
    model: str | None,
    dtype: str = "bfloat16",
    quantize: int | None = None,
    offline: bool = False,
    notify: Notify = lambda message: None,
    progress: Callable[[int, int], None] | None = None,
    *,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    decoder: str | Path | None = None,
) -> Path:
    """A converted model folder for `--model`: a converted folder as it is; a checkpoint file or
    a known repository id (default apple/starflow) fetched, converted once, and reused.

    A checkpoint file is converted with the shipped config of the default model. `dtype` and
    `quantize` apply when converting; they are part of the converted folder's key. Local
    `text_encoder` / `vae` folders replace the cached repositories, and `decoder` adds the
    fine-tuned decoder, so a run needs no cache at all.
    """
    model = model or DEFAULT_MODEL
    offline = offline_requested(offline)
    local = {"text_encoder": text_encoder, "vae": vae, "decoder": decoder}
    path = Path(model).expanduser()
    if path.is_dir():
        given = [f"--{role.replace('_', '-')}" for role, value in local.items() if value is not None]
        if given:
            raise InputError(f"{path} is a converted model folder; {', '.join(given)} apply only when converting a checkpoint (--model FILE)")
        return path
    parts = {role: _local_part(role, value) for role, value in local.items() if value is not None}
    if path.exists():
        open_checkpoint(path)  # a damaged, truncated or non-regular file is refused before anything is fetched
        config = HUB_MODELS[DEFAULT_MODEL].config_path()
        return _converted(path.stem, config, path, dtype, quantize, offline, notify, progress, parts)
    if REPO_ID.match(model):
        if model not in HUB_MODELS:
            raise ModelNotFound(
                f"{model!r} is neither a folder here nor a repository this app can convert ({', '.join(HUB_MODELS)}); "
                "pass a converted model folder or an official checkpoint file"
            )
        return _hub_model(HUB_MODELS[model], dtype, quantize, offline, notify, progress, parts)
    raise ModelNotFound(f"no model at {model}; pass a converted model folder, an official checkpoint file, or {DEFAULT_MODEL}")


def _local_part(role: str, value: str | Path) -> Path:
    """A user's local component, checked to exist (and, for the companions, to hold a usable layout)."""
    path = Path(value).expanduser()
    flag = f"--{role.replace('_', '-')}"
    if not path.exists():
        raise ModelNotFound(f"{flag} {path} does not exist; pass the folder (for --decoder, the file or folder) that holds it")
    official = read_official_config(HUB_MODELS[DEFAULT_MODEL].config_path())
    repo_id = {"text_encoder": official.text_encoder, "vae": official.vae}.get(role)
    if repo_id in HUB_FILES and local_files(path, HUB_FILES[repo_id]) is None:
        raise ModelNotFound(f"{flag} {path} lacks the files of a {repo_id} folder; it needs {' '.join(HUB_FILES[repo_id].expected)} (or another weight layout)")
    return path


def checkpoint_file(snapshot: Path, files: RepoFiles) -> Path:
    """The weight file the table selects in a complete snapshot of the checkpoint repository."""
    chosen = local_files(snapshot, files)
    if not chosen:
        raise ModelNotFound(f"{snapshot} holds no checkpoint of {files.repo_id}; run again with a connection")
    return snapshot / chosen[-1]


def _hub_model(hub_model: HubModel, dtype: str, quantize: int | None, offline: bool, notify: Notify,
               progress: Callable[[int, int], None] | None, parts: dict[str, Path]) -> Path:
    files = HUB_FILES[hub_model.repo_id]
    config = hub_model.config_path()
    snapshot = local_snapshot(files)
    if snapshot is None:
        missing = [files, *(other for role, other in companions(config) if role not in parts and local_snapshot(other) is None)]
        if offline:
            existing = find_converted(hub_model.name, dtype, quantize)
            if existing is not None:
                return existing
            raise ModelNotFound(offline_message(missing))
        snapshot = download(files, notify, missing)
    return _converted(hub_model.name, config, checkpoint_file(snapshot, files), dtype, quantize, offline, notify, progress, parts)


def companions(config: Path) -> list[tuple[str, RepoFiles]]:
    """The text-encoder and VAE repositories an official YAML names (`text:`, `vae:`), from the file table."""
    official = read_official_config(config)
    found = []
    for role, repo_id in zip(COMPANION_ROLES, (official.text_encoder, official.vae)):
        if repo_id is None:
            continue
        if repo_id not in HUB_FILES:
            raise ConfigError(f"{config.name} names {repo_id}, which the file table in convert/hub.py does not list")
        found.append((role, HUB_FILES[repo_id]))
    return found


def _converted(name: str, config: Path, checkpoint: Path, dtype: str, quantize: int | None, offline: bool,
               notify: Notify, progress: Callable[[int, int], None] | None, parts: dict[str, Path]) -> Path:
    """The converted folder for this checkpoint, dtype and quantisation: reused when current, else (re)made."""
    needed = companions(config)
    folders = {role: parts.get(role) or local_snapshot(files) for role, files in needed}
    missing = [files for role, files in needed if folders[role] is None]
    if missing and offline:
        existing = _conversion_of(name, checkpoint, dtype, quantize)
        if existing is not None and is_current(existing, None):
            return existing
        raise ModelNotFound(offline_message(missing))
    for index, (role, files) in enumerate((role, files) for role, files in needed if folders[role] is None):
        folders[role] = download(files, notify, missing[index:])
    sha256 = checkpoint_digest(checkpoint)
    out = models_folder() / converted_name(name, sha256, dtype, quantize)
    origin = {"checkpoint_sha256": sha256}
    for role, files in needed:
        origin[files.repo_id] = f"local {parts[role].resolve()}" if role in parts else folders[role].name
    if "decoder" in parts:
        origin["decoder"] = f"local {parts['decoder'].resolve()}"
    if is_current(out, origin):
        return out
    notify(f"converting {name} ({dtype}{f', {quantize}-bit' if quantize else ''}) once into {out}")
    if out.is_dir() and not out.is_symlink() and folder_kind(out) is None:
        shutil.rmtree(out)  # a conversion of ours in our own models folder that lost its manifest: stale
    convert_model(
        checkpoint, config, out, dtype=dtype, quantize=quantize, force=out.exists(),
        text_encoder=folders.get("text_encoder"), vae=folders.get("vae"), decoder=parts.get("decoder"),
        name=name, source_sha256=sha256, origin=origin, progress=progress,
    )
    return out


def _conversion_of(name: str, checkpoint: Path, dtype: str, quantize: int | None) -> Path | None:
    """An existing conversion of this checkpoint; the checkpoint is hashed only when one of its name may exist."""
    if find_converted(name, dtype, quantize) is None:
        return None
    out = models_folder() / converted_name(name, checkpoint_digest(checkpoint), dtype, quantize)
    return out if out.is_dir() else None


def is_current(folder: Path, origin: dict[str, str] | None) -> bool:
    """Whether `folder` is a complete conversion readable by this version (of `origin`, when given)."""
    try:
        manifest = read_model_folder(folder).manifest
    except (StarFlowError, OSError):
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
