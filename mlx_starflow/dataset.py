"""Training data: a folder of images plus a captions file → uint8 arrays, and reproducible batches.

The captions file (default `captions.tsv` in the folder) has one `file<TAB>caption` line per
image, the file relative to the folder; for label models the caption is the class name. Every
image is made square at the model's size: an image already that size is kept exactly; any other
is resized with bicubic filtering so its shorter side fits, then centre-cropped (torchvision's
Resize + CenterCrop). There is no flip augmentation (the official `no_flip: 1`).
Batches are a pure function of (seed, step), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import fit_image, read_image
from .model_io import sha256_file

CAPTIONS_FILE = "captions.tsv"
_HELDOUT_STREAM, _EPOCH_STREAM = 7, 1


@dataclass(frozen=True)
class ImageData:
    """Square uint8 images (N, 3, S, S) with one caption each.

    `skipped` names unreadable files; `source` says where the data came from (for manifests).
    """

    images: np.ndarray
    captions: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def fingerprint(self) -> str:
        """sha256 of the pixels and captions: a resumed run must see the same data."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        digest.update("\n".join(self.captions).encode())
        return digest.hexdigest()


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(file, caption) pairs of a captions file; a line without a tab is an `InputError`."""
    if not path.is_file():
        raise InputError(f"no captions file at {path}; write one `image file<TAB>caption` line per image (or pass --captions)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as UTF-8 text ({e}); save it as UTF-8") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(f"{path} line {number} has no tab; each line is `image file<TAB>caption`")
        name, caption = line.split("\t", 1)
        pairs.append((name.strip(), " ".join(caption.split())))
    if not pairs:
        raise InputError(f"{path} lists no images; write one `image file<TAB>caption` line per image")
    return pairs


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (3, H, W) → (3, size, size), prepared as the official data pipeline and `starflow score`
    do (`image.fit_image`): kept if already that size, else a centred crop resized bilinearly."""
    _, height, width = image.shape
    return image if height == width == size else fit_image(image, size, size)


def load_image_folder(folder: str | Path, size: int, captions: str | Path | None = None) -> ImageData:
    """Read every image the captions file names, made square at `size`.

    Unreadable images are skipped and named in `skipped`; none readable, an empty folder, or a
    caption line naming a missing file is an `InputError` that says what to fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"no data folder at {folder}; pass a folder of images with a {CAPTIONS_FILE}")
    if not any(folder.iterdir()):
        raise InputError(f"{folder} is empty; put the images and a {CAPTIONS_FILE} (`file<TAB>caption` per line) in it")
    captions_path = Path(captions) if captions else folder / CAPTIONS_FILE
    pairs = read_captions(captions_path)
    root = folder.resolve()
    outside = [name for name, _ in pairs if not _inside(root, name)]
    if outside:  # refused before anything is opened: a captions file must not read files elsewhere
        shown = ", ".join(outside[:5]) + (f" … ({len(outside)} in all)" if len(outside) > 5 else "")
        raise InputError(f"{captions_path} names files outside the data folder {folder}: {shown}; "
                         "list only images inside it, by their path relative to it")
    missing = [name for name, _ in pairs if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise InputError(f"{captions_path} names images missing from {folder}: {shown}; fix or remove those lines")
    images, kept, skipped = [], [], []
    for name, caption in pairs:
        try:
            images.append(fit_square(read_image(folder / name), size))
        except InputError:
            skipped.append(name)
            continue
        kept.append(caption)
    if not images:
        raise InputError(f"none of the {len(pairs)} images listed in {captions_path} could be read; pass PNG or JPEG files")
    source = {"path": str(folder), "captions": str(captions_path),
              "captions_sha256": sha256_file(captions_path), "images": len(kept), "skipped": len(skipped)}
    return ImageData(np.stack(images), tuple(kept), tuple(skipped), source)


def _inside(root: Path, name: str) -> bool:
    """Whether `name` (a captions entry) resolves, symbolic links followed, to a path inside `root`."""
    try:
        return (root / name).resolve().is_relative_to(root)
    except (OSError, ValueError, RuntimeError):  # a NUL byte in the name, a symbolic-link loop
        return False


def heldout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): a seeded share `fraction` of the images is held out."""
    if not 0 <= fraction < 1:
        raise InputError(f"the held-out share must be in [0, 1), got {fraction}")
    order = np.random.RandomState([seed % 2**32, _HELDOUT_STREAM]).permutation(count)
    heldout = min(max(round(fraction * count), 1 if fraction > 0 else 0), count - 1)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch for optimizer step `step`: each epoch is a seeded permutation, cut into
    `count // batch_size` full batches (the remainder of an epoch is dropped)."""
    if not 1 <= batch_size <= count:
        raise InputError(f"batch size {batch_size} must be between 1 and the {count} training images")
    per_epoch = count // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.RandomState([seed % 2**32, _EPOCH_STREAM, epoch]).permutation(count)
    return order[position * batch_size : (position + 1) * batch_size]
