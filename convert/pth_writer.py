"""Torch-compatible `.pth` checkpoints written without torch, one tensor at a time.

The layout mirrors what `torch.save(state_dict)` writes, so `torch.load(path, weights_only=True)`
reads it: a zip whose members sit in a folder named after the file stem (`data.pkl`,
`.format_version`, `.storage_alignment`, `byteorder`, `data/<key>` per storage, `version`,
`.data/serialization_id`), stored uncompressed with each member's data aligned to 64 bytes by
padding the local header's extra field, a data descriptor after each member and zip64 end records.
`data.pkl` is a protocol-2 pickle of an OrderedDict of `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, False, OrderedDict())` calls whose storages are persistent ids
`('storage', torch.<Type>Storage, key, 'cpu', numel)`: the only globals it names are the three a
`weights_only` load allows. Storages are written as their producers make them, so a checkpoint of
any size holds about one tensor in memory.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np

from mlx_starflow.errors import ConfigError, WeightsError

from .tensors import FLOAT_DTYPES, TensorEntry, Tensors, as_entries, atomic_file, check_entries, mlx_dtype, produce_raw, raw_to_mlx
from .pth_reader import TORCH_STORAGE_DTYPES, view_extent

_STORAGE_CLASS = {dtype: name for name, dtype in TORCH_STORAGE_DTYPES.items()}
_ALIGNMENT = 64
_SETITEMS_BATCH = 1000  # what Python's pickler uses
_ZIP64_LIMIT = 0xFFFFFFFF
_FLAGS = 0x0808  # sizes and CRC follow the data in a descriptor; names are UTF-8 (as torch sets them)


@dataclass(frozen=True)
class TensorView:
    """A state-dict tensor as torch pickles it: a strided window onto one storage of the archive."""

    name: str
    storage: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # None: contiguous, row-major
    offset: int = 0

    def strides(self) -> tuple[int, ...]:
        if self.stride is not None:
            return self.stride
        return tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))


class _PickleWriter:
    """Emits the protocol-2 opcodes a torch state-dict pickle is made of, memoising as pickle does."""

    def __init__(self) -> None:
        self.data = bytearray(b"\x80\x02")  # PROTO 2
        self._memo: dict[tuple[str, ...], int] = {}

    def _remember(self, key: tuple[str, ...]) -> None:
        index = self._memo[key] = len(self._memo)
        self.data += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _recall(self, key: tuple[str, ...]) -> bool:
        index = self._memo.get(key)
        if index is None:
            return False
        self.data += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def op(self, code: bytes) -> None:
        self.data += code

    def global_(self, module: str, name: str) -> None:
        if not self._recall(("global", module, name)):
            self.data += b"c" + f"{module}\n{name}\n".encode()
            self._remember(("global", module, name))

    def text(self, value: str) -> None:
        if not self._recall(("str", value)):
            encoded = value.encode()
            self.data += b"X" + struct.pack("<I", len(encoded)) + encoded
            self._remember(("str", value))

    def integer(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.data += b"K" + bytes([value])
        elif 0 <= value < 1 << 16:
            self.data += b"M" + struct.pack("<H", value)
        elif -(1 << 31) <= value < 1 << 31:
            self.data += b"J" + struct.pack("<i", value)
        else:
            encoded = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
            self.data += b"\x8a" + bytes([len(encoded)]) + encoded

    def int_tuple(self, values: tuple[int, ...]) -> None:
        if len(values) > 3:
            self.op(b"(")
        for value in values:
            self.integer(value)
        self.op({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t"))


def state_dict_pickle(views: Sequence[TensorView], storages: Mapping[str, tuple[str, int]]) -> bytes:
    """`data.pkl` for tensors viewing storages given as key -> (dtype, numel)."""
    pickle = _PickleWriter()
    pickle.global_("collections", "OrderedDict")
    pickle.op(b")R")  # OrderedDict()
    for start in range(0, len(views), _SETITEMS_BATCH):
        pickle.op(b"(")
        for view in views[start : start + _SETITEMS_BATCH]:
            dtype, numel = storages[view.storage]
            pickle.text(view.name)
            pickle.global_("torch._utils", "_rebuild_tensor_v2")
            pickle.op(b"((")
            pickle.text("storage")
            pickle.global_("torch", _STORAGE_CLASS[dtype])
            pickle.text(view.storage)
            pickle.text("cpu")
            pickle.integer(numel)
            pickle.op(b"tQ")  # the tuple becomes a persistent id
            pickle.integer(view.offset)
            pickle.int_tuple(view.shape)
            pickle.int_tuple(view.strides())
            pickle.op(b"\x89")  # requires_grad=False
            pickle.global_("collections", "OrderedDict")
            pickle.op(b")R")  # backward hooks: OrderedDict()
            pickle.op(b"tR")  # _rebuild_tensor_v2(*args)
        pickle.op(b"u")  # SETITEMS
    pickle.op(b".")
    return bytes(pickle.data)


class _TorchZip:
    """A zip laid out as torch's writer lays it out (see the module docstring)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, offset

    def add(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> int:
        """Write one stored member from its chunks; returns its CRC-32."""
        offset = self._f.tell()
        encoded = name.encode()
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        padding = -(offset + 30 + len(encoded) + len(extra) + 4) % _ALIGNMENT
        extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
        stated = _ZIP64_LIMIT if zip64 else 0
        # local header: signature, version needed, flags, method (stored), time, date, CRC, sizes, name and extra lengths
        self._f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 0, _FLAGS, 0, 0, 0, 0, stated, stated, len(encoded), len(extra)))
        self._f.write(encoded + extra)
        crc, written = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            written += len(chunk)
            self._f.write(chunk)
        if written != size:
            raise WeightsError(f"{name}: {written} bytes were produced where {size} were declared")
        self._f.write(struct.pack("<IIQQ" if zip64 else "<IIII", 0x08074B50, crc, size, size))
        self._entries.append((encoded, crc, size, offset))
        return crc

    def close(self) -> None:
        directory_offset = self._f.tell()
        for encoded, crc, size, offset in self._entries:
            large = [value for value in (size, size, offset) if value >= _ZIP64_LIMIT]
            extra = struct.pack(f"<HH{len(large)}Q", 1, 8 * len(large), *large) if large else b""
            size32, offset32 = min(size, _ZIP64_LIMIT), min(offset, _ZIP64_LIMIT)
            # central record: signature, versions made by / needed, flags, method, time, date, CRC, sizes,
            # name / extra / comment lengths, disk, internal and external attributes, local header offset
            self._f.write(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 45 if large else 0, _FLAGS, 0, 0, 0,
                crc, size32, size32, len(encoded), len(extra), 0, 0, 0, 0, offset32,
            ))
            self._f.write(encoded + extra)
        directory_size = self._f.tell() - directory_offset
        count = len(self._entries)
        end64_offset = self._f.tell()
        # zip64 end record, its locator, then the classic end record (saturated where zip64 is needed)
        self._f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count, directory_size, directory_offset))
        self._f.write(struct.pack("<IIQI", 0x07064B50, 0, end64_offset, 1))
        self._f.write(struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
            min(directory_size, _ZIP64_LIMIT), min(directory_offset, _ZIP64_LIMIT), 0,
        ))


