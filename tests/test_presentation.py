"""What the user sees: the custom-scalars layout, colour bars and keys legible at TensorBoard's card width, names."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_viz import render
from lightning_viz._classes import class_name, class_names_of, find_class_names
from lightning_viz.sinks import CUSTOM_SCALARS_TAG, Sink, write_custom_scalars_layout


def _ink_rows(image: np.ndarray, rows: slice = slice(None)) -> list[tuple[int, int]]:
    """Runs (first row, height) of rows holding dark text pixels."""
    dark = (image[rows].max(axis=2) < 100).any(axis=1)
    runs, start = [], None
    for i, d in enumerate([*dark, False]):
        if d and start is None:
            start = i
        elif not d and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def assert_legible(image: np.ndarray, text_height: int, *, card_width: int = render.CARD_WIDTH, min_px: float = 7):
    """Text ``text_height`` pixels tall (ink of a line, cap to descender) in an ``image`` that TensorBoard shows at its
    natural size up to ``card_width`` pixels wide and scales down beyond that: at least ``min_px`` tall on screen."""
    shown = text_height * min(1.0, card_width / image.shape[1])
    assert shown >= min_px, f"text {text_height} px in an image {image.shape[1]} px wide shows {shown:.1f} px tall"


# ------------------------------------------------------------------------------------------ custom scalars
def _layout_events(log_dir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = ea.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(CUSTOM_SCALARS_TAG) if CUSTOM_SCALARS_TAG in acc.Tags()["tensors"] else []
    return [layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in events]


def test_custom_scalars_layout_written_once_per_run_and_matches_the_key_curves(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)
    Sink.for_trainer(trainer)
    Sink.for_trainer(trainer)  # a second monitor's setup
    assert not write_custom_scalars_layout(logger.experiment)
    logger.experiment.flush()
    (layout,) = _layout_events(logger.log_dir)
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert [cat.title for cat in layout.category] == [
        "lightning_viz: training",
        "lightning_viz: diagnosis",
        "lightning_viz: monitors",
    ]

    def shown(tag: str) -> list[str]:  # TensorBoard matches each regex from the start of the tag
        return [title for title, regexes in charts.items() if any(re.match(r, tag) for r in regexes)]

    assert shown("train_loss") == ["loss"] and shown("val_loss") == ["loss"] and shown("loss/val") == ["loss"]
    assert shown("val_acc") == ["accuracy"] and shown("val/accuracy") == ["accuracy"]
    assert shown("diagnosis/dead_filters") == ["findings (count; 1 = present)"]
    assert shown("diagnosis/findings") == ["findings (count; 1 = present)"]
    # the loss and weight norm (other scales) never flatten the 0/1 flags
    assert shown("diagnosis/weight_norm") == ["training loss and weight norm, as the diagnosis reads them"]
    assert shown("filters/noise_score/model.conv1") == ["filter noise score (lower is smoother)"]
    assert shown("activations/dead_fraction/model.relu1") == ["dead fraction per layer (share 0-1)"]
    assert shown("embedding/knn_accuracy") == ["k-NN accuracy of the embedding (share 0-1)"]


def test_custom_scalars_layout_only_on_rank_zero(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run")
    Sink.for_trainer(SimpleNamespace(loggers=[logger], is_global_zero=False))
    logger.experiment.flush()
    assert _layout_events(logger.log_dir) == []


# ------------------------------------------------------------------------------------------ colour bars, keys
@pytest.mark.parametrize("width", [200, 350, 1000])
def test_colour_bar_runs_low_to_high_and_says_its_meaning_legibly(width):
    bar = render.colour_bar(width, "inferno", "per-map 99th percentile", low="0", high="p99")
    assert bar.shape[1] == width and bar.dtype == np.uint8
    row = bar[6, 10:-10].astype(float).sum(axis=1)  # inferno: dark at 0, bright at the top
    assert row[: len(row) // 10].mean() < 150 < 500 < row[-len(row) // 10 :].mean()
    below = int(np.argmax((bar[3:, width // 2] == 255).all(axis=1))) + 3  # the first white row under the bar
    lines = _ink_rows(bar, slice(below, None))
    assert len(lines) == 2  # the end values, then the meaning
    for _, height in lines:
        assert_legible(bar, height)


def test_with_colour_bar_names_each_scale_and_marks_dead_channels():
    image = np.zeros((40, 300, 3), np.uint8)
    out = render.with_colour_bar(image, "firing", marks=[("dead", render.DEAD_COLOUR)])
    assert out.shape[1] == 300 and (out[:40] == 0).all()
    red = (out[42:, :, 0] > 200) & (out[42:, :, 1] < 30) & (out[42:, :, 2] < 30)
    assert red.sum() > 40  # the dead swatch
    assert set(render.COLOUR_SCALES) >= {"saliency", "occlusion", "activations", "firing"}
    assert render.COLOUR_SCALES["occlusion"][3] == "probability 0-1"
    with pytest.raises(ValueError, match="`scale` must be one of"):
        render.with_colour_bar(image, "rainbow")


def test_class_key_shows_each_class_colour_with_its_name():
    key = render.class_key([0, 3, 12], ["astronaut", "rocket", "class 12"])
    assert key.shape[1] == render.CARD_WIDTH
    for index in (0, 3, 12):
        colour = (render.CATEGORICAL[index % 10] * 255).round().numpy().astype(int)
        assert (np.abs(key.astype(int) - colour).sum(axis=2) < 6).sum() > 50, index
    assert_legible(key, max(h for _, h in _ink_rows(key)))
    wide = render.class_key(list(range(10)), [f"a long class name {i}" for i in range(10)])
    assert wide.shape[0] > key.shape[0]  # wrapped into lines, never wider than the card
    with pytest.raises(ValueError, match="same length"):
        render.class_key([0, 1], ["a"])


def test_numbered_grid_writes_channel_numbers_legibly():
    tiles = torch.full((16, 3, 8, 8), 0.8)
    grid = render.numbered_grid(tiles, [str(c) for c in range(16)], ncol=8, upscale=6)
    plain = render.tile_grid(tiles, ncol=8, pad=1, upscale=6)
    assert grid.shape == plain.shape and not np.array_equal(grid, plain)
    corner = grid[1:20, 1:20]
    assert (corner.max(axis=2) < 30).any() and (corner.min(axis=2) > 220).any()  # white digits on a dark box
    height = max(h for _, h in _ink_rows(255 - grid[:, :47], slice(0, 47)))  # the label box in the first tile
    assert_legible(grid, height)
    with pytest.raises(ValueError, match="one entry per tile"):
        render.numbered_grid(tiles, ["0"], ncol=8)


def test_legible_font_grows_with_the_image_width():
    assert render.legible_font_size(200) == render.MIN_TEXT_PX == render.legible_font_size(350)
    assert render.legible_font_size(1050) == 3 * render.MIN_TEXT_PX


# ------------------------------------------------------------------------------------------ class names
def test_class_names_come_from_the_data_or_the_datamodule():
    data = TensorDataset(torch.zeros(4, 1), torch.zeros(4))
    data.classes = ["cat", "dog"]
    loader = DataLoader(Subset(data, [0, 1]))
    assert class_names_of(loader) == ["cat", "dog"]
    trainer = SimpleNamespace(datamodule=None, train_dataloader=loader, val_dataloaders=None)
    assert find_class_names(trainer) == ["cat", "dog"]
    datamodule = SimpleNamespace(class_names=("plane", "car"))
    assert find_class_names(SimpleNamespace(datamodule=datamodule, train_dataloader=loader)) == ["plane", "car"]
    assert class_names_of(SimpleNamespace(classes={0: "a", 1: "b"})) == ["a", "b"]
    assert class_names_of(SimpleNamespace(classes=10)) is None  # a count, not names
    assert find_class_names(SimpleNamespace(train_dataloader=DataLoader(TensorDataset(torch.zeros(2))))) is None
    assert (
        class_name(1, ["cat", "dog"]) == "dog" and class_name(7, ["cat", "dog"]) == "7" and class_name(3, None) == "3"
    )
