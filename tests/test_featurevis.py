"""Feature visualisation: objectives rise, planted orientation is found, same seed gives the same images."""

from __future__ import annotations

import pytest
import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs
from torch import nn

from lightning_viz import FeatureVisMonitor
from lightning_viz._hooks import hook_count
from lightning_viz.functional import featurevis as FV
from lightning_viz.records import FeatureVisStats, bus_for


class EdgeNet(nn.Module):
    """Grayscale; channel 0 of ``conv`` detects vertical edges (dark left, bright right), channel 1 horizontal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 5, padding=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            ramp = torch.linspace(-1, 1, 5)
            self.conv.weight[0, 0] = ramp.view(1, 5).expand(5, 5)
            self.conv.weight[1, 0] = ramp.view(5, 1).expand(5, 5)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _energy(images: torch.Tensor) -> tuple[float, float]:
    """(energy of left-right changes, energy of up-down changes)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).pow(2).mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).pow(2).mean()
    return float(dx), float(dy)


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_planted_edge_detectors_show_their_orientation(param):
    model = EdgeNet().eval()
    result = FV.visualize(
        model,
        FV.channel("relu", [0, 1]),
        n=2,
        size=32,
        channels=1,
        param=param,
        steps=64,
        generator=torch.Generator().manual_seed(0),
        blur_every=4 if param == "pixel" else 0,
    )
    vertical_dx, vertical_dy = _energy(result.images[0])
    horizontal_dx, horizontal_dy = _energy(result.images[1])
    assert vertical_dx > 2 * vertical_dy
    assert horizontal_dy > 2 * horizontal_dx


def test_objective_rises_tenfold_over_the_starting_noise():
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    channels = [0, 3, 5, 7]
    result = FV.visualize(
        model, FV.channel("relu1", channels), n=4, size=32, steps=96, generator=torch.Generator().manual_seed(1)
    )
    assert (result.objective >= 10 * result.initial_objective.clamp_min(1e-3)).all()
    assert (result.images >= 0).all() and (result.images <= 1).all()


def test_same_seed_same_images_and_model_untouched():
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    runs = [
        FV.visualize(
            model, FV.channel("conv2", [1, 2]), n=2, size=24, steps=10, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].images, runs[1].images)
    other = FV.visualize(
        model, FV.channel("conv2", [1, 2]), n=2, size=24, steps=10, generator=torch.Generator().manual_seed(4)
    )
    assert not torch.equal(runs[0].images, other.images)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_count(model) == hooks


def test_other_objectives_and_combinations_run():
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    gen = torch.Generator().manual_seed(0)
    for objective in (
        FV.neuron("conv2", [0, 1]),
        FV.deepdream("relu2"),
        FV.class_logit([1, 2]),
        FV.class_probability([1, 2]),
        FV.channel("relu2", 3) + 0.5 * FV.diversity("relu2"),
    ):
        result = FV.visualize(model, objective, n=2, size=24, steps=12, generator=gen, tv=0.1, l2=0.1)
        assert result.objective.mean() > result.initial_objective.mean(), objective.name
    assert FV.diversity("relu2").layers == ("relu2",)


def test_size_too_small_and_unknown_layer():
    model = TinyCNN().eval()
    with pytest.raises(ValueError, match=r"`size`=12 is too small for the transforms"):
        FV.visualize(model, FV.channel("conv1", 0), n=1, size=12)
    with pytest.raises(ValueError, match=r"reads layer 'nope'"):
        FV.visualize(model, FV.channel("nope", 0), n=1, size=32)
    with pytest.raises(ValueError, match=r"`param` must be one of \['pixel', 'fft'\]"):
        FV.visualize(model, FV.channel("conv1", 0), n=1, size=32, param="cppn")


def test_monitor_logs_grid_and_filmstrip_and_leaves_training_alone(tmp_path, pl_ns):
    train, val = loaders(n=32)
    monitor = FeatureVisMonitor(steps=8, every_n_epochs=1, images_per_channel=2, on_error="raise")
    module = make_module(pl_ns, TinyCNN())
    hooks = hook_count(module)
    trainer = pl_ns.Trainer(
        callbacks=[monitor],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path, max_epochs=2),
    )
    trainer.fit(module, train, val)
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("featurevis/model.conv2") == [0, 2, 4]
    assert events.image_steps("featurevis/filmstrip/model.conv2") == [0, 2, 4]
    grid = events.image("featurevis/model.conv2")
    caption, rows = 11 + 5, -(-16 // (349 // 65))  # per seed: "starting noise s", then 16 tiles wrapped, 5 a row
    assert grid.shape == (2 * (caption + rows * 65 + 1) + 3 * 2, 350, 3)  # TensorBoard's card, 5 * 65 + 1 px of tiles
    assert len(bus_for(trainer).latest(FeatureVisStats)["model.conv2"].channels) == 16
    assert hook_count(module) == hooks and all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"objective": "entropy"}, ValueError, r"`objective` must be one of \['neuron', 'channel', 'deepdream'"),
        ({"image_size": 10}, ValueError, r"`image_size` must be an int >= "),
        ({"channels": [-1]}, ValueError, r"`channels` must be non-empty non-negative"),
        ({"lr": 0}, ValueError, r"`lr` must be in \(0.0, inf\], got 0"),
        ({"parameterization": "cppn"}, ValueError, r"`parameterization` must be one of"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureVisMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": [16]}, r"`channels`: index 16 is out of range; the model has 16 channels"),
        ({"objective": "class_logit", "channels": [4]}, r"index 4 is out of range; the model has 4 classes"),
        ({"layers": ["model.nope"]}, r"`layers`: the model has no layer named 'model.nope'"),
    ],
)
def test_bad_input_fails_at_setup(tmp_path, pl_ns, kwargs, match):
    train, val = loaders(n=16)
    trainer = pl_ns.Trainer(
        callbacks=[FeatureVisMonitor(**kwargs)],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
