"""Torch-free checkpoint reading and streaming writing, checked against files torch itself wrote.

The fixture checkpoints come from `torch.save` (fixtures/starflow/README.md §4, t5/README.md §2,
vae/README.md §4). MLX's own safetensors loader, `mx.load`, is the independent reader the torch
files are compared with. Every comparison is exact (tolerance 0, bit for bit): reading stored
bytes is either right or wrong, and the fp16/bf16 fixtures are defined as the float32 weights
rounded to that dtype.
"""

import json
import os
import pickle
import pickletools
import struct
import tracemalloc
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.convert.checkpoint import TensorEntry, open_checkpoint
from mlx_starflow.convert.pth_writer import TensorView, save_pth, write_pth
from mlx_starflow.convert.safetensors_io import open_safetensors, safetensors_metadata, write_safetensors
from mlx_starflow.config import FlowConfig
from mlx_starflow.errors import ConfigError, ModelNotFound, WeightsError

MiB = 1 << 20


def bits(array: mx.array) -> np.ndarray:
    """An array's stored bits, so that comparisons are exact and NaN-safe."""
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[array.dtype.size]
    return np.array(array.view(unsigned) if array.dtype != mx.bool_ else array)


def assert_same(actual: mx.array, expected: mx.array) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(bits(actual), bits(expected))


def zip_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def data_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def rezip(source: Path, target: Path, pickled: bytes | None = None, drop: str | None = None) -> None:
    """A copy of a torch checkpoint with another data.pkl and/or one member left out."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            if name == drop:
                continue
            dst.writestr(name, pickled if pickled is not None and name.endswith("/data.pkl") else src.read(name))


def torch_zip(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{path.stem}/data.pkl", pickled)
        archive.writestr(f"{path.stem}/byteorder", b"little")
        archive.writestr(f"{path.stem}/version", b"3\n")


def wrap_pickle(state_dict_pickle: bytes, key: str, extra_int: str | None = None) -> bytes:
    """`{key: <the state dict>}` (plus `{extra_int: 3}`) around a torch-written pickle's body."""
    body = state_dict_pickle[2:-1]  # drop PROTO 2 and STOP: what remains pushes the OrderedDict
    encoded = key.encode()
    wrapped = b"\x80\x02}(X" + struct.pack("<I", len(encoded)) + encoded + body
    if extra_int:
        wrapped += b"X" + struct.pack("<I", len(extra_int)) + extra_int.encode() + b"K\x03"
    return wrapped + b"u."


# --- the official checkpoints ------------------------------------------------------------------


def test_official_model_pth_reads_as_documented(fixtures_dir):
    tensors = open_checkpoint(fixtures_dir / "starflow" / "model.pth")
    assert len(tensors) == 131 and next(iter(tensors)) == "var"
    assert {t.dtype for t in tensors.values()} == {"float32"}
    shapes = {
        "var": (64, 4),
        "blocks.0.sos_embed": (1, 1, 4),
        "blocks.0.attn_mask": (80, 80),
        "blocks.0.proj_out.weight": (8, 128),
        "blocks.5.proj_txt.weight": (128, 32),
        "blocks.0.attn_blocks.0.attention.qkv.weight": (384, 128),
        "blocks.0.attn_blocks.0.mlp.main.0.weight": (512, 128),
        "feat_rope.freqs_cos": (80, 64),
    }
    assert {name: tensors[name].shape for name in shapes} == shapes
    # README §4: `var` is a buffer of ones, `attn_mask` tril ones, the feat_rope buffers zeros.
    np.testing.assert_array_equal(tensors["var"].numpy(), np.ones((64, 4), np.float32))
    np.testing.assert_array_equal(tensors["blocks.3.attn_mask"].numpy(), np.tril(np.ones((80, 80), np.float32)))
    qkv = tensors["blocks.5.attn_blocks.0.attention.qkv.weight"]
    assert qkv.nbytes == 384 * 128 * 4 and np.isfinite(qkv.numpy()).all() and qkv.numpy().std() > 0


def test_feat_rope_buffers_share_one_storage(fixtures_dir):
    path = fixtures_dir / "starflow" / "model.pth"
    data_members = [n for n in zip_members(path) if "/data/" in n and "/.data/" not in n]
    assert len(data_members) == 130  # 131 tensors: the two feat_rope buffers share a storage
    tensors = open_checkpoint(path)
    for name in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        np.testing.assert_array_equal(tensors[name].numpy(), np.zeros((80, 64), np.float32))


