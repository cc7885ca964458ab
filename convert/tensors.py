"""Tensors of a checkpoint as values: dtypes, lazy tensors, writer entries, bounded file I/O.

The leaf every reader and writer in `convert/` builds on. `LazyTensor` knows its name, shape and
dtype at once and reads its bytes from disk only when materialised, so a multi-GB checkpoint
converts with memory near its largest tensor. Writers take the mirror image, `TensorEntry`s whose
producer makes one array when it is about to be written.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import mlx.core as mx
import numpy as np

from mlx_starflow.errors import WeightsError, name_os_error

# dtype name -> (numpy dtype of the stored bits, MLX dtype). numpy has no bfloat16, so its bits
# travel as uint16 and become bfloat16 only inside MLX.
_DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "float32": (np.dtype("<f4"), mx.float32),
    "float16": (np.dtype("<f2"), mx.float16),
    "bfloat16": (np.dtype("<u2"), mx.bfloat16),
    "float64": (np.dtype("<f8"), mx.float64),
    "int64": (np.dtype("<i8"), mx.int64),
    "int32": (np.dtype("<i4"), mx.int32),
    "int16": (np.dtype("<i2"), mx.int16),
    "int8": (np.dtype("i1"), mx.int8),
    "uint64": (np.dtype("<u8"), mx.uint64),
    "uint32": (np.dtype("<u4"), mx.uint32),
    "uint16": (np.dtype("<u2"), mx.uint16),
    "uint8": (np.dtype("u1"), mx.uint8),
    "bool": (np.dtype("?"), mx.bool_),
}
DTYPES: tuple[str, ...] = tuple(_DTYPES)
FLOAT_DTYPES: frozenset[str] = frozenset({"float32", "float16", "bfloat16", "float64"})
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""What a model's weights may be stored as: the official checkpoints and the Hub models use these."""
_MLX_NAMES: dict[mx.Dtype, str] = {mlx_dtype: name for name, (_, mlx_dtype) in _DTYPES.items()}

def raw_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds `dtype`'s bits on disk (little-endian; uint16 for bfloat16)."""
    return _DTYPES[dtype][0]


def itemsize(dtype: str) -> int:
    return _DTYPES[dtype][0].itemsize


def mlx_dtype(dtype: str) -> mx.Dtype:
    return _DTYPES[dtype][1]


def dtype_of(array: np.ndarray | mx.array) -> str:
    """Our dtype name for an array; a numpy array is never bfloat16."""
    if isinstance(array, mx.array):
        name = _MLX_NAMES.get(array.dtype)
    else:
        little = array.dtype.newbyteorder("<")
        name = next((n for n, (np_dtype, _) in _DTYPES.items() if n != "bfloat16" and little == np_dtype), None)
    if name is None:
        raise WeightsError(f"arrays of dtype {array.dtype} cannot be stored; cast to one of {', '.join(DTYPES)}")
    return name


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a shift and exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def raw_to_mlx(raw: np.ndarray, dtype: str) -> mx.array:
    """Stored bits to an MLX array of `dtype`, without a detour through another dtype."""
    if dtype == "bfloat16":
        return mx.array(raw).view(mx.bfloat16)
    return mx.array(raw, dtype=mlx_dtype(dtype))


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a checkpoint whose bytes stay on disk until `numpy()`, `mlx()` or `raw()`."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reader: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def raw(self) -> np.ndarray:
        """The stored values as numpy; bfloat16 comes as its raw uint16 bits."""
        return self.reader()

    def numpy(self) -> np.ndarray:
        """The values as numpy; bfloat16 is widened to float32, which loses nothing."""
        values = self.reader()
        return bf16_bits_to_float32(values) if self.dtype == "bfloat16" else values

    def mlx(self) -> mx.array:
        """The values as an MLX array of the stored dtype (bfloat16 stays bfloat16)."""
        return raw_to_mlx(self.reader(), self.dtype)


def check_weight_dtypes(tensors: Iterable[LazyTensor], source: Path) -> None:
    """Refuse, before anything is read or written, a weight stored as bool, int or float64."""
    wrong = [f"{tensor.name} ({tensor.dtype})" for tensor in tensors if tensor.dtype not in WEIGHT_DTYPES]
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise WeightsError(f"{source}: weights must be {'/'.join(WEIGHT_DTYPES)}, but {shown} are not; the file is damaged or not these weights")


