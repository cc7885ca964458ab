"""Errors a user can act on.

Everything the CLI prints as a one-line message derives from `StarFlowError`; any other
exception is a bug and shows its traceback under `--debug`. `InputError` is also a
`ValueError` and `OutputExists` a `FileExistsError`, so library callers that catch the
built-in types keep working.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

_ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free some disk space or choose a folder on another disk",
    errno.EDQUOT: "free some space within your disk quota or choose another folder",
    errno.EROFS: "choose a folder on a writable disk",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EFBIG: "the file system cannot hold a file this large; choose a folder on another disk",
    errno.EMFILE: "too many files are open; close other programs or raise the limit (ulimit -n)",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; pass a file",
    errno.EEXIST: "something of that name is in the way; remove it or choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
}
"""OS failures that come from the user's machine, never from our code, with what to do about each."""
_TEMPORARY = re.compile(r"^\.(.+)\.(?:tmp|old)-\d+-")


class StarFlowError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it."""


class ConfigError(StarFlowError):
    """A config file is missing, malformed, of another version, or asks for an unsupported switch."""


class WeightsError(StarFlowError):
    """Checkpoint keys or shapes do not match what the config describes."""


class ModelNotFound(StarFlowError):
    """No model at the given path, cache entry or repository id."""


class InputError(StarFlowError, ValueError):
    """A value the user gave is out of range, or an input file (image, prompt list, data folder)
    is missing, malformed or unreadable."""


class OutputError(StarFlowError):
    """An output cannot be written: the folder is read-only, full or not a folder."""


class OutputExists(OutputError, FileExistsError):
    """An output already exists and replacing it was not asked for (no --force)."""


class TrainingError(StarFlowError):
    """Training cannot go on (a diverged loss, a run folder that does not match the options)."""


def environment_error(error: OSError) -> StarFlowError | None:
    """The one-line user error for an OS failure caused by the machine (disk full, read-only
    folder, permissions), naming the file; None for any other OS error, which is a bug."""
    fix = _ENVIRONMENT_FIXES.get(error.errno) if error.errno is not None else None
    if fix is None:
        return None
    what = _user_path(str(error.filename)) if error.filename is not None else "a file"
    return StarFlowError(f"cannot use {what}: {error.strerror or errno.errorcode.get(error.errno, error.errno)}; {fix}")


def name_os_error(error: BaseException, path: object) -> None:
    """Give an OS error raised while writing `path` that names no file (a full disk during
    `write`) the output's name, so the user's one-line error can say which output failed."""
    if isinstance(error, OSError) and not isinstance(error, StarFlowError) and error.filename is None:
        error.filename = str(path)  # our own OutputExists already names it, and a filename would replace its message


def _user_path(name: str) -> str:
    """`name` as the user knows it: our hidden temporaries (`.NAME.tmp-PID-…`) become NAME."""
    parts = [match.group(1) if (match := _TEMPORARY.match(part)) else part for part in Path(name).parts]
    return str(Path(*parts)) if parts else name


def listing(names: list[str], limit: int = 10) -> str:
    """A bounded, readable list of names for a one-line error message."""
    if not names:
        return "none"
    return "[" + ", ".join(names[:limit]) + (f", … {len(names)} in all" if len(names) > limit else "") + "]"
