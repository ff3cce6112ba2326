"""Drawing of the ExemplarMonitor and FeatureVisMonitor images, tested directly on render.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_viz import render

YELLOW = torch.tensor(render.OUTLINE_COLOUR)


def test_fit_tile_keeps_pixels_when_enlarging_and_smooths_when_shrinking():
    tile = torch.zeros(3, 2, 2)
    tile[:, 0, 0] = 1.0
    before = tile.clone()
    big = render.fit_tile(tile, 6)
    assert big.shape == (3, 6, 6)
    assert torch.equal(big[:, :3, :3], torch.ones(3, 3, 3)) and big[:, 3:, :].sum() == 0 and big[:, :, 3:].sum() == 0
    assert torch.equal(tile, before)  # the input is not modified
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2
    small = render.fit_tile(checker.float().expand(3, -1, -1), 4)
    assert small.shape == (3, 4, 4) and torch.allclose(small, torch.full_like(small, 0.5))
    assert render.fit_tile(torch.full((3, 8, 8), 1.0), 3).max() <= 1.0


def test_outline_draws_the_box_border_and_nothing_else():
    image = torch.zeros(3, 10, 12)
    out = render.outline(image, torch.tensor([2, 3, 7, 9]))
    assert image.sum() == 0  # a copy: the input is untouched
    border = torch.zeros(10, 12, dtype=torch.bool)
    border[2, 3:9] = border[6, 3:9] = True
    border[2:7, 3] = border[2:7, 8] = True
    assert torch.equal(out[:, border], YELLOW.view(3, 1).expand(3, int(border.sum())))
    assert out[:, ~border].sum() == 0


def test_exemplar_tiles_show_the_crop_and_its_projection():
    image = torch.zeros(1, 8, 8)
    image[0, 2:4, 2:4] = 5.0  # the bright square is the receptive field
    projection = torch.zeros(1, 8, 8)
    projection[0, 2, 2] = -1.0
    box = torch.tensor([2, 2, 4, 4])
    crop, proj = render.exemplar_tiles(image, box, projection, 4)
    assert crop.shape == proj.shape == (3, 4, 4)
    assert torch.equal(crop, torch.ones(3, 4, 4))  # min-max stretched, then enlarged with nearest
    assert torch.equal(proj[:, :2, :2], torch.zeros(3, 2, 2)) and torch.equal(
        proj[:, 2:, :], torch.full((3, 2, 4), 0.5)
    )
    full, *rest = render.exemplar_tiles(image, box, projection, 16, show_full=True)
    assert len(rest) == 2 and full.shape == (3, 16, 16)
    assert torch.equal(full[:, 4, 4:8], YELLOW.view(3, 1).expand(3, 4))  # the outline, enlarged twice


def test_exemplar_panel_one_captioned_block_per_channel_without_missing_exemplars():
    k, size = 3, 8
    images = torch.rand(2 * k, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 6, 6]]).repeat(2 * k, 1)
    found = torch.tensor([[True, True, False], [True, False, False]])
    grid = render.exemplar_panel(images, boxes, images, found, [5, 9], size, classes=[["cat", "cat"], ["dog"]])
    assert grid.dtype == np.uint8 and grid.shape[1] == render.CARD_WIDTH
    caption = render.MIN_TEXT_PX + 5 + 1
    row_height = size + 2  # one tile plus the grid's padding
    second_tiles = grid[caption + row_height + 1 + caption : caption + row_height + 1 + caption + row_height]
    assert (second_tiles[:, 2 * (size + 1) + 1 :] == 255).all()  # channel 9 has one exemplar: two tiles, then white
    assert (grid[:caption] < 128).any()  # the caption "ch 5: cat x2"
    assert render.exemplar_panel(images, boxes, images, torch.zeros(2, k, dtype=torch.bool), [5, 9], size) is None
    wide = render.exemplar_panel(images.repeat(10, 1, 1, 1), boxes.repeat(10, 1), images.repeat(10, 1, 1, 1),
                                 torch.ones(2, 3 * 10, dtype=torch.bool), [5, 9], 40, show_full=True)  # fmt: skip
    assert wide.shape[1] == render.CARD_WIDTH  # 90 tiles of 40 px wrap into rows, three tiles per exemplar


def test_exemplar_table_lists_dataset_indices_and_scores():
    ids = torch.tensor([[1, 0], [0, 1]])
    scores = torch.tensor([[2.5, 1.0], [0.125, float("-inf")]])
    table = render.exemplar_table([3, 7], ids, scores, [10, 20])
    assert table.splitlines() == [
        "| channel | exemplars (sample index: score) |",
        "|---:|---|",
        "| 3 | 20: 2.5, 10: 1 |",
        "| 7 | 10: 0.125 |",
    ]


def test_to_rgb_expands_gray_and_drops_extra_channels():
    gray = torch.rand(2, 1, 4, 4)
    assert torch.equal(render.to_rgb(gray)[:, 2], gray[:, 0])
    four = torch.rand(2, 4, 4, 4)
    assert torch.equal(render.to_rgb(four), four[:, :3])


@pytest.mark.parametrize("seeds", [1, 3])
def test_featurevis_grid_header_and_a_row_per_seed(seeds):
    labels = ["ch 0", "ch 4"]
    images = torch.stack([torch.full((1, 8, 8), v) for v in torch.linspace(0, 1, seeds * len(labels))])
    grid, first = render.featurevis_grid(images, labels, 16)
    assert grid.shape == (14 + seeds * (16 + 2), 64 + 1 + 2 * (16 + 1), 3)
    assert first.shape == (16 + 2, 1 + 2 * (16 + 1), 3)
    assert np.array_equal(grid[14 : 14 + 18, 64:], first)  # the first seed's row, without its label
    assert first[1, 1, 0] == 0 and first[1, 18, 0] == round(255 / (seeds * 2 - 1))  # seed-major order
    assert (grid[:14, 64:] < 128).any()  # the column labels
    headed = render.with_header(labels, 16, [first])
    assert headed.shape == (14 + 18, 64 + 1 + 2 * (16 + 1), 3)
    assert np.array_equal(headed[14:, : first.shape[1]], first) and (headed[14:, first.shape[1] :] == 255).all()


@pytest.mark.parametrize(
    "classes, caption",
    [
        (["cat", "cat", "dog"], "ch 5: cat x2, dog"),
        (["0", "0", "0"], "ch 5: class 0 x3"),  # not "0 x3", which reads as "0x3"
        (["3", "cat", "3"], "ch 5: class 3 x2, cat"),
        ([], "ch 5"),
        (None, "ch 5"),
    ],
)
def test_an_exemplar_caption_never_reads_a_class_index_as_a_product(classes, caption):
    assert render.exemplar_caption(5, classes) == caption
