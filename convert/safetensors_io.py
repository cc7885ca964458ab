"""Safetensors read lazily and written as a stream, without the safetensors package.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes. The reader parses the header and reads one tensor's
range when it is materialised; a Hugging Face sharded checkpoint is a merged view over its shards.
The writer computes every range from dtypes and shapes, writes the header first and then each
tensor as its producer makes it, so writing a model holds about one tensor in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mlx_starflow.config import parse_json, read_json_object
from mlx_starflow.errors import ConfigError, ModelNotFound, WeightsError

from .tensors import (LazyTensor, TensorEntry, Tensors, as_entries, atomic_file, check_entries, check_regular_file, itemsize,
                      produce_raw, raw_dtype, read_span)

_DTYPE_BY_CODE: dict[str, str] = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}
_METADATA_KEY = "__metadata__"
_MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces
_ALIGNMENT = 8


def looks_like_safetensors(path: Path) -> bool:
    """A plausible header length followed by the JSON object's opening brace."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and 0 < struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER_BYTES and head[8:] == b"{"


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the file offset where tensor data begins; a folder, device or
    FIFO is refused before it is opened."""
    check_regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise WeightsError(f"{path} is truncated ({size} bytes, shorter than a safetensors header); download it again")
        (length,) = struct.unpack("<Q", length_bytes)
        if length > _MAX_HEADER_BYTES:
            raise WeightsError(f"{path} has a bad safetensors header (it claims {length} header bytes); the file is corrupt or not safetensors")
        if 8 + length > size:
            raise WeightsError(f"{path} is truncated: its header needs {length} bytes but the file ends first; download it again")
        text = f.read(length)
    try:
        header = parse_json(text)
    except ValueError as e:
        raise WeightsError(f"{path} has a bad safetensors header ({e}); the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} has a bad safetensors header (not a JSON object); the file is corrupt or not safetensors")
    return header, 8 + length


def _tensor_info(path: Path, name: str, info: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against itself and the file."""
    bad = f"{path} has a bad safetensors header entry for {name!r}"
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise WeightsError(f"{bad} ({info!r:.80}); the file is corrupt")
    dtype = _DTYPE_BY_CODE.get(info["dtype"])
    if dtype is None:
        raise WeightsError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which is not supported; convert it to one of {', '.join(_DTYPE_BY_CODE)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise WeightsError(f"{bad} (shape {shape!r}); the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"{bad} (data_offsets {offsets!r}); the file is corrupt")
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize(dtype):
        raise WeightsError(f"{bad}: {end - begin} bytes for {dtype} {shape}; the file is corrupt")
    if end > data_bytes:
        raise WeightsError(f"{path} is truncated: {name!r} ends at byte {end} of the data, which has only {data_bytes}; download it again")
    return dtype, tuple(shape), begin, end


def _read_tensor(path: Path, start: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    np_dtype = raw_dtype(dtype)
    return read_span(path, start, math.prod(shape) * np_dtype.itemsize).view(np_dtype).reshape(shape)


def open_safetensors(path: str | Path) -> dict[str, LazyTensor]:
    """Open a safetensors file: its tensors, in file order, with their data still on disk."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no checkpoint at {path}; check the path")
    header, data_start = _read_header(path)
    data_bytes = path.stat().st_size - data_start
    entries = []
    for name, info in header.items():
        if name != _METADATA_KEY:
            entries.append((name, *_tensor_info(path, name, info, data_bytes)))
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    _check_disjoint(path, entries)
    return {
        name: LazyTensor(name, shape, dtype, partial(_read_tensor, path, data_start + begin, dtype, shape))
        for name, dtype, shape, begin, _ in entries
    }


def _check_disjoint(path: Path, entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> None:
    """Two tensors sharing bytes would silently alias each other: refuse (entries sorted by range)."""
    reach, owner = 0, ""
    for name, _, _, begin, end in entries:
        if begin == end:
            continue
        if begin < reach:
            raise WeightsError(f"{path} is corrupt: {owner!r} and {name!r} overlap in the file; download it again")
        reach, owner = end, name


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The free-form string metadata of a safetensors file (empty when it has none)."""
    header, _ = _read_header(Path(path))
    metadata = header.get(_METADATA_KEY, {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path} has bad safetensors metadata (not a string -> string map); the file is corrupt")
    return metadata


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The `{tensor name: shard file}` map of a Hugging Face `*.index.json`, checked."""
    if not index_path.exists():
        raise ModelNotFound(f"no checkpoint index at {index_path}; check the path")
    check_regular_file(index_path, "checkpoint index")
    try:
        index = read_json_object(index_path, "download it again")
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    weight_map = index.get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise WeightsError(f"{index_path} has no weight_map of tensor names to shard files; download it again")
    return weight_map


def shard_files(index_path: str | Path, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """The shard files that hold at least one wanted tensor, in index order."""
    return list(dict.fromkeys(shard for name, shard in read_weight_map(Path(index_path)).items() if wanted(name)))


def open_sharded(
    index_path: str | Path,
    open_shard: Callable[[Path], dict[str, LazyTensor]] = open_safetensors,
    wanted: Callable[[str], bool] = lambda name: True,
) -> dict[str, LazyTensor]:
    """Open a Hugging Face sharded checkpoint through its `*.index.json` as one merged view.

    Only the tensors `wanted` accepts are opened, so a shard holding none of them (flan-t5-xl's
    decoder-only shard) is neither read nor required to exist.
    """
    index_path = Path(index_path)
    weight_map = {name: shard for name, shard in read_weight_map(index_path).items() if wanted(name)}
    tensors: dict[str, LazyTensor] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        if Path(shard_name).name != shard_name or shard_name.endswith(".index.json"):
            raise WeightsError(f"{index_path} names shard {shard_name!r}, which is not a file beside the index; the index is corrupt")
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise WeightsError(f"{index_path} names shard {shard_name}, which is missing; download it again")
        tensors.update((name, tensor) for name, tensor in open_shard(shard).items() if weight_map.get(name) == shard_name)
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise WeightsError(f"{index_path}: {', '.join(missing[:5])} ({len(missing)} in all) are not in the shards the index names for them; download the checkpoint again")
    return tensors


def _header_bytes(entries: list[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError("safetensors metadata must map strings to strings; convert its values with str()")
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for entry in entries:
        if entry.dtype not in _CODE_BY_DTYPE:
            raise WeightsError(f"tensor {entry.name!r} has dtype {entry.dtype}, which safetensors cannot hold")
        nbytes = math.prod(entry.shape) * itemsize(entry.dtype)
        header[entry.name] = {"dtype": _CODE_BY_DTYPE[entry.dtype], "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % _ALIGNMENT)


def write_safetensors(path: str | Path, tensors: Tensors, metadata: Mapping[str, str] | None = None) -> None:
    """Write `(name, dtype, shape, producer)` entries, or a name -> array mapping, to safetensors.

    Each producer runs just before its tensor is written, so memory stays near one tensor. The file
    appears at `path` only when complete; a producer whose array disagrees with its declared dtype
    or shape stops the write with an error.
    """
    entries = as_entries(tensors)
    check_entries(entries)
    if any(entry.name == _METADATA_KEY for entry in entries):
        raise WeightsError(f"{_METADATA_KEY} is reserved in safetensors; rename that tensor")
    header = _header_bytes(entries, metadata)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for entry in entries:
            f.write(produce_raw(entry).reshape(-1).view(np.uint8))
