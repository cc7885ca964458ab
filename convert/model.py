"""Assemble a model folder: the flow plus its condition encoder (T5 or labels) and VAE.

A model folder holds one component folder each (`flow/`, `text_encoder/` or `labels/`,
`vae/`, optionally a fine-tuned `decoder/`) and a top-level `manifest.json`, written last, that
names them. It is built in a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mlx_starflow.config import LabelConfig
from mlx_starflow.errors import ConfigError, ModelNotFound
from mlx_starflow.model_io import atomic_folder, sha256_file, write_manifest

from .flow import write_flow
from .official_config import OfficialConfig, read_official_config

log = logging.getLogger(__name__)

MODEL_KIND = "starflow.model"


def read_vocab(path: Path) -> tuple[str, ...]:
    """Class names of an official `.vocab` file: a TSV whose first column is the name."""
    names = [line.split("\t")[0].strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"{path} lists no class names; a .vocab file has one class per line (name<TAB>id)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path} lists a class name twice; class names must be unique")
    return tuple(names)


def find_vocab(official: OfficialConfig, labels: str | Path | None) -> Path:
    """The label vocabulary: given explicitly, else the YAML's `text:` beside the YAML or in the cwd."""
    candidates = [Path(labels)] if labels else [official.path.parent / official.text_encoder, Path(official.text_encoder)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"label vocabulary {official.text_encoder} not found beside {official.path} or in the current folder; pass --labels FILE"
    )


def write_labels(folder: Path, vocab: Path, txt_dim: int) -> LabelConfig:
    names = read_vocab(vocab)
    if len(names) + 1 != txt_dim:
        raise ConfigError(
            f"{vocab} lists {len(names)} classes but the checkpoint's condition width is {txt_dim} "
            f"(classes + 1 empty class); pass the vocabulary this model was trained with"
        )
    folder.mkdir(parents=True)
    config = LabelConfig(labels=names)
    config.save(folder)
    write_manifest(folder, LabelConfig.KIND, sources=[{"path": str(vocab), "sha256": sha256_file(vocab)}])
    return config


def convert_model(
    src: str | Path,
    config: str | Path,
    out: str | Path,
    dtype: str = "float32",
    quantize: int | None = None,
    force: bool = False,
    labels: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert an official checkpoint + YAML into a model folder at `out`.

    Label-conditioned configs (`text: NAME.vocab`) also get their `labels/` component; text
    models get their text encoder and VAE from `starflow generate`'s first run or from the
    pipeline's own converters.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ModelNotFound(f"checkpoint {src} does not exist; pass the official .pth (or .safetensors) file")
    official = read_official_config(config)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    source = {"path": str(src.resolve()), "sha256": sha256_file(src)}
    with atomic_folder(out, force=force) as tmp:
        flow = write_flow(tmp / "flow", src, source["sha256"], official, dtype=dtype, quantize=quantize, progress=progress)
        components = ["flow"]
        if official.is_label_model:
            write_labels(tmp / "labels", find_vocab(official, labels), flow.txt_dim)
            components.append("labels")
        write_manifest(tmp, MODEL_KIND, sources=[source], components=components)
    return out
