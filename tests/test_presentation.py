"""What the user sees: the custom-scalars layout, colour bars and keys legible at TensorBoard's card width, names."""

from __future__ import annotations

import glob
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_viz import default_suite, render
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
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True, callbacks=default_suite())
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
    from lightning_viz import report, sinks

    assert report.OUR_AREAS == sinks.OUR_TAG_AREAS  # the report and the layout agree on what is yours
    assert report.find_metric(["dynamics/train_loss", "attention/train_loss"], "train", "loss") is None
    for ours in ("dynamics/bn_probe/eval_loss", "dynamics/train_loss", "dynamics/initial_loss", "diagnosis/train_loss"):
        assert "loss" not in shown(ours)  # the loss chart is yours alone
    assert shown("val_acc") == ["accuracy"] and shown("val/accuracy") == ["accuracy"]
    assert shown("diagnosis/dead_filters") == ["findings (count; 1 = present)"]
    assert shown("diagnosis/findings") == ["findings (count; 1 = present)"]
    # the loss and weight norm (other scales) never flatten the 0/1 flags
    assert shown("diagnosis/weight_norm") == ["training loss and weight norm, as the diagnosis reads them"]
    assert shown("filters/noise_score/model.conv1") == ["filter noise score (lower is smoother)"]
    assert shown("activations/dead_fraction/model.relu1") == ["dead fraction per layer (share 0-1)"]
    assert shown("embedding/knn_accuracy") == ["k-NN accuracy of the embedding (share 0-1)"]


@pytest.mark.parametrize(
    "suite, absent",
    [
        ({"embedding": False}, {"k-NN accuracy of the embedding (share 0-1)"}),
        (
            {"diagnosis": False, "activations": False},
            {"findings (count; 1 = present)", "dead fraction per layer (share 0-1)"},
        ),
        (
            {"filters": False, "embedding": False},
            {"filter noise score (lower is smoother)", "k-NN accuracy of the embedding (share 0-1)"},
        ),
    ],
)
def test_custom_scalars_layout_has_no_chart_the_suite_will_leave_empty(tmp_path, suite, absent):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run")
    callbacks = default_suite(**suite)
    Sink.for_trainer(SimpleNamespace(loggers=[logger], is_global_zero=True, callbacks=callbacks))
    logger.experiment.flush()
    (layout,) = _layout_events(logger.log_dir)
    titles = {c.title for cat in layout.category for c in cat.chart}
    assert titles and not titles & absent
    assert {"loss", "seconds per monitor call"} <= titles  # the user's own curves and the cost stay
    assert ("lightning_viz: diagnosis" in {cat.title for cat in layout.category}) == ("diagnosis" not in suite)


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


# ------------------------------------------------------------------------------------------ the default suite, as seen
def _tb_order(a: str, b: str) -> int:
    """TensorBoard's tag order (its Time Series ``compareTagNames``): digit runs compare as numbers, '/' and digits
    sort before other characters, everything else by character code."""

    def special(ch: str) -> bool:
        return ch == "/" or ch.isdigit()

    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            si, sj = i, j
            while i < len(a) and a[i].isdigit():
                i += 1
            while j < len(b) and b[j].isdigit():
                j += 1
            x, y = int(a[si:i]), int(b[sj:j])
            if x != y:
                return -1 if x < y else 1
            continue
        if special(a[i]) != special(b[j]):
            return -1 if special(a[i]) else 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i += 1
        j += 1


