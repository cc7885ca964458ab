"""Sample grids as the official writer lays them out (`fixtures/vae` `decode.saved_png`)."""

import mlx.core as mx
import numpy as np

from mlx_starflow.image import decoded_to_uint8, make_grid


def test_grid_matches_the_official_png(fixtures_dir):
    ref = mx.load(str(fixtures_dir / "vae" / "fixtures.safetensors"))
    tiles = decoded_to_uint8(ref["decode.official_x"])
    grid = make_grid([tiles[0], tiles[1]])
    assert np.array_equal(grid.transpose(1, 2, 0), np.array(ref["decode.saved_png"]))
    wide = decoded_to_uint8(ref["decode_wide.official_x"])
    assert np.array_equal(make_grid([wide[0]]).transpose(1, 2, 0), np.array(ref["decode_wide.saved_png"]))
