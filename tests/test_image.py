"""Sample grids as the official writer lays them out (`fixtures/vae` `decode.saved_png`)."""

import struct
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_starflow.app.cli import main
from mlx_starflow.dataset import load_image_folder
from mlx_starflow.errors import InputError
from mlx_starflow.image import decoded_to_uint8, make_grid, read_image

REPO = Path(__file__).resolve().parents[1]


def test_grid_matches_the_official_png(fixtures_dir):
    ref = mx.load(str(fixtures_dir / "vae" / "fixtures.safetensors"))
    tiles = decoded_to_uint8(ref["decode.official_x"])
    grid = make_grid([tiles[0], tiles[1]])
    assert np.array_equal(grid.transpose(1, 2, 0), np.array(ref["decode.saved_png"]))
    wide = decoded_to_uint8(ref["decode_wide.official_x"])
    assert np.array_equal(make_grid([wide[0]]).transpose(1, 2, 0), np.array(ref["decode_wide.saved_png"]))


# ---- reading images: modes scaled, never clipped; oversized files refused ------------------------------


def png(path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes = b"") -> Path:
    """A PNG written chunk by chunk, so its header can claim any size (rows: filtered scanlines)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    grey16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert read_image(tmp_path / "grey16.png").tolist() == [[[0, 1, 128, 255]]] * 3
    rgb16 = np.array([[[0x8080, 0x0000, 0xFFFF], [0x4000, 0xC000, 0x0101]]], ">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    pixels = read_image(png(tmp_path / "rgb16.png", 2, 1, 16, 2, rows))
    assert pixels[:, 0, 0].tolist() == [128, 0, 255] and pixels[:, 0, 1].tolist() == [64, 192, 1]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tif")
    assert read_image(tmp_path / "unit.tif").tolist() == [[[0, 128, 255]]] * 3
    Image.fromarray(np.array([[0.0, 300.0]], np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(InputError, match=r"float image \(mode F\) with values outside \[0, 1\]"):
        read_image(tmp_path / "hdr.tif")
    Image.fromarray(np.array([[-5, 70000]], np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(InputError, match=r"mode I\) with values outside 0 … 65535"):
        read_image(tmp_path / "int32.tif")


@pytest.mark.parametrize("side", [9000, 10000, 100000])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side):
    """9000² is over our ceiling only, 10000² also over Pillow's warning, 100000² over its error."""
    bomb = png(tmp_path / "bomb.png", side, side, 8, 2)
    assert bomb.stat().st_size < 100
    with pytest.raises(InputError, match="Mpx"):
        read_image(bomb)


def test_score_refuses_a_bomb_in_one_line(tmp_path, capsys):
    bomb = png(tmp_path / "bomb.png", 100000, 100000, 8, 2)
    code = main(["score", str(bomb), "--model", str(REPO / "weights" / "demo"), "--prompt", "red circle"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Mpx" in err, err


def test_training_data_skips_bombs_and_unreadable_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(data / "good.png")
    png(data / "bomb.png", 100000, 100000, 8, 2)
    (data / "broken.png").write_bytes(b"\x89PNG broken")
    (data / "captions.tsv").write_text("good.png\tred circle\nbomb.png\tred circle\nbroken.png\tred circle\n")
    loaded = load_image_folder(data, 8)
    assert loaded.skipped == ("bomb.png", "broken.png") and loaded.images.shape == (1, 3, 8, 8)