def _time_series_groups(tags: list[str]) -> list[tuple[str, list[str]]]:
    """The Time Series tab's groups in display order: tags sorted as TensorBoard does, grouped by their first part."""
    import functools

    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=functools.cmp_to_key(_tb_order)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def _ramp_rows(image: np.ndarray, colormap: str, min_length: int = 150) -> list[int]:
    """Rows of ``image`` holding a colour bar of ``colormap``: a run of at least ``min_length`` pixels whose colours
    follow the map from its low end to its high end."""
    lut = (render.apply_colormap(torch.linspace(0, 1, 64).view(1, -1), colormap)[:, 0].T * 255).numpy()
    rows = []
    for y in np.flatnonzero((np.ptp(image.astype(int), axis=2) > 20).sum(axis=1) >= min_length):  # coloured rows
        row = image[y].astype(float)
        dist = ((row[:, None, :] - lut[None]) ** 2).sum(-1)
        index, err = dist.argmin(1), np.sqrt(dist.min(1))
        on = np.flatnonzero(err < 12)
        if len(on) >= min_length:
            run = index[on[0] : on[-1] + 1]
            if run[-1] - run[0] > 50 and (np.diff(run) >= -1).mean() > 0.95:
                rows.append(int(y))
    return rows


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """The default suite on a tiny CNN, 2 epochs, classes named on the dataset: (Events, log dir, the callbacks)."""
    import pytorch_lightning as pl
    from conftest import Events, loaders, make_module, trainer_kwargs

    import lightning_viz

    tmp = tmp_path_factory.mktemp("suite")
    train, val = loaders(n=64)
    train.dataset.classes = val.dataset.classes = ["cat", "dog", "bird", "fish"]
    callbacks = lightning_viz.default_suite(
        budget=None,
        max_overhead=100.0,
        saliency={"smoothgrad_samples": 4},
        embedding={"every_n_epochs": 1, "reducer": "pca"},
        featurevis={"steps": 8, "max_channels": 4},
        exemplars={"max_samples": 64, "max_channels": 4},
    )
    logger = pl.loggers.TensorBoardLogger(str(tmp), name="run", version=0)
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp))
    trainer.fit(make_module(pl), train, val)
    return Events(str(tmp / "run")), str(tmp / "run" / "version_0"), callbacks


def test_every_image_of_the_default_suite_fits_tensorboards_card(suite_run):
    events, _, _ = suite_run
    tags = events.tags["images"]
    assert len(tags) >= 12
    for tag in tags:
        if tag.startswith(render.ACTUAL_SIZE_TAGS) and render.ACTUAL_SIZE_TAGS:
            continue
        for index in range(len(events.image_steps(tag))):
            width = events.image(tag, index).shape[1]
            assert width <= render.CARD_WIDTH, f"{tag} is {width} px wide: TensorBoard would shrink its labels"