def _serialization_id(names: list[str], crcs: list[int]) -> bytes:
    """40 digits derived from the record names and contents, as torch's id is (torch never checks it)."""
    name_digest = hashlib.sha256("\n".join(names).encode()).digest()
    crc_digest = hashlib.sha256(b"".join(crc.to_bytes(4, "little") for crc in crcs)).digest()
    return f"{int.from_bytes(name_digest[:8], 'little'):020d}{int.from_bytes(crc_digest[:8], 'little'):020d}".encode()


def _check_views(views: Sequence[TensorView], storages: Mapping[str, tuple[str, int]]) -> None:
    names = [view.name for view in views]
    if len(set(names)) != len(names) or not all(isinstance(name, str) and name for name in names):
        raise WeightsError("every tensor of a checkpoint needs its own non-empty string name")
    for view in views:
        if view.storage not in storages:
            raise WeightsError(f"tensor {view.name!r} views storage {view.storage!r}, which is not written; add it")
        numel = storages[view.storage][1]
        stride = view.strides()
        if len(stride) != len(view.shape) or min((*view.shape, *stride, view.offset), default=0) < 0:
            raise WeightsError(f"tensor {view.name!r} has shape {view.shape} and stride {stride}; give both one non-negative entry per axis")
        if math.prod(view.shape) and view.offset + view_extent(view.shape, stride) > numel:
            raise WeightsError(f"tensor {view.name!r} reaches past the end of storage {view.storage!r} ({numel} elements)")


