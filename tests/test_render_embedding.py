"""Drawing of the EmbeddingMonitor's images: thumbnails, sprite sheet, neighbour strips, the 2-D map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_viz import render


def _images(n: int, side: int = 8, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(0))


def test_thumbnails_are_rgb_in_unit_range_and_resized():
    thumbs = render.thumbnails(_images(5, side=12, channels=1) * 10, 4)
    assert thumbs.shape == (5, 3, 4, 4) and thumbs.dtype == torch.float32
    assert thumbs.min() >= 0 and thumbs.max() <= 1


def test_sprite_is_a_square_row_major_sheet():
    thumbs = torch.zeros(5, 3, 4, 4)
    for i in range(5):
        thumbs[i, 0] = (i + 1) / 5  # red level tells the thumbnail apart
    sheet = render.sprite(thumbs)
    assert sheet.shape == (12, 12, 3) and sheet.dtype == np.uint8  # ceil(sqrt(5)) = 3 per side
    for i in range(5):
        r, c = divmod(i, 3)
        assert (sheet[r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4, 0] == round((i + 1) / 5 * 255)).all()
    assert (sheet[4:8, 8:12] == 0).all() and (sheet[8:12, 4:12] == 0).all()  # empty cells stay black


@pytest.mark.parametrize("count, wanted, expected", [(20000, 64, 57), (100, 32, 32), (1, 16, 16), (5000, 128, 115)])
def test_sprite_tile_side_keeps_the_sheet_within_the_projector_limit(count, wanted, expected):
    side = render.sprite_tile_side(count, wanted)
    assert side == expected and side * int(np.ceil(np.sqrt(count))) <= render.SPRITE_LIMIT == 8192


def _frame_colour(strip: np.ndarray, grid_top: int, column: int, tile: int = 40) -> tuple[int, ...]:
    left = 1 + column * (tile + 1)  # grid padding
    return tuple(int(v) for v in strip[grid_top + 1, left + tile // 2])


def test_neighbour_strips_frame_probe_black_same_green_other_red_unknown_grey():
    probes, near = _images(2), [_images(3), _images(3)]
    same = [torch.tensor([True, False, True]), None]
    strip = render.neighbour_strips(probes, near, same, names=(torch.tensor([2, 0]), ["cat", "dog", "bird"]))
    assert strip.dtype == np.uint8 and strip.shape[1] == render.CARD_WIDTH
    caption = render.MIN_TEXT_PX + 5 + 1  # a caption line above each row of tiles
    row = caption + 40 + 2 + 1  # caption, tile plus grid padding, gap
    green, red, grey = (26, 178, 26), (230, 26, 26), (128, 128, 128)
    assert [_frame_colour(strip, caption, c) for c in range(4)] == [(0, 0, 0), green, red, green]
    assert [_frame_colour(strip, row + caption, c) for c in range(4)] == [(0, 0, 0), grey, grey, grey]
    assert (strip[:caption, :] < 100).any()  # the caption "probe 0: bird" is written above the first row
    assert not render.neighbour_strips(probes, near, same).shape[0] < strip.shape[0]


def test_neighbour_strips_shrink_tiles_to_fit_the_card():
    probes, near = _images(1), [_images(12)]
    strip = render.neighbour_strips(probes, near, [None], tile=64)
    assert strip.shape[1] == render.CARD_WIDTH  # 13 tiles of 64 px would be 846 px wide


def test_neighbour_strips_do_not_modify_their_inputs():
    probes, near = _images(1), [_images(2)]
    before = probes.clone(), near[0].clone()
    render.neighbour_strips(probes, near, [torch.tensor([True, False])])
    assert torch.equal(probes, before[0]) and torch.equal(near[0], before[1])


def test_embedding_map_and_its_filmstrip_frame():
    coords = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    labels = np.arange(40) % 4
    image, frame = render.embedding_map(coords, labels, reducer="umap", epochs_done=3, class_names=list("abcd"))
    assert image.dtype == frame.dtype == np.uint8
    assert image.shape == (270 + 16, render.CARD_WIDTH, 3) and frame.shape == (108 + 16, 108, 3)  # legend: 80 px
    expected = render.scatter(
        coords, labels, size=270, title="umap of the code, after epoch 2", class_names=list("abcd"), legend_width=80
    )
    assert np.array_equal(image, expected)
    long_names = ["immunohistochemistry", "hubble_deep_field", "c", "d"]
    wide, _ = render.embedding_map(coords, labels, reducer="umap", epochs_done=3, class_names=long_names)
    assert wide.shape[1] == render.CARD_WIDTH and wide.shape[0] < image.shape[0]  # a wider legend, a smaller plot
    grey, _ = render.embedding_map(coords, None, reducer="pca", epochs_done=0)
    assert grey.shape == (render.CARD_WIDTH + 16, render.CARD_WIDTH, 3)  # no legend without labels
    assert (np.abs(grey[..., 0].astype(int) - grey[..., 2].astype(int)) <= 60).all()


def test_map_filmstrip_wraps_frames_into_rows_at_card_width():
    strip = render.Filmstrip(4)
    for epoch in range(5):
        _, frame = render.embedding_map(np.zeros((3, 2)), np.arange(3), reducer="pca", epochs_done=epoch)
        strip.push("", frame)
    assert len(strip) == 4
    image = render.grid_filmstrip(strip.images())
    assert image.shape == (2 * 124 + 4, 3 * 108 + 2 * 4, 3)  # three frames per row, then the fourth
