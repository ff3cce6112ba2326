"""ActivationMonitor and its streaming statistics."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import Events, fit_monitor, loaders, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz import ActivationMonitor
from lightning_viz._hooks import hook_count
from lightning_viz.functional import activations as A
from lightning_viz.functional.activations import ChannelStats
from lightning_viz.records import ActivationStats, bus_for


def test_streaming_stats_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.relu(torch.randn(5, 6, 4, 4, generator=gen) - 0.5) for _ in range(7)]
    batches[3][:, 2] = 0  # channel 2 silent in one batch only: not dead
    for b in batches:
        b[:, 4] = 0  # channel 4 silent everywhere: dead
    stats = ChannelStats()
    for b in batches:
        stats.update(b)
    everything = torch.cat(batches)
    rate = (everything > 0).float().mean(dim=(0, 2, 3))
    assert torch.allclose(stats.firing_rate(), rate)
    assert stats.sparsity() == pytest.approx(float((everything <= 0).float().mean()))
    assert stats.mean() == pytest.approx(float(everything.mean()), rel=1e-6)
    assert stats.dead_mask().nonzero().flatten().tolist() == [4]
    assert 0 < stats.samples().numel() <= stats.sample_size


def test_counters_roundtrip_for_distributed_sum():
    stats = ChannelStats()
    stats.update(torch.relu(torch.randn(4, 3, 2, 2)))
    doubled = ChannelStats()
    doubled.update(torch.zeros(1, 3, 2, 2))
    doubled.set_counters(stats.counters() * 2)
    assert torch.allclose(doubled.firing_rate(), stats.firing_rate())
    assert doubled.sparsity() == pytest.approx(stats.sparsity())


class Planted(nn.Module):
    """conv -> ReLU -> pool -> linear; channels 2 and 5 can never fire (zero weights, bias -10)."""

    DEAD = [2, 5]

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            for c in self.DEAD:
                self.conv.weight[c] = 0.0
                self.conv.bias[c] = -10.0

    def forward(self, x):
        x = self.conv(x)
        x = F.relu(x) if self.functional else self.relu(x)
        return self.fc(x.mean(dim=(2, 3)))


_fit = fit_monitor


def test_planted_dead_channels_are_exactly_reported(tmp_path, pl_ns):
    monitor = ActivationMonitor(on_error="raise")
    module, events = _fit(pl_ns, tmp_path, monitor, Planted(), max_epochs=3)
    assert [v for _, v in events.scalars("activations/dead_count/model.relu")] == [2, 2, 2]
    assert [s for s, _ in events.scalars("activations/dead_fraction/model.relu")] == [4, 8, 12]
    assert list(bus_for(module.trainer).latest(ActivationStats)["model.relu"].dead_channels) == Planted.DEAD
    text = events.text("activations/dead_channels")
    assert len(text) == 3 and "| `model.relu` | 2/8 | 2, 5 |" in text[-1][1]
    # sparsity equals a direct computation on the same validation data with the final weights
    _, val = loaders(n=64)
    module.eval()
    with torch.no_grad():
        acts = torch.cat([torch.relu(module.model.conv(x)) for x, _ in val])
    expected = float((acts <= 0).float().mean())
    assert events.scalars("activations/sparsity/model.relu")[-1][1] == pytest.approx(expected, abs=1e-6)
    for tag in ("activations/firing_rate/model.relu", "activations/values/model.relu"):
        assert tag in events.tags["histograms"]
    assert events.image_steps("activations/dead_channels_by_layer") == [4, 8, 12]  # one picture for the model
    history = events.image("activations/dead_channels_by_layer")
    red = (history[..., 0] > 200) & (history[..., 1] < 30) & (history[..., 2] < 60)
    assert red.any()
    assert events.image_steps("activations/maps/model.relu") == [4, 8, 12]


def _plain_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


@pytest.mark.parametrize("lr, rising", [(1.0, True), (0.01, False)])
def test_too_high_learning_rate_kills_units(tmp_path, pl_ns, lr, rising):
    torch.manual_seed(0)
    train, val = loaders(n=128)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(
        callbacks=[ActivationMonitor(on_error="raise")], logger=logger, **trainer_kwargs(tmp_path, max_epochs=4)
    )
    trainer.fit(make_module(pl_ns, _plain_net(), lr=lr), train, val)
    dead = [v for _, v in Events(str(tmp_path / "run")).scalars("activations/dead_fraction/model.3")]
    if rising:
        assert dead[-1] > 0.3 and dead[-1] > dead[0]
    else:
        assert max(dead) == 0.0


def test_resnet18_call_sites_and_model_unchanged(tmp_path, pl_ns):
    from torchvision.models import resnet18

    model = resnet18(num_classes=4)
    inplace = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    hooks = hook_count(model)
    monitor = ActivationMonitor(on_error="raise")
    _, events = _fit(pl_ns, tmp_path, monitor, model, max_epochs=1, limit_train_batches=1, limit_val_batches=2)
    sites = {t.split("activations/sparsity/")[1] for t in events.tags["scalars"] if "activations/sparsity/" in t}
    assert {"model.relu", "model.layer1.0.relu#1", "model.layer1.0.relu#2", "model.layer4.1.relu#2"} <= sites
    assert len(sites) == 1 + 8 * 2
    assert "activations/maps/model.relu" in events.tags["images"]
    assert "activations/maps/model.layer4.1.relu#2" in events.tags["images"]
    assert hook_count(model) == hooks
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == inplace


def test_functional_relu_needs_pre_activation_layers(tmp_path, pl_ns):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"no activation modules.*F.relu.*`pre_activation_layers=\[...\]`.*is off"):
        module, events = _fit(pl_ns, tmp_path, ActivationMonitor(), model)
    assert module.trainer.current_epoch == 2  # training went on
    assert not [t for t in events.tags["scalars"] if t.startswith("activations/")]


def test_pre_activation_layers_count_dead_for_functional_relu(tmp_path, pl_ns):
    model = Planted(functional=True)
    model.relu = nn.Identity()  # no activation module at all
    monitor = ActivationMonitor(pre_activation_layers=["model.conv"], on_error="raise")
    _, events = _fit(pl_ns, tmp_path, monitor, model, max_epochs=1)
    assert events.scalars("activations/dead_count/model.conv")[-1][1] == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"layers": ["model.nope"]},
            r"`layers`: the model has no layer named 'model.nope'. Its .*nn.ReLU.* layers "
            r"are: \['model.relu'\]",
        ),
        ({"layers": ["model.conv"]}, r"`layers`: layer 'model.conv' is a Conv2d, not a nn.ReLU"),
        ({"map_layers": ["model.fc"]}, r"`map_layers`: \['model.fc'\] are not monitored layers"),
        ({"pre_activation_layers": ["model.x"]}, r"`pre_activation_layers`: the model has no layer named 'model.x'"),
    ],
)
def test_bad_layers_fail_at_setup(tmp_path, pl_ns, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(pl_ns, tmp_path, ActivationMonitor(**kwargs), Planted())


def test_dead_counts_asked_for_a_non_relu_model(tmp_path, pl_ns):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"`count_dead=True`.*'model.1' \(GELU\)"):
        _fit(pl_ns, tmp_path, ActivationMonitor(count_dead=True), model)
    _, events = _fit(pl_ns, tmp_path / "auto", ActivationMonitor(), model, max_epochs=1)
    assert "activations/sparsity/model.1" in events.tags["scalars"]
    assert "activations/dead_fraction/model.1" not in events.tags["scalars"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_batches": 0}, ValueError, "`max_batches`"),
        ({"layers": "relu"}, TypeError, "`layers` must be a list"),
        ({"count_dead": "yes"}, TypeError, "`count_dead` must be None, True or False"),
        ({"probes": torch.zeros(1, 3, 4, 4)}, TypeError, "`probes` must be a lightning_viz.ProbeSet"),
        ({"map_probe": -1}, ValueError, "`map_probe` must be a non-negative int"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ActivationMonitor(**kwargs)


def test_empty_validation_loader_warns_and_falls_back_to_training_batches(tmp_path, pl_ns):
    train, _ = loaders(n=64)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), batch_size=4)
    monitor = ActivationMonitor(on_error="raise", max_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, events = _fit(pl_ns, tmp_path, monitor, Planted(), train=train, val=empty, max_epochs=3)
    messages = [str(w.message) for w in record if "ActivationMonitor: no validation batch ran" in str(w.message)]
    assert len(messages) == 1
    steps = [s for s, _ in events.scalars("activations/dead_count/model.relu")]
    assert steps == [8, 12]  # epoch 1 had nothing to show; epochs 2 and 3 use training batches


def test_no_validation_step_uses_bounded_training_batches(tmp_path, pl_ns):
    module = make_module(pl_ns, Planted())
    type(module).validation_step = pl_ns.LightningModule.validation_step
    train, _ = loaders(n=64)
    monitor = ActivationMonitor(on_error="raise", max_batches=2)
    batches = []
    original = monitor._record
    monitor._record = lambda name, index, output: (batches.append(output.shape[0]), original(name, index, output))
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, train)
    assert batches == [16] * (2 * 2)  # 2 training batches in each of 2 epochs; the probe forward is not counted
    assert Events(str(tmp_path / "run")).scalars("activations/dead_count/model.relu")[-1][1] == 2


def test_counters_are_summed_across_ranks():
    monitor = ActivationMonitor()
    monitor._stats = {("relu", 0): ChannelStats()}
    monitor._stats[("relu", 0)].update(torch.tensor([[[1.0], [0.0]]]))
    calls = []

    def reduce(t, reduce_op):
        calls.append(reduce_op)
        return t * 2  # as if a second rank had seen the same batch

    trainer = types.SimpleNamespace(world_size=2, strategy=types.SimpleNamespace(reduce=reduce))
    monitor._reduce(trainer)
    assert calls == ["sum"]
    assert monitor._stats[("relu", 0)].positions.tolist() == [2.0, 2.0]
    assert monitor._stats[("relu", 0)].dead_mask().tolist() == [False, True]


def test_failure_inside_a_hook_warns_once_and_never_reaches_training(tmp_path, pl_ns, monkeypatch):
    def broken(self, activation):
        raise RuntimeError("counter exploded")

    monkeypatch.setattr(ChannelStats, "update", broken)
    model = Planted()
    hooks = hook_count(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, _ = _fit(pl_ns, tmp_path, ActivationMonitor(), model, max_epochs=2)
    messages = [str(w.message) for w in record if "counter exploded" in str(w.message)]
    assert len(messages) == 1 and "switched off" in messages[0]
    assert module.trainer.current_epoch == 2 and hook_count(model) == hooks


def test_site_stats_create_seeded_counters_per_call_site_and_skip_non_tensors():
    stats = A.SiteStats(sample_size=16, seed=3)
    stats.add(("relu", 0), torch.ones(2, 3))
    stats.add(("relu", 1), torch.zeros(2, 4, 2))
    stats.add(("relu", 0), torch.zeros(2, 3))
    stats.add(("head", 0), (torch.ones(2, 3),))  # not a tensor
    stats.add(("head", 0), torch.ones(5))  # no channel dimension
    assert sorted(stats) == [("relu", 0), ("relu", 1)]
    assert stats[("relu", 0)].batches == 2 and stats[("relu", 1)].dead_mask().all()
    again = A.SiteStats(sample_size=16, seed=3)
    again.add(("relu", 0), torch.ones(2, 3))
    again.add(("relu", 0), torch.zeros(2, 3))
    assert torch.equal(again[("relu", 0)].samples(), stats[("relu", 0)].samples())


def test_sum_counters_reduces_every_site_in_one_call():
    stats = {("b", 0): ChannelStats(), ("a", 0): ChannelStats()}
    stats[("a", 0)].update(torch.tensor([[1.0, 0.0]]))
    stats[("b", 0)].update(torch.tensor([[0.0, 0.0, 2.0]]))
    shapes = []
    A.sum_counters(stats, lambda packed: (shapes.append(tuple(packed.shape)), packed * 3)[1])
    assert shapes == [(4, 5)]
    assert stats[("a", 0)].positions.tolist() == [3.0, 3.0]
    assert stats[("b", 0)].total.tolist() == [0.0, 0.0, 6.0]


def test_map_scale_is_a_high_quantile_of_finite_values():
    maps = torch.zeros(1, 20, 20)
    maps[0, 0, :] = 1.0
    maps[0, 1, 0] = 1000.0  # one hot pixel does not set the scale
    maps[0, 2, 0] = float("nan")
    assert A.map_scale(maps) == pytest.approx(1.0)
    assert A.map_scale(torch.zeros(2, 3, 3)) == 1.0
    assert A.map_scale(torch.full((1, 2, 2), float("nan"))) == 1.0


def test_site_maps_per_call_site_and_hooks_removed():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 2, 3), relu, nn.Flatten(), nn.ReLU())
    hooks = hook_count(model)
    maps = A.site_maps(model, {"relu": relu, "flat": model[5]}, torch.randn(1, 3, 8, 8))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {("relu", 0): (4, 6, 6), ("relu", 1): (2, 4, 4)}
    assert hook_count(model) == hooks


def test_activation_layers_resolve_dead_counting():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GELU())
    modules, dead = A.activation_layers(model, None, None, None)
    assert list(modules) == ["1", "3"] and dead == {"1": True, "3": False}
    modules, dead = A.activation_layers(model, None, ["2"], None)
    assert list(modules) == ["2"] and dead == {"2": True}
    assert A.activation_layers(model, ["1"], None, False)[1] == {"1": False}
    with pytest.raises(ValueError, match=r"`count_dead=True`.*'3' \(GELU\)"):
        A.activation_layers(model, None, None, True)


class _RegisteredOutOfOrder(nn.Module):
    """Activations registered out of the order the data passes them, and one registered but never called."""

    def __init__(self, unused: bool) -> None:
        super().__init__()
        self.conv0, self.act0 = nn.Conv2d(8, 8, 1), nn.ReLU()  # registered first, applied last
        if unused:
            self.spare_act = nn.GELU()  # registered, never called
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc, self.head_act, self.out = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)  # (N, 16): no map
        if not unused:
            self.tail_act = nn.Tanh()  # registered last, applied second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.tail_act(x) if hasattr(self, "tail_act") else x
        x = self.act0(self.conv0(self.act2(self.conv2(x)))).mean((2, 3))
        return self.out(self.head_act(self.fc(x)))


@pytest.mark.parametrize("unused", [False, True])
def test_default_map_layers_follow_the_data_not_registration(tmp_path, pl_ns, unused):
    monitor = ActivationMonitor(on_error="raise")
    _, events = _fit(pl_ns, tmp_path, monitor, _RegisteredOutOfOrder(unused), max_epochs=1)
    maps = sorted(t for t in events.tags["images"] if t.startswith("activations/maps/"))
    assert maps == ["activations/maps/model.act0", "activations/maps/model.act1"]  # first and last spatial, by flow
    # an explicit choice is kept as given
    chosen = ActivationMonitor(on_error="raise", map_layers=["model.act2"])
    _, events = _fit(pl_ns, tmp_path / "chosen", chosen, _RegisteredOutOfOrder(unused), max_epochs=1)
    assert [t for t in events.tags["images"] if t.startswith("activations/maps/")] == ["activations/maps/model.act2"]
