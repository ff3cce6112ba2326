"""Direct tests of the filter and activation drawing in lightning_viz.render."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_viz import render
from lightning_viz.render import DEAD_COLOUR, NAN_COLOUR

MAGENTA = tuple(round(c * 255) for c in NAN_COLOUR)
DEAD = tuple(round(c * 255) for c in DEAD_COLOUR)


def _has_colour(image: np.ndarray, colour: tuple[int, ...]) -> bool:
    return bool((image == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


# ------------------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("c_in, n", [(1, 6), (3, 6), (5, 6 * 4)])
def test_filter_tiles_shape_and_mid_grey_zero(c_in, n):
    weight = torch.zeros(6, c_in, 3, 3)
    before = weight.clone()
    tiles = render.filter_tiles(weight, 0.1, max_channels=4)
    assert tiles.shape == (n, 3, 3, 3) and tiles.dtype == torch.float32
    assert torch.equal(tiles, torch.full_like(tiles, 0.5))  # symmetric scale: 0 is mid-grey at any scale
    assert torch.equal(weight, before)


def test_filter_tiles_scale_is_fixed_and_symmetric():
    weight = torch.tensor([1.0, -1.0, 4.0, -4.0]).view(4, 1, 1, 1)
    tiles = render.filter_tiles(weight, 2.0)[:, 0, 0, 0]
    assert tiles.tolist() == [0.75, 0.25, 1.0, 0.0]  # +-scale -> white / black, beyond it clipped


def test_filter_tiles_paint_non_finite_magenta_and_reject_bad_shapes():
    weight = torch.zeros(2, 3, 3, 3)
    weight[1, 2, 0, 2] = float("inf")
    tiles = render.filter_tiles(weight, 1.0)
    assert tiles[1, :, 0, 2].tolist() == list(NAN_COLOUR)
    assert tiles[1, :, 1, 1].tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"`weight` must have shape \(C_out, C_in, kh, kw\)"):
        render.filter_tiles(torch.zeros(3, 3, 3), 1.0)


def test_filter_grid_is_uint8_upsampled_and_grey_at_zero():
    grid = render.filter_grid(torch.zeros(10, 3, 3, 3), 1.0, min_tile_pixels=9)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 10 + 1, 8 * 10 + 1, 3)  # 8 per row, 9 px + 1 px pad
    assert (grid[1:10, 1:10] == 128).all()


def test_filter_grid_draws_nan_magenta():
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = float("nan")
    assert _has_colour(render.filter_grid(weight, 1.0), MAGENTA)


def test_filter_row_shows_channel_zero_of_deep_layers_in_one_row():
    weight = torch.zeros(20, 16, 3, 3)
    weight[:, 0] = 1.0  # input channel 0 white, every other slice grey
    row = render.filter_row(weight, 1.0, filters=5, min_tile_pixels=3)
    assert row.dtype == np.uint8 and row.shape == (3 + 2, 5 * 4 + 1, 3)
    assert (row[1:4, 1:4] == 255).all()


# --------------------------------------------------------------------------------------------------- activations
def test_activation_tiles_frame_scale_and_dead_colour():
    maps = torch.zeros(3, 4, 5)
    maps[1] = 2.0
    dead = torch.tensor([False, False, True])
    tiles = render.activation_tiles(maps, 2.0, dead)
    assert tiles.shape == (3, 3, 6, 7) and tiles.dtype == torch.float32
    assert tiles[0, :, 0, 0].tolist() == [0.5, 0.5, 0.5]  # frame of a live channel: mid-grey
    assert torch.allclose(tiles[2, :, 0, 0], torch.tensor(DEAD_COLOUR))
    assert torch.allclose(tiles[2, :, -1, -1], torch.tensor(DEAD_COLOUR))
    dark, bright = tiles[0, :, 2, 2], tiles[1, :, 2, 2]
    assert bright.sum() > 2.5 > 0.1 > dark.sum()  # 0 -> dark, `scale` -> bright (inferno)
    assert torch.allclose(render.activation_tiles(maps * 2, 4.0, dead), tiles)  # one fixed scale, no re-stretching


def test_activation_tiles_paint_nan_magenta_and_check_shape():
    maps = torch.zeros(1, 3, 3)
    maps[0, 1, 1] = float("nan")
    tiles = render.activation_tiles(maps, 1.0)
    assert tiles[0, :, 2, 2].tolist() == list(NAN_COLOUR)
    with pytest.raises(ValueError, match=r"`maps` must have shape \(C, H, W\)"):
        render.activation_tiles(torch.zeros(1, 1, 3, 3), 1.0)


def test_activation_grid_is_uint8_bounded_and_frames_dead_channels():
    maps = torch.rand(10, 6, 6)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[7] = True
    grid = render.activation_grid(maps, 1.0, dead)
    tile = (6 + 2) * render.upscale_factor(6, 48)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (tile + 1) + 1, 8 * (tile + 1) + 1, 3)
    assert _has_colour(grid, DEAD)
    assert not _has_colour(render.activation_grid(maps, 1.0), DEAD)
    small = render.activation_grid(torch.rand(64, 32, 32), 1.0, max_side=300)
    assert max(small.shape[:2]) == 300


def test_firing_history_rows_per_epoch_dead_channels_red():
    frames = [("ep 1", torch.tensor([0.5, 0.0, 1.0])), ("ep 2", torch.tensor([0.4, 0.0, 0.0]))]
    image = render.firing_history(frames)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] == 2 * 10 + 2  # 10 pixels per logged epoch, 2 apart
    cell = 12  # at most 12 pixels per channel
    first, second = image[5, 64:], image[15, 64:]
    assert tuple(first[cell + 1]) == DEAD and tuple(first[2 * cell + 1]) != DEAD
    assert tuple(second[2 * cell + 1]) == DEAD
    assert tuple(first[1]) != DEAD


def test_dead_channel_table_is_markdown_with_bounded_lists():
    text = render.dead_channel_table([("relu", [2, 5], 8), ("fc", [], 4), ("big", list(range(300)), 512)], 3, 12)
    lines = text.split("\n")
    assert lines[:4] == ["Dead channels after 3 epoch(s), step 12:", "", "| site | dead | channels |", "|---|---:|---|"]
    assert lines[4] == "| `relu` | 2/8 | 2, 5 |"
    assert lines[5] == "| `fc` | 0/4 | - |"
    assert lines[6] == "| `big` | 300/512 | " + ", ".join(map(str, range(32))) + " ... (268 more) |"
    assert render.listed(list(range(32))) == ", ".join(map(str, range(32)))  # all of them: nothing is counted
    assert render.listed(["a", "b", "c"], limit=2) == "a, b ... (1 more)"
