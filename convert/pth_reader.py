"""Torch `.pth` / `.bin` checkpoints, read without torch and without running anything they hold.

`torch.save` writes a zip: `<root>/data.pkl` pickles the state dict, and each storage's bytes sit
uncompressed in `<root>/data/<key>`, where `<root>` is named after the file's stem. The pickle is
read by an unpickler that resolves only the globals a state dict needs (the OrderedDict, the tensor
rebuild call and the typed storage classes) to inert stand-ins, so a pickle asking for anything else
(`os.system`, `builtins.eval`, a class with a `__reduce__`) is refused before it can run. Storages
stay on disk: each tensor remembers where its strided window lies in the zip and reads it when
materialised.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlx_starflow.errors import ModelNotFound, WeightsError

from .tensors import LazyTensor, check_regular_file, itemsize, raw_dtype, read_span

ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 64 << 20
"""A state dict's pickle holds names and shapes only (the 3B checkpoint's is well under 1 MB)."""
MAX_BYTEORDER_BYTES = 16
"""The `byteorder` record holds `little` or `big`."""
MAX_ZIP_ENTRIES = 100_000
"""Entries of a checkpoint's zip: one per storage plus four records (the fixture model has 136;
a state dict of 100,000 tensors is far beyond any released model). `zipfile` keeps a record of
every entry in memory, so a zip of millions of tiny entries is refused before it is listed."""
MAX_ZIP_DIRECTORY_BYTES = 64 << 20
"""The zip's central directory, which `zipfile` reads whole: 100,000 entries of torch's names
take about 10 MB."""
_END_OF_DIRECTORY = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_END_SEARCH_BYTES = 22 + 0xFFFF
"""The end-of-directory record (22 bytes) sits within its maximal comment's length of the end."""
# torch's pre-1.6 format starts with a protocol-2 pickle of this magic number (a LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# torch's typed storage class -> the dtype of its elements.
TORCH_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# Single-key wrappers training scripts put around a state dict; unwrapped silently.
_WRAPPER_KEYS = ("model", "state_dict", "ema")


class _Malformed(ValueError):
    """A record in the pickle is not shaped like the one torch writes."""


# The stand-ins below are named tuples: immutable and without a __dict__, so a pickle's BUILD opcode
# cannot set state on them. Each load gets fresh ones, so nothing one file does reaches the next.


class _StorageType(NamedTuple):
    dtype: str


class _Storage(NamedTuple):
    key: str
    dtype: str
    numel: int


class _TensorRecord(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0


class _RebuildTensor(NamedTuple):
    """Stands in for `torch._utils._rebuild_tensor_v2`: records where the tensor's values lie."""

    def __call__(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, metadata: Any = None) -> _TensorRecord:
        if not isinstance(storage, _Storage):
            raise _Malformed(f"a tensor's storage is {type(storage).__name__}")
        if not (_is_index(offset) and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)):
            raise _Malformed("a tensor record has a malformed offset, size or stride")
        if not all(_is_index(n) for n in size + stride):
            raise _Malformed(f"a tensor record has size {size!r} and stride {stride!r}")
        return _TensorRecord(storage, offset, size, stride)