@pytest.mark.parametrize("variant,dtype", [("model_fp16.pth", mx.float16), ("model_bf16.pth", mx.bfloat16)])
def test_half_precision_checkpoints_are_the_rounded_float32_weights(fixtures_dir, variant, dtype):
    full = open_checkpoint(fixtures_dir / "starflow" / "model.pth")
    half = open_checkpoint(fixtures_dir / "starflow" / variant)
    assert list(half) == list(full)
    for name, tensor in half.items():
        rounded = full[name].mlx().astype(dtype)
        assert_same(tensor.mlx(), rounded)
        np.testing.assert_array_equal(tensor.numpy(), np.array(rounded.astype(mx.float32)))


def test_legacy_format_is_refused_with_the_fix(fixtures_dir):
    with pytest.raises(WeightsError, match=r"legacy torch serialization is not supported; re-save it with a current torch \(zip format\)"):
        open_checkpoint(fixtures_dir / "starflow" / "model_legacy_format.pth")


def test_t5_bin_with_shared_storage_matches_safetensors(fixtures_dir):
    path = fixtures_dir / "t5" / "pytorch_bin" / "pytorch_model.bin"
    assert next(iter(zip_members(path))).startswith("pytorch_model/")
    assert sum("/data/" in n and "/.data/" not in n for n in zip_members(path)) == 52
    tensors = open_checkpoint(path)
    assert len(tensors) == 54
    reference = mx.load(str(fixtures_dir / "t5" / "model.safetensors"))
    assert set(reference) | {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} == set(tensors)
    for name, expected in reference.items():
        assert_same(tensors[name].mlx(), expected)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert_same(tensors[alias].mlx(), reference["shared.weight"])


@pytest.mark.parametrize("layout", ["", "model.safetensors", "sharded", "sharded/model.safetensors.index.json"])
def test_t5_safetensors_layouts_match_mlx_loader(fixtures_dir, layout):
    reference = mx.load(str(fixtures_dir / "t5" / "model.safetensors"))
    tensors = open_checkpoint(fixtures_dir / "t5" / layout)
    assert set(tensors) == set(reference) and len(tensors) == 52
    for name, expected in reference.items():
        assert_same(tensors[name].mlx(), expected)


def test_vae_checkpoints_match_each_other_and_the_base_weights(fixtures_dir):
    vae = fixtures_dir / "vae"
    base = mx.load(str(vae / "diffusion_pytorch_model.safetensors"))
    ours = open_checkpoint(vae)
    assert set(ours) == set(base)
    for name, expected in base.items():
        assert_same(ours[name].mlx(), expected)
    # README §3: the px82zaheuu names map to diffusers names by these renames; the .pth is the
    # same weights under `vae.`; the fine-tuning left the encoder and quant_conv untouched.
    renames = [("encoder.0", "encoder"), ("encoder.1", "quant_conv"), ("decoder.0", "post_quant_conv"), ("decoder.1", "decoder")]
    released = {}
    for name, tensor in open_checkpoint(vae / "finetuned" / "pytorch_model.bin").items():
        for old, new in renames:
            name = name.replace(old, new)
        released[name] = tensor
    wrapper = open_checkpoint(vae / "finetuned" / "dummy_model_sd-vae-ft-ema_0.30.pth")
    assert len(released) == len(wrapper) == 244 and set(released) == {n.removeprefix("vae.") for n in wrapper}
    for name, tensor in wrapper.items():
        assert_same(tensor.mlx(), released[name.removeprefix("vae.")].mlx())
    untouched = [n for n in base if n.startswith(("encoder.", "quant_conv."))]
    assert len(untouched) > 50
    for name in untouched:
        assert_same(released[name].mlx(), base[name])


# --- refusing what is not a plain state dict --------------------------------------------------


class _RunsCommand:
    def __init__(self, callable_, argument):
        self.callable_, self.argument = callable_, argument

    def __reduce__(self):
        return self.callable_, (self.argument,)


class _PlainObject:
    """Pickled by reference to its class: an arbitrary class from outside the allow-list."""


SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux and macOS
PLAIN_CLASS = f"{_PlainObject.__module__}._PlainObject"


