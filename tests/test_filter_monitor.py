"""FilterMonitor and its functional core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Events, TinyCNN, fit_monitor, loaders, make_module, trainer_kwargs
from torch import nn

from lightning_viz import FilterMonitor, render
from lightning_viz.functional import filters as F
from lightning_viz.records import FilterStats, bus_for
from lightning_viz.render import NAN_COLOUR


def test_noise_score_separates_noise_from_smooth_filters():
    noise = torch.randn(256, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    g = torch.exp(-((torch.arange(5) - 2.0) ** 2) / 4)
    smooth = (g[:, None] * g[None]).expand(4, 3, 5, 5)
    assert F.noise_score(noise).mean() == pytest.approx(1.0, abs=0.05)
    assert (F.noise_score(smooth) < 0.1).all()
    assert torch.isnan(F.noise_score(torch.zeros(2, 3, 3, 3))).all()


def test_white_noise_reference_matches_bin_count():
    assert F.white_noise_high_frequency_share(3, 3) == pytest.approx(8 / 9)
    assert F.white_noise_high_frequency_share(5, 5) == pytest.approx(20 / 25)


def test_relative_distance_and_norms():
    w0 = torch.ones(2, 1, 3, 3)
    w = w0.clone()
    w[1] *= 2
    assert torch.allclose(F.relative_distance(w, w0), torch.tensor([0.0, 1.0]))
    assert torch.allclose(F.filter_norms(w), torch.tensor([3.0, 6.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        F.relative_distance(w, torch.ones(3, 1, 3, 3))


def test_filter_tiles_fixed_symmetric_scale():
    w = torch.zeros(2, 3, 3, 3)
    w[0, 0] = 1.0  # red channel at +scale
    w[1, 2] = -1.0  # blue channel at -scale
    tiles = render.filter_tiles(w, scale=1.0)
    assert torch.allclose(tiles[0, 0], torch.ones(3, 3)) and torch.allclose(tiles[0, 1], torch.full((3, 3), 0.5))
    assert torch.allclose(tiles[1, 2], torch.zeros(3, 3))
    # the same weights at twice the scale are half as far from grey: no per-call re-stretching
    assert torch.allclose(render.filter_tiles(w, scale=2.0)[0, 0], torch.full((3, 3), 0.75))


def test_deep_layer_tiles_are_per_input_channel_slices_bounded():
    w = torch.randn(20, 16, 3, 3)
    tiles = render.filter_tiles(w, 1.0, max_filters=5, max_channels=4)
    assert tiles.shape == (20, 3, 3, 3)  # 5 filters x 4 slices, grayscale as RGB
    assert torch.equal(tiles[:, 0], tiles[:, 1])
    grid = render.filter_grid(w, 1.0, max_filters=5, max_channels=4, min_tile_pixels=9)
    assert grid.dtype == np.uint8 and grid.shape == (5 * 10 + 1, 4 * 10 + 1, 3)


def test_nan_weights_render_magenta():
    w = torch.zeros(1, 3, 3, 3)
    w[0, 1, 1, 1] = float("nan")
    tiles = render.filter_tiles(w, 1.0)
    assert torch.allclose(tiles[0, :, 1, 1], torch.tensor(NAN_COLOUR))
    assert torch.allclose(tiles[0, :, 0, 0], torch.full((3,), 0.5))


_fit = fit_monitor


def test_logs_images_scalars_histograms_per_layer(tmp_path, pl_ns):
    monitor = FilterMonitor(layers=["model.conv1", "model.conv2"])
    module, events = _fit(pl_ns, tmp_path, monitor)
    for layer in ("model.conv1", "model.conv2"):
        assert events.image_steps(f"filters/{layer}") == [0, 4, 8]
        assert events.image_steps(f"filters/filmstrip/{layer}") == [0, 4, 8]
        for stat in ("weight_norm", "noise_score", "distance_from_init"):
            assert [s for s, _ in events.scalars(f"filters/{stat}/{layer}")] == [0, 4, 8]
            assert f"filters/per_filter/{stat}/{layer}" in events.tags["histograms"]
    # distance from init is 0 at the baseline and grows with training
    dist = [v for _, v in events.scalars("filters/distance_from_init/model.conv1")]
    assert dist[0] == 0.0 and dist[2] > dist[1] > 0
    # filmstrip grows one row per logged epoch (rows are separated by white gaps)
    first, last = events.image("filters/filmstrip/model.conv1", 0), events.image("filters/filmstrip/model.conv1", -1)
    assert last.shape[0] > 2.5 * first.shape[0]
    # the first layer has 3 input channels: an RGB grid whose pixels are not all gray
    grid = events.image("filters/model.conv1")
    assert (grid[..., 0] != grid[..., 1]).any()
    assert bus_for(module.trainer).latest(FilterStats)["model.conv1"].distance_from_init == pytest.approx(dist[-1])


def test_grayscale_first_layer(tmp_path, pl_ns):
    _, events = _fit(pl_ns, tmp_path, FilterMonitor(), model=TinyCNN(in_channels=1), channels=1)
    grid = events.image("filters/model.conv1")
    assert np.array_equal(grid[..., 0], grid[..., 1]) and np.array_equal(grid[..., 1], grid[..., 2])


def test_running_max_scale_never_shrinks(tmp_path, pl_ns):
    _, events = _fit(pl_ns, tmp_path, FilterMonitor(), max_epochs=3)
    scales = [v for _, v in events.scalars("filters/scale/model.conv1")]
    assert all(b >= a for a, b in zip(scales, scales[1:]))


def test_nan_weights_warn_and_do_not_crash(tmp_path, pl_ns):
    model = TinyCNN()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    monitor = FilterMonitor(log_baseline=True, on_error="raise")
    with pytest.warns(UserWarning, match=r"'model.conv1' has NaN/Inf weights in 1 filter"):
        _, events = _fit(pl_ns, tmp_path, monitor, model=model, max_epochs=1, limit_train_batches=1)
    grid = events.image("filters/model.conv1")
    magenta = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 255)
    assert magenta.any()


@pytest.mark.parametrize(
    "layers, match",
    [
        (
            ["model.nope"],
            r"`layers`: the model has no layer named 'model.nope'. Its nn.Conv2d layers are: "
            r"\['model.conv1', 'model.conv2'\]",
        ),
        (["model.fc"], r"`layers`: layer 'model.fc' is a Linear, not a nn.Conv2d"),
    ],
)
def test_bad_layer_names_fail_at_setup(tmp_path, pl_ns, layers, match):
    with pytest.raises(ValueError, match=match):
        _fit(pl_ns, tmp_path, FilterMonitor(layers=layers))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layers": "conv1"}, TypeError, r"`layers` must be a list of layer names"),
        ({"max_filters": 0}, ValueError, r"`max_filters` must be a positive int"),
        ({"scale": -1.0}, ValueError, r"`scale` must be 'running_max' or a positive finite number, got -1.0"),
        ({"scale": "auto"}, ValueError, r"`scale` must be 'running_max'"),
        ({"filmstrip_length": 0}, ValueError, r"`filmstrip_length`"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FilterMonitor(**kwargs)


def test_state_dict_roundtrip_keeps_initial_weights_and_filmstrip(tmp_path, pl_ns):
    monitor = FilterMonitor()
    _fit(pl_ns, tmp_path, monitor)
    state = monitor.state_dict()
    assert state["last_step"] == 8
    restored = FilterMonitor()
    restored.load_state_dict(state)
    assert torch.equal(restored._initial["model.conv1"], monitor._initial["model.conv1"])
    assert [label for label, _ in restored._filmstrips["model.conv1"].frames] == [
        "init",
        "ep 0",
        "ep 1",
    ]  # Lightning's count
    assert restored.state_key == monitor.state_key


def test_resume_continues_same_evidence(tmp_path, pl_ns):
    train, val = loaders()
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    kw = trainer_kwargs(tmp_path, enable_checkpointing=True)
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor(), ckpt], logger=logger, **{**kw, "max_epochs": 1})
    trainer.fit(make_module(pl_ns), train, val)
    first = FilterMonitor()
    trainer2 = pl_ns.Trainer(
        callbacks=[first, pl_ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **{**kw, "max_epochs": 3},
    )
    trainer2.fit(make_module(pl_ns), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("filters/model.conv1") == [0, 4, 8, 12]  # no second baseline, steps increase
    assert [label for label, _ in first._filmstrips["model.conv1"].frames] == ["init", "ep 0", "ep 1", "ep 2"]
    dist = [v for _, v in events.scalars("filters/distance_from_init/model.conv1")]
    assert dist[0] == 0 and all(b > a for a, b in zip(dist, dist[1:]))


def test_model_unchanged_by_monitor_with_inplace_relu_resnet(tmp_path, pl_ns):
    from torchvision.models import resnet18

    model = resnet18(num_classes=4)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    _, events = _fit(
        pl_ns,
        tmp_path,
        FilterMonitor(layers=["model.conv1", "model.layer4.1.conv2"]),
        model=model,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    grid = events.image("filters/model.layer4.1.conv2")
    assert grid.shape[0] > grid.shape[1]  # a row per filter (64 filters), 8 input-channel slices per row


def test_finite_helpers_ignore_nan_and_inf():
    w = torch.tensor([[1.0, -3.0], [float("nan"), 2.0], [float("-inf"), 0.5]])
    assert F.finite_abs_max(w) == 3.0
    assert F.finite_abs_max(torch.full((2, 2), float("nan"))) == 0.0
    assert F.nonfinite_filters(w) == 2
    means = F.finite_means({"a": torch.tensor([1.0, float("nan"), 3.0]), "b": torch.tensor([float("nan")])})
    assert means == {"a": 2.0, "b": None}