class _RebuildParameter(NamedTuple):
    """Stands in for `torch._utils._rebuild_parameter`: a parameter is its tensor."""

    def __call__(self, data: Any, requires_grad: Any = False, hooks: Any = None) -> _TensorRecord:
        if not isinstance(data, _TensorRecord):
            raise _Malformed(f"a parameter wraps {type(data).__name__}, not a tensor")
        return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    return {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor(),
        ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
        **{("torch", name): _StorageType(dtype) for name, dtype in TORCH_STORAGE_DTYPES.items()},
    }


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the allowed globals and storage references; everything else is refused."""

    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data))
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is None:
            raise WeightsError(f"refusing to load {self._source}: the pickle asks for {module}.{name}; only tensors and plain containers are allowed")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType) and type(pid[2]) is str and _is_index(pid[4]):
            return _Storage(pid[2], pid[1].dtype, pid[4])
        raise WeightsError(f"refusing to load {self._source}: the pickle refers to {repr(pid)[:80]}; only tensor storages are allowed")


def _unpickle(data: bytes, source: Path) -> Any:
    try:
        return _StateDictUnpickler(data, source).load()
    except WeightsError:
        raise
    except Exception as e:  # a damaged pickle can fail in any of pickle's many ways
        raise WeightsError(f"{source} is corrupt: its data.pkl does not unpickle ({type(e).__name__}: {e}); download or save it again") from None


def _describe(value: Any) -> str:
    name = "tensor" if isinstance(value, _TensorRecord) else "dict" if isinstance(value, dict) else type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _state_dict(loaded: Any, source: Path) -> dict[str, _TensorRecord]:
    """The flat name -> tensor dict, unwrapping a lone 'model' / 'state_dict' / 'ema' key."""
    if isinstance(loaded, dict) and len(loaded) == 1:
        ((key, inner),) = loaded.items()
        if key in _WRAPPER_KEYS and isinstance(inner, dict):
            loaded = inner
    if not isinstance(loaded, dict):
        raise WeightsError(f"{source} holds {_describe(loaded)}, not a dict of tensors; save model.state_dict() with torch.save")
    if not loaded:
        raise WeightsError(f"{source} holds an empty dict, no tensors; save model.state_dict() with torch.save")
    others = [f"{key!r} ({_describe(value)})" for key, value in loaded.items() if not (isinstance(key, str) and isinstance(value, _TensorRecord))]
    if others:
        shown = ", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else "")
        raise WeightsError(f"{source} holds a dict whose entries are not all tensors: {shown}; save the model's state_dict() alone with torch.save")
    return loaded


def _not_a_zip(path: Path, head: bytes) -> str:
    if not head:
        return f"{path} is empty; download or save it again"
    if head.startswith(_LEGACY_MAGIC):
        return f"{path}: legacy torch serialization is not supported; re-save it with a current torch (zip format): torch.save(torch.load(path), path)"
    if head[:1] == b"\x80":
        return f"{path} is a plain pickle, not a torch checkpoint; save the state dict with torch.save"
    return f"{path} is not a checkpoint: expected a torch .pth/.bin (zip) or a .safetensors file"


def _archive_root(archive: zipfile.ZipFile, path: Path) -> str:
    """The folder holding data.pkl: torch names it after the file stem, so it is found, not assumed."""
    roots = [name.removesuffix("data.pkl") for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(roots) != 1:
        raise WeightsError(f"{path} is a zip but not a torch checkpoint (no single <name>/data.pkl inside); save the state dict with torch.save")
    return roots[0]


def _data_offset(f: io.BufferedReader, info: zipfile.ZipInfo, path: Path) -> int:
    """Where a member's bytes start: after its local header, whose extra field torch pads for alignment."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or not header.startswith(ZIP_MAGIC):
        raise WeightsError(f"{path} is corrupt: the zip entry {info.filename} has no valid header; download it again")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def view_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many storage elements a non-empty strided view spans, from its first to its last."""
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))


def _read_view(path: Path, start: int, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    np_dtype = raw_dtype(dtype)
    numel = math.prod(shape)
    if numel == 0:
        return np.empty(shape, dtype=np_dtype)
    if _is_contiguous(shape, stride):
        return read_span(path, start, numel * np_dtype.itemsize).view(np_dtype).reshape(shape)
    window = read_span(path, start, view_extent(shape, stride) * np_dtype.itemsize).view(np_dtype)
    view = np.lib.stride_tricks.as_strided(window, shape, tuple(step * np_dtype.itemsize for step in stride))
    return view.copy()


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """A small member's bytes, refused when it declares more than `limit` and never inflated past it."""
    if info.file_size > limit:
        raise WeightsError(f"{path}: its {info.filename} declares {info.file_size} bytes, over the {limit} a torch checkpoint writes; "
                           "the file is damaged or not a checkpoint")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise WeightsError(f"{path}: its {info.filename} inflates past the {limit} bytes it may hold; the file is damaged or not a checkpoint")
    return data


