"""Lay folders out as a Hugging Face hub cache, so the app finds them as downloads of the real repositories.

The cache layout is huggingface_hub's: `models--owner--name/` with `blobs/` (here hard links to
the synthetic files, so nothing is copied), `snapshots/<revision>/<file>` symlinks to the blobs,
and `refs/main` naming the revision. Revisions and blob names are digests of the repository id
and file names, not of the contents: hashing 20 GB of noise would tell the app nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def place_repo(hub_cache: Path, repo_id: str, files: Path) -> Path:
    """Make every file under `files` a cached file of `repo_id` at revision `main`; returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = _digest("rehearsal", repo_id)[:40]
    snapshot = repo / "snapshots" / revision
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for path in sorted(files.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(files)
        blob = repo / "blobs" / _digest(repo_id, str(relative), str(path.stat().st_size))
        try:
            os.link(path, blob)
        except OSError:  # another file system: copy instead
            shutil.copyfile(path, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(revision)
    return snapshot