def _payload(global_name: str, marker: Path) -> object:
    if global_name == SYSTEM:
        return _RunsCommand(os.system, f"touch {marker}")
    if global_name.endswith(".eval"):
        return _RunsCommand(eval, f"open({str(marker)!r}, 'w').close()")
    return _PlainObject()


# Protocol 2 (torch's) names builtins by their Python 2 module, `__builtin__`; protocol 4 does not.
@pytest.mark.parametrize("global_name,protocol", [(SYSTEM, 2), ("__builtin__.eval", 2), ("builtins.eval", 4), (PLAIN_CLASS, 2)])
def test_malicious_pickles_are_refused_before_running(tmp_path, global_name, protocol):
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps({"weight": _payload(global_name, marker)}, protocol=protocol)
    if global_name != PLAIN_CLASS:
        pickle.loads(blob)  # the payload is live: the standard unpickler runs it
        assert marker.exists()
        marker.unlink()
    path = tmp_path / "evil.pth"
    torch_zip(path, blob)
    with pytest.raises(WeightsError, match=rf"refusing to load .*the pickle asks for {global_name}; only tensors and plain containers are allowed"):
        open_checkpoint(path)
    assert not marker.exists()


def test_a_pickle_cannot_reconfigure_the_reader(fixtures_dir, tmp_path):
    # BUILD with slot state on the FloatStorage stand-in, trying to make float32 storages read as int64.
    retype = b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x05\x00\x00\x00int64s\x86b."
    # BUILD with a __dict__ update on the tensor-rebuild stand-in.
    rebind = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00__call__K\x01sb."
    for name, pickled in (("retype.pth", retype), ("rebind.pth", rebind)):
        torch_zip(tmp_path / name, pickled)
        with pytest.raises(WeightsError, match=r"is corrupt: its data\.pkl does not unpickle"):
            open_checkpoint(tmp_path / name)
    tensors = open_checkpoint(fixtures_dir / "starflow" / "model.pth")
    assert tensors["var"].dtype == "float32"
    np.testing.assert_array_equal(tensors["var"].numpy(), np.ones((64, 4), np.float32))


