"""Text the user gives: prompts on the command line and prompt or caption files.

Files are read only if they are regular files of bounded size (a FIFO, a device or `/dev/zero`
is refused before it is opened), and all text must be valid UTF-8, so the tokenizer and the PNG
metadata never meet bytes they cannot encode.
"""

from __future__ import annotations

from pathlib import Path

from mlx_starflow.errors import InputError

from .limits import MAX_IMAGES, MAX_PROMPTS_FILE_BYTES


def read_lines(path: Path, what: str = "prompt") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; none is an error naming the file."""
    lines = [line.strip() for line in check_text(read_text_file(path, what), str(path)).splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path} holds no {what}s; write one {what} per line")
    return lines


def read_text_file(path: Path, what: str = "prompt") -> str:
    """A regular file of at most MAX_PROMPTS_FILE_BYTES, decoded as UTF-8."""
    fix = f"pass a readable UTF-8 text file with one {what} per line"
    try:
        if not path.is_file():
            raise InputError(f"{path} is not a regular file; {fix}")
        if path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise InputError(f"{path} is larger than the {MAX_PROMPTS_FILE_BYTES // 2**20} MiB a {what} file may hold; "
                             f"split it (a run takes at most {MAX_IMAGES:,} {what}s)")
        with path.open("rb") as f:
            data = f.read(MAX_PROMPTS_FILE_BYTES + 1)
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8 with one {what} per line") from None
    except OSError as e:
        raise InputError(f"cannot read {what}s from {path} ({e.strerror or e.__class__.__name__}); {fix}") from None


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode: bytes that were not UTF-8 on the command line reach Python
    as lone surrogates, which the tokenizer and the PNG metadata cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text; pass it in UTF-8 (check the terminal's or the file's encoding)") from None
    return text