def finite_weight(tensor: LazyTensor, source: Path) -> mx.array:
    """A weight's values, refused with its name when any is NaN or infinite (a damaged checkpoint)."""
    values = tensor.mlx()
    if not mx.all(mx.isfinite(values)).item():
        raise WeightsError(f"{source}: tensor {tensor.name} holds NaN or infinite values; the checkpoint is damaged, download it again")
    return values


def check_regular_file(path: Path, what: str = "checkpoint") -> None:
    """Refuse a folder, device, FIFO or socket before it is opened or hashed (reading one may never end)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise WeightsError(f"cannot read {what} {path} ({e.strerror}); check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise WeightsError(f"{path} is a folder, not a {what} file; pass the weights file itself (e.g. the .pth)")
    if not stat.S_ISREG(mode):
        raise WeightsError(f"{path} is not a regular file (a device, FIFO or socket); pass the {what} file itself")


class TensorEntry(NamedTuple):
    """One tensor for a streaming writer: declared up front, produced only when written."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    producer: Callable[[], np.ndarray | mx.array]


Tensors = Mapping[str, np.ndarray | mx.array] | Iterable[TensorEntry | tuple]


def as_entries(tensors: Tensors) -> list[TensorEntry]:
    """Writer entries from a name -> array mapping (already in memory) or from entries or plain tuples."""
    if isinstance(tensors, Mapping):
        return [TensorEntry(name, dtype_of(array), tuple(array.shape), lambda array=array: array) for name, array in tensors.items()]
    return [TensorEntry(*entry) for entry in tensors]


def check_entries(entries: list[TensorEntry]) -> None:
    """Names unique and strings, dtypes known, shapes non-negative ints: before anything is written."""
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry.name, str) or not entry.name:
            raise WeightsError(f"tensor name {entry.name!r} is not a non-empty string; name every tensor")
        if entry.name in seen:
            raise WeightsError(f"tensor {entry.name!r} is listed twice; give every tensor one name")
        seen.add(entry.name)
        if entry.dtype not in _DTYPES:
            raise WeightsError(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}; use one of {', '.join(DTYPES)}")
        if not all(isinstance(n, int) and n >= 0 for n in entry.shape):
            raise WeightsError(f"tensor {entry.name!r} has shape {entry.shape!r}; a shape is a tuple of non-negative ints")


def produce_raw(entry: TensorEntry) -> np.ndarray:
    """Run an entry's producer and return its bits, C-contiguous and little-endian, as declared.

    A bfloat16 entry may produce an MLX bfloat16 array or its raw uint16 bits as numpy.
    """
    array = entry.producer()
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if isinstance(array, mx.array):
        produced = dtype_of(array)
        raw = np.array(array.view(mx.uint16)) if produced == "bfloat16" else np.array(array)
    elif isinstance(array, np.ndarray):
        produced = "bfloat16" if entry.dtype == "bfloat16" and array.dtype == np.uint16 else dtype_of(array)
        raw = array
    else:
        raise WeightsError(f"the producer of {entry.name!r} returned a {type(array).__name__}; return an mx.array or np.ndarray")
    if produced != entry.dtype or tuple(raw.shape) != tuple(entry.shape):
        raise WeightsError(
            f"the producer of {entry.name!r} returned {produced} {list(raw.shape)}, "
            f"but it was declared {entry.dtype} {list(entry.shape)}; make them agree"
        )
    return np.asarray(raw, dtype=raw_dtype(entry.dtype), order="C")


def read_span(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """Read `nbytes` at `offset` straight into a fresh buffer: one copy, no caching."""
    buffer = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(buffer))
    if got != nbytes:
        raise WeightsError(f"{path} ended early (wanted {nbytes} bytes at offset {offset}, got {got}): it changed or was truncated; download it again")
    return buffer


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A file that appears at `path` only once it is completely written.

    The temporary file is opened normally (not with mkstemp) so the result gets the usual
    umask permissions rather than owner-only ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        name_os_error(error, path)
        raise
