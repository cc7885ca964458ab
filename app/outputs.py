"""Where generated images go: names planned before sampling, claimed atomically when written.

A run decides every name first, so a bad `--output` fails before any model is loaded. Writing
then stages the finished PNG under a hidden name and claims the final name with a hard link,
which the file system creates only if the name is free: two runs writing the same name never
both "win". The loser of a numbered name moves on to the next free number (`-2`, `-3`, …); a
name the user gave explicitly is refused instead. Nothing is ever half-written under a final
name, and the staged file is removed whatever happens; one that a killed run left behind is
removed by the next run that writes to the folder.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mlx_starflow.errors import InputError, OutputError, OutputExists
from mlx_starflow.image import save_png
from mlx_starflow.model_io import process_alive

SLUG_LENGTH = 48
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
"""Errors of `os.link` on file systems without hard links (FAT, exFAT, some network shares)."""
_STAGED = re.compile(r"\.partial-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class Target:
    """One output name: `stem.png`, or `stem-N.png` for N > 1. A `numbered` target may move to
    the next free number if its name is taken by the time it is written."""

    folder: Path
    stem: str
    number: int = 1
    numbered: bool = True

    @property
    def path(self) -> Path:
        return self.folder / (f"{self.stem}.png" if self.number == 1 else f"{self.stem}-{self.number}.png")

    def next(self) -> Target:
        return dataclasses.replace(self, number=self.number + 1)


def slug(prompt: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:SLUG_LENGTH].rstrip("-") or "unconditional"


def plan_outputs(output: Path, prompts: list[str], seeds: list[int], grid: bool, force: bool) -> list[list[Target]]:
    """Every file the run will write, per prompt, decided and checked before anything runs.

    A folder gets `<prompt>-<seed>.png` (a free `-2`, `-3` … suffix instead of replacing a file,
    unless --force); a .png name is used as it is for a single output, else numbered. A grid is
    one file for the whole run.
    """
    file_mode = output.suffix.lower() == ".png" and not output.is_dir()
    if output.suffix and not file_mode and not output.is_dir():
        raise InputError(f"--output {output} is neither a folder nor a .png file name; PNG keeps the settings as metadata")
    folder = output.parent if file_mode else output
    check_writable(folder)
    remove_abandoned(folder)
    if grid:
        if file_mode:
            return [[explicit(folder, output.stem, force)]]
        name = slug(prompts[0]) if len(prompts) == 1 else f"{len(prompts)}-prompts"
        return [[free_target(folder, f"{name}-{seeds[0]}-grid", set(), force)]]
    planned: list[list[Target]] = []
    taken: set[Path] = set()
    for index, prompt in enumerate(prompts):
        if file_mode:
            stem = output.stem if len(prompts) == 1 else f"{output.stem}-{index + 1}"
            targets = [explicit(folder, name, force) for name in ([stem] if len(seeds) == 1 else [f"{stem}-{seed}" for seed in seeds])]
        else:
            targets = [free_target(folder, f"{slug(prompt)}-{seed}", taken, force) for seed in seeds]
        taken.update(target.path for target in targets)
        planned.append(targets)
    return planned


def explicit(folder: Path, stem: str, force: bool) -> Target:
    """A name the user chose: refused now if it exists (unless --force), never renumbered."""
    target = Target(folder, stem, numbered=False)
    if target.path.exists() and not force:
        raise OutputExists(f"{target.path} already exists; pass --force to replace it or choose another --output")
    return target


def free_target(folder: Path, base: str, taken: set[Path], force: bool) -> Target:
    """`base.png`, or the first free `base-N.png` (with --force, `base.png` whatever exists)."""
    target = Target(folder, base)
    while target.path in taken or (target.path.exists() and not force):
        target = target.next()
    return target


def check_writable(folder: Path, flag: str = "--output") -> None:
    """Fail now if `folder` cannot be created or written, without creating anything."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {folder}: {existing} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder} ({e.strerror or e}); choose another {flag}") from None


def remove_abandoned(folder: Path) -> None:
    """Delete staged files of runs that were killed before they could remove them (their
    process is gone); a live run's staged files are left alone."""
    for path in folder.glob(".*.partial-*") if folder.is_dir() else []:
        match = _STAGED.search(path.name)
        if match and path.is_file() and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def write_image(image: Image.Image, target: Target, metadata: dict[str, str], force: bool) -> Path:
    """Write the PNG under `target`'s name, or the next free number if another run took it
    meanwhile; returns the path written. --force replaces an existing file instead."""
    staged = target.folder / f".{target.stem}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.folder.mkdir(parents=True, exist_ok=True)
        save_png(image, staged, metadata, overwrite=True)
        if force:
            os.replace(staged, target.path)
            return target.path
        while True:
            try:
                claim(staged, target.path)
                return target.path
            except FileExistsError:
                if not target.numbered:
                    raise OutputExists(f"{target.path} was written by another run meanwhile; choose another --output") from None
                target = target.next()
    except OutputExists:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {target.path} ({e.strerror or e}); "
                          f"{'free some disk space or ' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''}choose another --output") from None
    finally:
        staged.unlink(missing_ok=True)


def claim(staged: Path, path: Path) -> None:
    """Give the complete file `staged` the name `path` only if no file has it (FileExistsError
    otherwise): a hard link where the file system has them, else an exclusive create then a rename."""
    try:
        os.link(staged, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    os.replace(staged, path)
