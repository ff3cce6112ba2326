"""The saliency drawing in `render`: shapes, scales and colours of each kind of tile, the grid and its labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_viz import render


@pytest.fixture
def display():
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_heat_tiles_scale_each_map_to_its_own_percentile(display):
    maps = torch.stack([torch.ones(8, 8), 1000 * torch.ones(8, 8)])
    tiles = render.heat_tiles(maps, display)
    assert tiles.shape == (2, 3, 8, 8) and 0 <= tiles.min() and tiles.max() <= 1
    hot = render.apply_colormap(torch.ones(8, 8), "inferno")
    for d, t in zip(display, tiles):  # both maps are full heat: the size of a map does not change its look
        assert torch.allclose(t, 0.4 * d.mean(0, keepdim=True) + 0.6 * hot, atol=1e-6)


def test_signed_tiles_are_grey_at_zero_and_do_not_touch_input():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, :, 0, 0] = 2.0
    maps[0, :, 0, 1] = -2.0
    before = maps.clone()
    tiles = render.signed_tiles(maps)
    assert torch.equal(maps, before)
    assert torch.allclose(tiles[1], torch.full((3, 4, 4), 0.5))
    assert tiles[0, 0, 0, 0] > 0.5 > tiles[0, 0, 0, 1]


def test_probability_tiles_use_a_fixed_scale(display):
    maps = torch.stack([torch.full((8, 8), 1.0), torch.full((8, 8), 2.0)])  # 2.0 is clipped to 1
    tiles = render.probability_tiles(maps, display)
    top = render.apply_colormap(torch.ones(8, 8), "viridis")
    for d, t in zip(display, tiles):
        assert torch.allclose(t, 0.25 * d.mean(0, keepdim=True) + 0.75 * top, atol=1e-6)


def test_class_map_tiles_use_categorical_colours():
    maps = torch.tensor([[[0, 1], [10, 3]]])
    tiles = render.class_map_tiles(maps)
    assert tiles.shape == (1, 3, 2, 2)
    assert torch.equal(tiles[0, :, 0, 0], render.CATEGORICAL[0])
    assert torch.equal(tiles[0, :, 1, 0], render.CATEGORICAL[0])
    assert torch.equal(tiles[0, :, 0, 1], render.CATEGORICAL[1])


def test_tile_row_resizes_and_with_header_adds_titles():
    tiles = torch.rand(3, 3, 16, 16)
    row = render.tile_row(tiles, 8)
    assert row.shape == (10, 1 + 3 * 9, 3)
    framed = render.with_header(["input", "a", "b"], 8, [row])
    assert framed.shape[0] == 14 + row.shape[0]
    assert np.array_equal(framed[14:, : row.shape[1]], row)