def test_wrapped_state_dict_is_unwrapped_and_other_contents_are_named(fixtures_dir, tmp_path):
    source = fixtures_dir / "starflow" / "model.pth"
    for key in ("model", "state_dict", "ema"):
        rezip(source, tmp_path / "wrapped.pth", pickled=wrap_pickle(data_pickle(source), key))
        assert list(open_checkpoint(tmp_path / "wrapped.pth")) == list(open_checkpoint(source))
    rezip(source, tmp_path / "training.pth", pickled=wrap_pickle(data_pickle(source), "model", extra_int="epoch"))
    with pytest.raises(WeightsError, match=r"not all tensors: 'model' \(a dict\), 'epoch' \(an int\)"):
        open_checkpoint(tmp_path / "training.pth")
    torch_zip(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(WeightsError, match="holds a list, not a dict of tensors"):
        open_checkpoint(tmp_path / "list.pth")


def test_damaged_and_foreign_files_are_refused_with_the_fix(fixtures_dir, tmp_path):
    whole = (fixtures_dir / "starflow" / "model.pth").read_bytes()
    cases = {
        "truncated.pth": (whole[: len(whole) // 2], "is truncated or corrupt"),
        "random.bin": (np.random.default_rng(0).bytes(4096), "is not a checkpoint: expected a torch .pth/.bin"),
        "empty.pth": (b"", "is empty"),
        "plain.pkl": (pickle.dumps({"a": 1}, protocol=2), "is a plain pickle, not a torch checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=message):
            open_checkpoint(tmp_path / name)
    with pytest.raises(ModelNotFound, match="no checkpoint at"):
        open_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(ModelNotFound, match="no checkpoint in"):
        open_checkpoint(tmp_path)


def test_missing_storage_is_named(fixtures_dir, tmp_path):
    # Renamed on purpose: the archive's root folder stays `model/`, and must be found, not assumed.
    rezip(fixtures_dir / "starflow" / "model.pth", tmp_path / "renamed.pth", drop="model/data/3")
    with pytest.raises(WeightsError, match=r"storage data/3 of 'blocks.0.proj_in.weight' is missing from the archive"):
        open_checkpoint(tmp_path / "renamed.pth")


def test_damaged_safetensors_are_refused(fixtures_dir, tmp_path):
    whole = (fixtures_dir / "t5" / "model.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", whole[:8])
    header = json.loads(whole[8 : 8 + header_length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F8_E4M3"
    unknown = json.dumps(header).encode()
    cases = {
        "bad_header.safetensors": (struct.pack("<Q", 12) + b"{not json!!}", "bad safetensors header"),
        "truncated.safetensors": (whole[:-100], "is truncated"),
        "unknown.safetensors": (struct.pack("<Q", len(unknown)) + unknown + whole[8 + header_length :], "dtype 'F8_E4M3', which is not supported"),
    }
    for file, (content, message) in cases.items():
        (tmp_path / file).write_bytes(content)
        with pytest.raises(WeightsError, match=message):
            open_checkpoint(tmp_path / file)


def test_sharded_checkpoint_with_a_missing_shard_is_refused(fixtures_dir, tmp_path):
    sharded = fixtures_dir / "t5" / "sharded"
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (tmp_path / name).write_bytes((sharded / name).read_bytes())
    with pytest.raises(WeightsError, match=r"names shard model-00002-of-00002\.safetensors, which is missing"):
        open_checkpoint(tmp_path)


def _set_declared_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory declares for `member` (46 bytes before its name)."""
    data = bytearray(path.read_bytes())
    at = data.rindex(member.encode()) - 46
    assert data[at : at + 4] == b"PK\x01\x02"
    data[at + 24 : at + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


def _bomb(path: Path, member: str, inflated: int) -> None:
    """A tiny torch zip whose `member` is deflated and inflates to `inflated` bytes of (mostly) zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        if member != "data.pkl":
            archive.writestr(f"{path.stem}/data.pkl", pickle.dumps({}, protocol=2))
        info = zipfile.ZipInfo(f"{path.stem}/{member}")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as entry:
            chunk = b"little" + bytes((1 << 20) - 6)
            for _ in range(inflated >> 20):
                entry.write(chunk)


@pytest.mark.parametrize("member", ["byteorder", "data.pkl"])
def test_zip_bombs_are_refused_quickly_with_bounded_memory(tmp_path, member):
    """Entries that inflate far past what torch writes are refused before (or while) inflating, never fully inflated."""
    path = tmp_path / "bomb.pth"
    _bomb(path, member, 64 << 20)
    assert path.stat().st_size < 200_000

    def refused(match: str) -> None:
        with pytest.raises(WeightsError, match=match):
            open_checkpoint(path)

    assert _peak_numpy_bytes(lambda: refused(r"bomb\.pth: its \S*(byteorder|data\.pkl) (declares|is compressed)")) < 4 * MiB
    # the same entry declaring only a few bytes: inflation stops where the declaration ends
    _set_declared_size(path, f"bomb/{member}", 6)
    assert _peak_numpy_bytes(lambda: refused(r"bomb\.pth")) < 4 * MiB


def test_big_endian_checkpoints_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "big.pth", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("big/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("big/byteorder", b"big")
    with pytest.raises(WeightsError, match="stores big-endian data, which is not supported"):
        open_checkpoint(tmp_path / "big.pth")


def test_non_regular_files_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(WeightsError, match=r"is not a regular file \(a device, FIFO or socket\); pass the checkpoint file itself"):
            open_checkpoint(path)
    with pytest.raises(WeightsError, match="is not a regular file"):
        open_safetensors(fifo)


def test_overlapping_safetensors_ranges_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    text = json.dumps(header).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(24))
    with pytest.raises(WeightsError, match=r"overlap\.safetensors is corrupt: 'a' and 'b' overlap in the file"):
        open_checkpoint(tmp_path / "overlap.safetensors")
    header["b"]["data_offsets"] = [16, 32]
    text = json.dumps(header).encode()
    (tmp_path / "apart.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(32))
    assert set(open_checkpoint(tmp_path / "apart.safetensors")) == {"a", "b"}


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    deep = b'{"a":' * 200_000 + b"1" + b"}" * 200_000
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(WeightsError, match=r"deep\.safetensors has a bad safetensors header \(nested deeper than 64 levels\)"):
        open_checkpoint(tmp_path / "deep.safetensors")
    (tmp_path / "model.safetensors.index.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(WeightsError, match="nested deeper than 64 levels"):
        open_checkpoint(tmp_path / "model.safetensors.index.json")
    folder = tmp_path / "flow"
    folder.mkdir()
    (folder / "config.json").write_bytes(deep)
    with pytest.raises(ConfigError, match=r"config\.json as JSON \(nested deeper than 64 levels\)"):
        FlowConfig.load(folder)


# --- writing ----------------------------------------------------------------------------------


def _mixed_tensors() -> dict[str, np.ndarray | mx.array]:
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((6, 5)).astype(np.float32)
    return {
        "f32": weights,
        "f16": mx.array(weights).astype(mx.float16),
        "bf16": mx.array(weights).astype(mx.bfloat16),
        "packed": rng.integers(0, 2**32, size=(4, 3), dtype=np.uint32),
        "steps": np.arange(-3, 4, dtype=np.int64),
        "small": rng.integers(-128, 128, size=(9,), dtype=np.int8),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_writer_round_trips_through_mlx_and_our_reader(tmp_path):
    arrays = _mixed_tensors()
    entries = [(name, *_declared(array), lambda array=array: array) for name, array in arrays.items()]
    path = tmp_path / "out.safetensors"
    write_safetensors(path, entries, metadata={"format": "mlx", "source": "test"})
    loaded, metadata = mx.load(str(path), return_metadata=True)
    assert metadata == {"format": "mlx", "source": "test"} == safetensors_metadata(path)
    ours = open_safetensors(path)
    assert list(ours) == list(arrays)
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_length % 8 == 0
    for name, array in arrays.items():
        expected = array if isinstance(array, mx.array) else mx.array(array)
        assert_same(loaded[name], expected)
        assert_same(ours[name].mlx(), expected)


def _declared(array: np.ndarray | mx.array) -> tuple[str, tuple[int, ...]]:
    dtype = str(array.dtype).removeprefix("mlx.core.")
    return dtype, tuple(array.shape)


@pytest.mark.parametrize(
    "entry,message",
    [
        (("w", "float32", (2, 3), lambda: np.zeros((3, 2), np.float32)), r"returned float32 \[3, 2\], but it was declared float32 \[2, 3\]"),
        (("w", "float16", (2,), lambda: np.zeros((2,), np.float32)), "returned float32 .* declared float16"),
        (("w", "complex64", (2,), lambda: np.zeros((2,), np.complex64)), "unknown dtype 'complex64'"),
    ],
)
def test_writers_validate_entries_and_leave_nothing_behind(tmp_path, entry, message):
    good = ("ok", "float32", (2,), lambda: np.ones((2,), np.float32))
    for write, name in ((write_safetensors, "out.safetensors"), (save_pth, "out.pth")):
        with pytest.raises(WeightsError, match=message):
            write(tmp_path / name, [good, entry])
    assert list(tmp_path.iterdir()) == []


def test_save_pth_round_trips_and_casts(tmp_path):
    arrays = {name: array for name, array in _mixed_tensors().items() if name != "packed"}
    save_pth(tmp_path / "plain.pth", arrays)
    ours = open_checkpoint(tmp_path / "plain.pth")
    assert list(ours) == list(arrays)
    for name, array in arrays.items():
        assert_same(ours[name].mlx(), array if isinstance(array, mx.array) else mx.array(array))

    save_pth(tmp_path / "bf16.pth", arrays, dtype="bfloat16")
    cast = open_checkpoint(tmp_path / "bf16.pth")
    for name, array in arrays.items():
        expected = array if isinstance(array, mx.array) else mx.array(array)
        if expected.dtype in (mx.float32, mx.float16):
            expected = expected.astype(mx.bfloat16)
        assert_same(cast[name].mlx(), expected)

    with pytest.raises(WeightsError, match="uint32, which torch checkpoints cannot hold"):
        save_pth(tmp_path / "packed.pth", {"packed": np.zeros(3, np.uint32)})
    with pytest.raises(ConfigError, match="not a floating dtype"):
        save_pth(tmp_path / "int.pth", arrays, dtype="int8")


def test_views_with_offsets_strides_and_shared_storage(tmp_path):
    storage = np.arange(60, dtype=np.float32)
    matrix = storage.reshape(5, 12)
    views = {
        "rows": matrix[1:4],
        "strided": matrix[1:4, 2:10:3],
        "transposed": matrix.T,
        "column": matrix[:, 5],
        "broadcast": np.broadcast_to(matrix[2, 3:7], (3, 4)),
        "empty": storage[7:7],
    }

    def element_offset(view: np.ndarray) -> int:
        return (view.__array_interface__["data"][0] - storage.__array_interface__["data"][0]) // 4

    records = [TensorView(name, "0", view.shape, tuple(s // 4 for s in view.strides), element_offset(view)) for name, view in views.items()]
    write_pth(tmp_path / "views.pth", [TensorEntry("0", "float32", storage.shape, lambda: storage)], records)
    assert sum("/data/" in n for n in zip_members(tmp_path / "views.pth")) == 1
    ours = open_checkpoint(tmp_path / "views.pth")
    for name, view in views.items():
        np.testing.assert_array_equal(ours[name].numpy(), view)
        assert ours[name].numpy().flags.c_contiguous


def _opcodes_and_globals(pickled: bytes) -> tuple[set[str], set[str]]:
    ops = list(pickletools.genops(pickled))
    return {op.name for op, _, _ in ops}, {arg for op, arg, _ in ops if op.name == "GLOBAL"}


def _data_offsets(path: Path) -> list[int]:
    content = path.read_bytes()
    offsets = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            assert info.flag_bits == 0x0808 and info.compress_type == zipfile.ZIP_STORED
            name_length, extra_length = struct.unpack("<HH", content[info.header_offset + 26 : info.header_offset + 30])
            offsets.append(info.header_offset + 30 + name_length + extra_length)
    return offsets


def test_save_pth_mirrors_the_layout_torch_writes(fixtures_dir, tmp_path):
    official = fixtures_dir / "starflow" / "model.pth"
    tensors = open_checkpoint(official)
    ours = tmp_path / "model.pth"
    save_pth(ours, [(t.name, t.dtype, t.shape, t.mlx) for t in tensors.values()])

    theirs_names, our_names = zip_members(official), zip_members(ours)
    fixed = ["data.pkl", ".format_version", ".storage_alignment", "byteorder"]
    for names, storages in ((theirs_names, 130), (our_names, 131)):
        assert names == [f"model/{n}" for n in fixed] + [f"model/data/{k}" for k in range(storages)] + ["model/version", "model/.data/serialization_id"]
    with zipfile.ZipFile(official) as theirs_zip, zipfile.ZipFile(ours) as our_zip:
        assert our_zip.testzip() is None
        for record in (".format_version", ".storage_alignment", "byteorder", "version"):
            assert our_zip.read(f"model/{record}") == theirs_zip.read(f"model/{record}")
        assert len(our_zip.read("model/.data/serialization_id")) == len(theirs_zip.read("model/.data/serialization_id"))
    assert all(offset % 64 == 0 for offset in _data_offsets(official) + _data_offsets(ours))

    our_ops, our_globals = _opcodes_and_globals(data_pickle(ours))
    their_ops, their_globals = _opcodes_and_globals(data_pickle(official))
    assert our_globals == their_globals == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}
    assert our_ops <= their_ops
    reread = open_checkpoint(ours)
    assert list(reread) == list(tensors)
    for name, tensor in tensors.items():
        assert_same(reread[name].mlx(), tensor.mlx())


# --- memory: nothing read at open, one tensor at a time ---------------------------------------


def _peak_numpy_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_streaming_write_lazy_open_and_per_tensor_reads(tmp_path, suffix):
    count, shape = 16, (256, 1024)  # 16 tensors of 1 MiB
    path = tmp_path / f"big{suffix}"

    def entries(fill: float) -> list[tuple]:
        return [(f"w{i}", "float32", shape, lambda i=i: np.full(shape, fill + i, np.float32)) for i in range(count)]

    def write(fill: float) -> None:
        (save_pth if suffix == ".pth" else write_safetensors)(path, entries(fill))

    assert _peak_numpy_bytes(lambda: write(0.0)) < 2.5 * MiB
    assert path.stat().st_size > count * MiB

    opened = {}
    assert _peak_numpy_bytes(lambda: opened.update(open_checkpoint(path))) < 0.25 * MiB
    assert _peak_numpy_bytes(lambda: opened["w9"].numpy()) < 2.5 * MiB

    write(100.0)  # same layout, new values: what was opened reads them only when materialised
    np.testing.assert_array_equal(opened["w3"].numpy(), np.full(shape, 103.0, np.float32))