def test_tensorboard_opens_on_pictures_one_dead_history_per_model_and_latest_projector(suite_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    events, log_dir, _ = suite_run
    cards = events.tags["scalars"] + events.tags["images"] + events.tags["histograms"]
    groups = _time_series_groups(cards)
    first_cards = [tags[0] for _, tags in groups[:2]]  # TensorBoard expands the first two groups
    assert not any("dead_count" in tag for tag in first_cards), first_cards
    assert groups[0][1][0] == "activations/dead_channels_by_layer"  # a picture of every layer, not a flat chart
    dead_pictures = [t for t in events.tags["images"] if "dead" in t]
    assert dead_pictures == ["activations/dead_channels_by_layer"]  # one card per model, not one per layer
    config = ProjectorConfig()
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as f:
        text_format.Merge(f.read(), config)
    steps = [int(e.tensor_path.split("/")[1]) for e in config.embeddings]
    opened = min(config.embeddings, key=lambda e: e.tensor_name)  # the projector sorts by name, opens the first
    assert int(opened.tensor_path.split("/")[1]) == max(steps) and len(steps) >= 2


def test_class_names_replace_numbers_wherever_a_class_is_shown(suite_run):
    events, log_dir, callbacks = suite_run
    meta = sorted(glob.glob(os.path.join(log_dir, "embedding", "*", "metadata.tsv")))[-1]
    with open(meta) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    assert {r[0] for r in rows} <= {"cat", "dog", "bird", "fish"} and {r[1] for r in rows} <= {
        "cat",
        "dog",
        "bird",
        "fish",
    }
    names = {"cat", "dog", "bird", "fish"}
    exemplars = next(c for c in callbacks if type(c).__name__ == "ExemplarMonitor")
    assert exemplars._class_names == ["cat", "dog", "bird", "fish"]
    saliency = next(c for c in callbacks if type(c).__name__ == "SaliencyMonitor")
    labels = saliency.probes.labels
    probs = torch.tensor([0.1, 0.7, 0.1, 0.1])
    caption = render.row_caption(0, int(labels[0]), probs, labels, ["cat", "dog", "bird", "fish"])
    assert (
        caption.startswith(f"p0: true {['cat', 'dog', 'bird', 'fish'][int(labels[0])]}") and "pred dog 0.70" in caption
    )
    assert names  # the pictures: legend, neighbour captions and the occlusion key are drawn from the same names


def test_colour_bars_under_heat_maps_with_the_scale_meaning(suite_run):
    events, _, _ = suite_run
    grid = events.image("saliency/grid")
    saliency_bar, probability_bar = _ramp_rows(grid, "inferno"), _ramp_rows(grid, "viridis")
    assert saliency_bar and probability_bar  # "per-map 99th percentile" and "probability 0-1"
    assert min(saliency_bar) > 0.6 * grid.shape[0]  # under the tiles
    for tag in ("activations/maps/model.relu1", "activations/maps/model.relu2"):
        assert _ramp_rows(events.image(tag), "inferno"), tag
    history = events.image("activations/dead_channels_by_layer")
    assert _ramp_rows(history, "viridis")
    assert history.shape[1] == render.CARD_WIDTH


def test_epoch_labels_follow_lightnings_count():
    assert [render.epoch_label(e) for e in (0, 1, 2, 10)] == ["init", "ep 0", "ep 1", "ep 9"]


def test_filmstrip_frames_are_labelled_init_then_lightning_epochs(suite_run):
    _, _, callbacks = suite_run
    filters = next(c for c in callbacks if type(c).__name__ == "FilterMonitor")
    (strip,) = filters._filmstrips.values()
    assert [label for label, _ in strip.frames] == ["init", "ep 0", "ep 1"]


def test_dead_history_of_a_fifteen_layer_model_is_one_card_wide_image():
    layers = [
        (f"features.{i}.relu", [("init", torch.rand(16 * (i + 1))), ("ep 0", torch.zeros(16 * (i + 1)))])
        for i in range(15)
    ]
    image = render.dead_history_panel(layers)
    assert image.shape[1] == render.CARD_WIDTH and image.shape[0] > 15 * 20
    red = (image[..., 0] > 200) & (image[..., 1] < 30) & (image[..., 2] < 30)
    assert red.sum() > 15 * 250  # every layer's dead row, folded to the card's width, is red


def test_saliency_headers_are_never_cut():
    tiles = torch.rand(1, 9, 3, 30, 30)
    titles = [
        "input",
        "gradient",
        "smoothgrad",
        "guided bp",
        "deconvnet",
        "Grad-CAM",
        "FullGrad",
        "occl. prob",
        "occl. top",
    ]
    head = render.vertical_header(titles, 30)
    font = render.label_font(render.MIN_TEXT_PX)
    longest = max(render._text_width(t, font) for t in titles)
    assert head.shape[0] >= longest  # written upright along the column: every letter of "smoothgrad" shows
    panel = render.saliency_panel(tiles, titles, ["p0: true cat, pred dog 0.70"], bars=["saliency", "occlusion"])
    assert panel.shape[1] <= render.CARD_WIDTH


def test_featurevis_of_a_grayscale_network_is_gray():
    images = torch.rand(4, 1, 12, 12)
    grid, row = render.featurevis_panel(images, ["ch 0", "ch 1", "ch 2", "ch 3"], 64)
    for image in (grid, row):
        plain = image.astype(int)
        assert (plain[..., 0] == plain[..., 1]).all() and (plain[..., 1] == plain[..., 2]).all()
    assert grid.shape[1] <= render.CARD_WIDTH


# ------------------------------------------------------------------------------------------ the ViT suite, card width
def test_every_image_of_the_default_suite_on_a_tiny_vit_fits_the_card(tmp_path):
    """The suite on a transformer writes attention grids and the gradient flow: they fit the card too."""
    import pytorch_lightning as pl
    from conftest import Events, loaders, make_module, trainer_kwargs
    from test_attention import TinyViT

    import lightning_viz

    torch.manual_seed(0)
    callbacks = lightning_viz.default_suite(
        budget=None,
        max_overhead=100.0,
        filters=False,
        saliency=False,
        embedding=False,
        featurevis=False,
        exemplars=False,
        attention={"max_probes": 3},
        dynamics={"every_n_steps": 1},
    )
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path))
    trainer.fit(make_module(pl, TinyViT(heads=4)), *loaders(size=16))
    events = Events(str(tmp_path / "run"))
    tags = events.tags["images"]
    for wanted in ("dynamics/gradient_flow", "attention/rollout", "attention/heads/model.attns.0"):
        assert wanted in tags, wanted
    assert any(t.startswith("attention/filmstrip/") for t in tags)
    for tag in tags:
        for index in range(len(events.image_steps(tag))):
            width = events.image(tag, index).shape[1]
            assert width <= render.CARD_WIDTH, f"{tag} is {width} px wide: TensorBoard would shrink its labels"
    assert _ramp_rows(events.image("attention/rollout"), "inferno")  # the attention scale's colour bar
    assert _ramp_rows(events.image("dynamics/gradient_flow"), "viridis")  # "gradient norm, log10 colour scale"