def write_pth(path: str | Path, storages: Sequence[TensorEntry | tuple], views: Sequence[TensorView]) -> None:
    """Write a torch checkpoint whose tensors are `views` onto `storages` (entries named by key).

    This is the general form `save_pth` uses; it can also share one storage between tensors or
    give them offsets and strides, as torch itself does for views.
    """
    path = Path(path)
    entries = as_entries(storages)
    check_entries(entries)
    for entry in entries:
        if entry.dtype not in _STORAGE_CLASS:
            raise WeightsError(f"tensor {entry.name!r} is {entry.dtype}, which torch checkpoints cannot hold; write it to safetensors instead")
        if "/" in entry.name:
            raise WeightsError(f"storage key {entry.name!r} contains '/'; use keys like '0', '1', …")
    numels = {entry.name: (entry.dtype, math.prod(entry.shape)) for entry in entries}
    _check_views(views, numels)
    root = path.stem
    with atomic_file(path) as f:
        archive = _TorchZip(f)
        crcs: list[int] = []
        records: list[str] = []

        def add(record: str, size: int, chunks: Iterable[bytes | memoryview]) -> None:
            crcs.append(archive.add(f"{root}/{record}", size, chunks))
            records.append(f"{root}/{record}")

        pickled = state_dict_pickle(views, numels)
        add("data.pkl", len(pickled), [pickled])
        for record, content in ((".format_version", b"1"), (".storage_alignment", str(_ALIGNMENT).encode()), ("byteorder", b"little")):
            add(record, len(content), [content])
        for entry in entries:
            raw = produce_raw(entry)
            add(f"data/{entry.name}", raw.nbytes, [raw.reshape(-1).view(np.uint8)])
            del raw  # free this tensor before the next producer runs
        add("version", 2, [b"3\n"])
        identifier = _serialization_id(records, crcs)
        archive.add(f"{root}/.data/serialization_id", len(identifier), [identifier])
        archive.close()


def _cast(entry: TensorEntry, dtype: str) -> TensorEntry:
    if entry.dtype not in FLOAT_DTYPES or entry.dtype == dtype:
        return entry

    def produce() -> mx.array:
        # float64 exists only on MLX's CPU stream, so every cast runs there.
        return raw_to_mlx(produce_raw(entry), entry.dtype).astype(mlx_dtype(dtype), stream=mx.cpu)

    return TensorEntry(entry.name, dtype, entry.shape, produce)


def save_pth(path: str | Path, tensors: Tensors, *, dtype: str | None = None) -> None:
    """Write a flat state dict that `torch.load` reads, from arrays or streaming entries.

    `tensors` is a name -> array mapping or `(name, dtype, shape, producer)` entries (see
    `write_safetensors`); with entries, memory stays near one tensor. `dtype` casts every floating
    tensor (float32, float16, bfloat16 or float64); integer and bool tensors keep theirs.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not a floating dtype; use one of {', '.join(sorted(FLOAT_DTYPES))}")
    entries = as_entries(tensors)
    if dtype is not None:
        entries = [_cast(entry, dtype) for entry in entries]
    check_entries(entries)
    storages = [TensorEntry(str(key), entry.dtype, entry.shape, entry.producer) for key, entry in enumerate(entries)]
    views = [TensorView(entry.name, str(key), entry.shape) for key, entry in enumerate(entries)]
    write_pth(path, storages, views)