def _check_directory(f: io.BufferedReader, path: Path) -> None:
    """Refuse a zip whose central directory declares more entries or bytes than a checkpoint can
    have, before `zipfile` lists it. A zip too damaged to find the record in is left to `zipfile`,
    which names the damage."""
    size = f.seek(0, io.SEEK_END)
    f.seek(max(0, size - _END_SEARCH_BYTES))
    tail = f.read(_END_SEARCH_BYTES)
    at = tail.rfind(_END_OF_DIRECTORY)
    if at < 0 or at + 22 > len(tail):
        return
    entries, directory_bytes = struct.unpack("<HI", tail[at + 10:at + 16])
    if at >= 20 and tail[at - 20:at - 16] == _ZIP64_LOCATOR:
        (record,) = struct.unpack("<Q", tail[at - 12:at - 4])
        zip64 = b""
        if record + 56 <= size:
            f.seek(record)
            zip64 = f.read(56)
        if len(zip64) == 56:
            entries64, directory64 = struct.unpack("<QQ", zip64[32:48])
            entries, directory_bytes = max(entries, entries64), max(directory_bytes, directory64)
    if entries > MAX_ZIP_ENTRIES or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise WeightsError(f"{path} declares {entries:,} zip entries in {directory_bytes:,} bytes of directory, over the "
                           f"{MAX_ZIP_ENTRIES:,} entries and {MAX_ZIP_DIRECTORY_BYTES >> 20} MiB a torch checkpoint can have; "
                           "the file is damaged or not a checkpoint")


def open_pth(path: str | Path) -> dict[str, LazyTensor]:
    """Open a torch zip checkpoint: its tensors, in file order, with their data still on disk.

    Only the directory (at most `MAX_ZIP_ENTRIES`), `data.pkl` (stored, at most `MAX_PICKLE_BYTES`)
    and `byteorder` (a few bytes) are read from the zip; storages are read in place, so no entry
    is ever inflated.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no checkpoint at {path}; check the path")
    check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
        if not head.startswith(ZIP_MAGIC):
            raise WeightsError(_not_a_zip(path, head))
        _check_directory(f, path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            root = _archive_root(archive, path)
            pickle_info = members[root + "data.pkl"]
            if pickle_info.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(f"{path}: its data.pkl is compressed, which torch never writes; re-save the checkpoint with torch.save")
            pickled = _read_member(archive, pickle_info, MAX_PICKLE_BYTES, path)
            # torch before 2.1 wrote no byteorder record, and only little-endian data
            byteorder = _read_member(archive, members[root + "byteorder"], MAX_BYTEORDER_BYTES, path) if root + "byteorder" in members else b"little"
    # A damaged zip fails in zipfile in many ways: NotImplementedError for a compression method
    # it cannot inflate, UnicodeDecodeError for a name, struct.error or OverflowError for a field.
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError, ValueError, struct.error, OverflowError) as e:
        raise WeightsError(f"{path} is truncated or corrupt ({e}); download it again") from None
    if byteorder != b"little":
        raise WeightsError(f"{path} stores {byteorder.decode(errors='replace')}-endian data, which is not supported; re-save it on a little-endian machine")
    records = _state_dict(_unpickle(pickled, path), path)

    file_size = path.stat().st_size
    starts: dict[str, int] = {}
    tensors: dict[str, LazyTensor] = {}
    with open(path, "rb") as f:
        for name, record in records.items():
            storage = record.storage
            member = members.get(f"{root}data/{storage.key}")
            if member is None:
                raise WeightsError(f"{path} is damaged: storage data/{storage.key} of {name!r} is missing from the archive; download it again")
            if member.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(f"{path}: storage data/{storage.key} is compressed, which torch never writes; re-save the checkpoint with torch.save")
            if storage.key not in starts:
                starts[storage.key] = _data_offset(f, member, path)
                if starts[storage.key] + member.file_size > file_size:
                    raise WeightsError(f"{path} is truncated: storage data/{storage.key} runs past the end of the file; download it again")
            size = itemsize(storage.dtype)
            if math.prod(record.shape) and (record.offset + view_extent(record.shape, record.stride)) * size > member.file_size:
                raise WeightsError(f"{path} is corrupt: {name!r} reaches past the end of its storage data/{storage.key}; download it again")
            start = starts[storage.key] + record.offset * size
            reader = partial(_read_view, path, start, storage.dtype, record.shape, record.stride)
            tensors[name] = LazyTensor(name, record.shape, storage.dtype, reader)
    return tensors
