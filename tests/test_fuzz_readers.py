"""Seeded fuzzing of the readers a hostile file reaches first: torch `.pth`, safetensors, manifests.

Each case damages a fixture file (a truncation, bit flips biased towards the structure a reader
parses, or an edit of a header field) and then opens it and reads every tensor. A reader may
accept the damage (a flipped bit inside tensor data is undetectable) or refuse it with one of
our `StarFlowError`s; any other exception, a hang or a memory blow-up is a failure. The seeds are
fixed, so a failing case reproduces by its number.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from mlx_starflow.convert.checkpoint import open_checkpoint
from mlx_starflow.errors import StarFlowError
from mlx_starflow.model_io import read_manifest, write_manifest

CASES = 200
TIME_BUDGET_S = 30.0
RSS_GROWTH_LIMIT = 512 << 20


def _pth_structure(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Byte ranges a .pth reader parses: each entry's local header, data.pkl, and the central directory."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    spans = [(info.header_offset, info.header_offset + 30 + len(info.filename) + 64) for info in infos]
    pickle_info = next(info for info in infos if info.filename.endswith("data.pkl"))
    spans.append((pickle_info.header_offset, pickle_info.header_offset + 100 + pickle_info.file_size))
    spans.append((data.rfind(b"PK\x01\x02", 0, len(data) - 22) - 2000, len(data)))
    return [(max(0, a), min(len(data), b)) for a, b in spans]


def _safetensors_structure(data: bytes) -> list[tuple[int, int]]:
    (length,) = struct.unpack("<Q", data[:8])
    return [(0, 8 + length)]


def _flip(rng: random.Random, data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        start, end = rng.choice(spans) if rng.random() < 0.8 else (0, len(data))
        position = rng.randrange(start, end)
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite_field(rng: random.Random, data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """A 2-, 4- or 8-byte field inside the parsed structure set to 0, all ones or a random value."""
    width = rng.choice((2, 4, 8))
    start, end = rng.choice(spans)
    position = rng.randrange(start, max(start + 1, end - width))
    value = rng.choice((0, (1 << (8 * width)) - 1, rng.getrandbits(8 * width)))
    return data[:position] + value.to_bytes(width, "little") + data[position + width:]


def _edit_safetensors_header(rng: random.Random, data: bytes) -> bytes:
    """A JSON-level edit of one header entry, the header rewritten with a matching length."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = rng.choice([key for key in header if key != "__metadata__"])
    entry = header[name]
    edit = rng.randrange(7)
    if edit == 0:
        entry["shape"] = [rng.choice((0, 1, 3, 1 << 40, -1))] + entry["shape"][1:]
    elif edit == 1:
        entry["data_offsets"] = [rng.randrange(0, 1 << 20), rng.randrange(0, 1 << 20)]
    elif edit == 2:
        entry["dtype"] = rng.choice(("BOOL", "I64", "F64", "F8_E5M2", "", 7))
    elif edit == 3:
        del entry[rng.choice(list(entry))]
    elif edit == 4:
        other = rng.choice(list(header))
        entry["data_offsets"] = list(header[other].get("data_offsets", [0, 0]))
    elif edit == 5:
        header[name] = rng.choice((None, [], "x", {"nested": [[[1]]]}))
    else:
        header["__metadata__"] = rng.choice(({"k": 1}, [1], {"k": "v" * 10}))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def _read_everything(path: Path) -> None:
    for tensor in open_checkpoint(path).values():
        tensor.raw()


def _fuzz(tmp_path: Path, source: Path, seed: int, structure: Callable[[bytes], list[tuple[int, int]]],
          edit: Callable[[random.Random, bytes], bytes], suffix: str) -> None:
    data = source.read_bytes()
    spans = structure(data)
    rng = random.Random(seed)
    started = time.monotonic()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for case in range(CASES):
        kind = rng.randrange(4)
        if kind == 0:
            damaged = data[:rng.randrange(len(data))]
        elif kind == 1:
            damaged = _flip(rng, data, spans)
        elif kind == 2:
            damaged = _overwrite_field(rng, data, spans)
        else:
            damaged = edit(rng, data)
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(damaged)
        try:
            _read_everything(path)
        except StarFlowError as e:
            assert "\n" not in str(e), f"case {case}: {e}"
        except Exception as e:  # noqa: BLE001 - the point of the test is to catch any other exception
            pytest.fail(f"seed {seed} case {case} ({['truncation', 'bit flips', 'field overwrite', 'header edit'][kind]}): "
                        f"{type(e).__name__}: {e}")
        path.unlink()
    assert time.monotonic() - started < TIME_BUDGET_S
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before < RSS_GROWTH_LIMIT


def test_fuzzed_pth_files_give_our_errors_only(fixtures_dir: Path, tmp_path: Path) -> None:
    source = fixtures_dir / "vae" / "finetuned" / "pytorch_model.bin"

    def pth_edit(rng: random.Random, data: bytes) -> bytes:
        return _overwrite_field(rng, data, _pth_structure(data, source)[-1:])

    _fuzz(tmp_path, source, 9, lambda data: _pth_structure(data, source), pth_edit, ".pth")


def test_fuzzed_safetensors_files_give_our_errors_only(fixtures_dir: Path, tmp_path: Path) -> None:
    source = fixtures_dir / "t5" / "sharded" / "model-00002-of-00002.safetensors"
    _fuzz(tmp_path, source, 10, _safetensors_structure, _edit_safetensors_header, ".safetensors")


def test_fuzzed_manifests_give_our_errors_only(tmp_path: Path) -> None:
    folder = tmp_path / "component"
    folder.mkdir()
    (folder / "config.json").write_text('{"kind": "starflow.flow"}\n')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    write_manifest(folder, "starflow.flow", sources=[{"path": "model.pth", "sha256": "0" * 64}])
    original = (folder / "manifest.json").read_bytes()
    rng = random.Random(11)
    values = (None, 0, -1, 1 << 70, 1.5, "x", [], {}, [[[]]], {"bytes": "64", "sha256": 3}, "../../etc/passwd", "\0")
    for case in range(CASES):
        kind = rng.randrange(3)
        if kind == 0:
            damaged = original[:rng.randrange(len(original))]
        elif kind == 1:
            damaged = _flip(rng, original, [(0, len(original))])
        else:
            manifest = json.loads(original)
            target = manifest if rng.random() < 0.5 else manifest["files"]
            key = rng.choice([*target, "model.safetensors", "/etc/hostname", "a\0b", "x" * 5000])
            target[key] = rng.choice(values)
            damaged = json.dumps(manifest).encode()
        (folder / "manifest.json").write_bytes(damaged)
        try:
            read_manifest(folder, verify_hashes=rng.random() < 0.5)
        except StarFlowError as e:
            assert "\n" not in str(e), f"case {case}: {e}"
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"manifest case {case}: {type(e).__name__}: {e}")