def test_gradient_flow_and_many_heads_stay_card_wide_and_legible():
    image = render.gradient_flow(
        torch.rand(15, 40), [f"features.{i}.block.0.conv" for i in range(15)], range(0, 4000, 100), -4, 2, 3
    )
    assert image.shape[1] == render.CARD_WIDTH and image.shape[0] > 15 * 12
    assert _ramp_rows(image, "viridis")
    heads = [torch.rand(2, 3, 14, 14) for _ in range(13)]  # the input and 12 heads: tiles wrap, labelled in corners
    panel = render.attention_panel(heads, ["input"] + [f"h{h}" for h in range(12)], ["p0", "p1"], tile_size=48,
                                   scale_high="2x")  # fmt: skip
    assert panel.shape[1] <= render.CARD_WIDTH and _ramp_rows(panel, "inferno")


def test_a_deep_model_gets_few_activation_cards_per_layer(tmp_path):
    """15 ReLU layers: per layer three charts (sparsity, dead fraction, dead count) and two histograms, not more
    (the two map layers add their map's scale); the mean activation stays in the records."""
    import pytorch_lightning as pl
    from conftest import Events, loaders, make_module, trainer_kwargs
    from torch import nn

    from lightning_viz import ActivationMonitor
    from lightning_viz.records import ActivationStats, bus_for

    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(3 * 16 * 16, 8)]
    for _ in range(14):
        layers += [nn.ReLU(), nn.Linear(8, 8)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(8, 4))
    monitor = ActivationMonitor(max_batches=2)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    module = make_module(pl, model)
    trainer.fit(module, *loaders(n=32, size=16))
    events = Events(str(tmp_path / "run"))
    per_layer = [t for t in events.tags["scalars"] if t.startswith("activations/") and "map_scale" not in t]
    histograms = [t for t in events.tags["histograms"] if t.startswith("activations/")]
    assert len(per_layer) == 3 * 15 and len(histograms) == 2 * 15
    assert not any(t.startswith("activations/mean/") for t in events.tags["scalars"])
    stats = bus_for(module.trainer).latest(ActivationStats)
    assert len(stats) == 15 and all(s.mean is not None for s in stats.values())
