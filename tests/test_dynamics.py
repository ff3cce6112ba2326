"""DynamicsMonitor and its rules: each measurement on a planted case, each rule on planted and healthy histories."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from conftest import Events, TinyCNN, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_viz import ActivationMonitor, DiagnosisMonitor
from lightning_viz import diagnosis_rules as R
from lightning_viz import records as rec
from lightning_viz._hooks import hook_count
from lightning_viz.callbacks.dynamics_monitor import DynamicsMonitor
from lightning_viz.functional import dynamics as D


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(int(os.environ.get("DYN_SEED", "0")))  # model initialisations


def _shifted_data(n: int, shift: float, seed: int) -> TensorDataset:
    """Three learnable classes (channel c is brighter for class c), all inputs shifted by ``shift``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen) * 0.5 + shift
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


def _fit(
    pl_ns, tmp_path, model, *, monitor=None, callbacks=(), after=(), train=None, val=None, lr=0.05, optimizer=None, **kw
):
    if train is None:
        train = DataLoader(_shifted_data(64, 0.0, 0), batch_size=16, shuffle=True, generator=torch.Generator())
        val = DataLoader(_shifted_data(32, 0.0, 1), batch_size=16)
    monitor = monitor if monitor is not None else DynamicsMonitor(on_error="raise")
    module = make_module(pl_ns, model, lr=lr)
    if optimizer is not None:
        module.configure_optimizers = lambda: optimizer(module)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[*callbacks, monitor, *after], logger=logger, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, train, val)
    return module, monitor, Events(str(tmp_path / "run"))


def _bus(monitor):
    return monitor._bus


NEW_KINDS = set(R.KINDS)


def _panel(events):
    """The last diagnosis panel a user sees in TensorBoard's text tab."""
    return events.text("diagnosis/findings")[-1][1]


def _new_kinds(diagnosis):
    return {f.kind for f in diagnosis.findings} & NEW_KINDS


# ------------------------------------------------------------------------------------------- the monitor writes
def test_monitor_writes_its_tags_and_a_gradient_flow_image_with_colour_bar(tmp_path, namespace):
    monitor = DynamicsMonitor(on_error="raise", every_n_steps=1)
    _, monitor, events = _fit(namespace, tmp_path, TinyCNN(num_classes=3), monitor=monitor)
    scalars = set(events.tags["scalars"])
    for tag in (
        "dynamics/grad_norm/model.conv1",
        "dynamics/grad_norm/model.fc",
        "dynamics/update_ratio/model.conv2",
        "dynamics/bn_mean_shift/model.bn1",
        "dynamics/bn_var_log_ratio/model.bn2",
        "dynamics/bn_probe/eval_loss",
        "dynamics/bn_probe/batch_stat_accuracy",
        "dynamics/unchanged_parameters",
        "dynamics/initial_loss",
        "dynamics/chance_loss",
        "dynamics/train_loss",
        "lightning_viz/seconds/dynamics",
    ):
        assert tag in scalars, tag
    assert [v for _, v in events.scalars("dynamics/chance_loss")] == pytest.approx([math.log(3)] * 2)
    assert events.image_steps("dynamics/gradient_flow") == [4, 8]
    image = events.image("dynamics/gradient_flow")
    assert image.shape[0] > 5 * 12 and image.shape[1] > 160  # five layer rows, labels on the left
    # the colour bar runs from viridis dark purple to yellow, labelled in decades
    assert ((image[..., 0] > 230) & (image[..., 1] > 200) & (image[..., 2] < 80)).any()
    assert ((image[..., 0] < 90) & (image[..., 1] < 30) & (image[..., 2] > 70)).any()
    ratio = _bus(monitor).latest(rec.UpdateStats)["model.conv1"].update_ratio
    assert 1e-5 < ratio < 1.0
    assert _bus(monitor).latest(rec.GradientStats)["model.conv1"].samples == 4  # every step of a 4-step epoch


def test_sampling_thins_out_to_its_budget_but_keeps_a_step_per_epoch(tmp_path, pl_ns):
    monitor = DynamicsMonitor(on_error="raise")
    monitor.sample_budget = 1e-9  # any sample is too expensive: one per epoch remains (the epoch's first step)
    _fit(pl_ns, tmp_path, TinyCNN(num_classes=3), monitor=monitor, max_epochs=2)
    assert monitor._sampling.every > 4
    # the first epoch needs two steps to know a step's time
    assert [r.samples for r in _bus(monitor).history(rec.GradientStats, "model.fc")] == [2, 1]


def test_configuration_errors_name_the_argument(pl_ns, tmp_path):
    with pytest.raises(ValueError, match="`every_n_steps`"):
        DynamicsMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="`num_classes`"):
        DynamicsMonitor(num_classes=1)
    with pytest.raises(ValueError, match=r"`layers`: \['nope'\].*model.conv1"):
        _fit(pl_ns, tmp_path, TinyCNN(), monitor=DynamicsMonitor(layers=["nope"]))


# ------------------------------------------------------------------------------------------ the guarantees
def _train_seeded(pl_ns, tmp_path, callbacks):
    pl_ns.seed_everything(3)
    data = _shifted_data(96, 0.0, 0)
    train = DataLoader(data, batch_size=16, sampler=RandomSampler(data))
    val = DataLoader(_shifted_data(32, 0.0, 1), batch_size=16)
    model = TinyCNN(num_classes=3)
    model.bn1.requires_grad_(False)
    module = make_module(pl_ns, model)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl_ns.Trainer(
        callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2)
    )
    before = hook_count(module)
    trainer.fit(module, train, val)
    assert hook_count(module) == before  # hooks removed after fit
    return module, (torch.rand(3), np.random.rand(2), random.random())


class _GradSpy:
    """Callbacks around the monitor: the one before clones each .grad, the one after checks they are untouched."""

    def __init__(self, pl_ns) -> None:
        spy = self
        self.checked = 0

        class Before(pl_ns.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                spy.grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in pl_module.parameters()]

        class After(pl_ns.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                for p, (obj, value) in zip(pl_module.parameters(), spy.grads):
                    assert p.grad is obj and (value is None or torch.equal(p.grad, value))
                spy.checked += 1

        self.before, self.after = Before(), After()


def test_training_is_bit_identical_and_grads_untouched(tmp_path, pl_ns):
    plain, rng_plain = _train_seeded(pl_ns, tmp_path / "plain", [])
    spy = _GradSpy(pl_ns)
    monitor = DynamicsMonitor(on_error="raise", every_n_steps=1)
    watched, rng_watched = _train_seeded(pl_ns, tmp_path / "watched", [spy.before, monitor, spy.after])
    a, b = plain.state_dict(), watched.state_dict()
    for key in a:  # weights and BatchNorm buffers
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(rng_plain[0], rng_watched[0]) and rng_plain[2] == rng_watched[2]
    assert spy.checked == 6  # 6 batches / 2 accumulated x 2 epochs; every step sampled
    assert _bus(monitor).latest(rec.BatchNormProbe)[""].samples == 32


# -------------------------------------------------------------------------------------- planted measurements
def test_unchanged_weights_left_out_of_the_optimizer_vs_frozen(tmp_path, pl_ns):
    model = TinyCNN(num_classes=3)
    model.bn1.requires_grad_(False)  # frozen on purpose: not a finding
    for conv in (model.conv1, model.conv2):
        conv.register_parameter("bias", None)  # a bias before BatchNorm only gets rounding noise: keep the case crisp
    model.unused = nn.Linear(2, 2)  # never called: no gradient reaches it

    def without_fc(module):
        params = [p for n, p in module.named_parameters() if not n.startswith("model.fc") and p.requires_grad]
        return torch.optim.SGD(params, lr=0.05)

    diagnosis = DiagnosisMonitor()
    _, monitor, events = _fit(pl_ns, tmp_path, model, optimizer=without_fc, after=[diagnosis])
    panel = _panel(events)
    assert "WARNING: unchanged weights (since the start)" in panel and "`model.fc.weight`" in panel
    assert "left out of the optimizer" in panel and "`dynamics/unchanged_parameters`" in panel
    assert "`model.bn1.weight`" not in panel and "frozen on purpose (not counted)" in panel
    updates = _bus(monitor).latest(rec.UpdateStats)
    assert updates["model.fc"].unchanged == ("model.fc.weight", "model.fc.bias")
    assert updates["model.fc"].without_grad == ()  # it had gradients: the optimizer skipped it
    assert (
        updates["model.bn1"].frozen == ("model.bn1.weight", "model.bn1.bias") and updates["model.bn1"].unchanged == ()
    )
    assert updates["model.conv1"].unchanged == ()
    unused = ("model.unused.weight", "model.unused.bias")
    assert updates["model.unused"].unchanged == updates["model.unused"].without_grad == unused
    assert events.scalars("dynamics/unchanged_parameters")[-1][1] == 4
    finding = R.unchanged_weights(updates.values())
    assert finding is not None and finding.severity == "warning" and "model.fc.weight" in finding.evidence[0]
    assert "2 of them never had a gradient" in finding.evidence[1]
    assert "2 had gradients but were not updated: left out of the optimizer" in finding.evidence[2]
    unused_only = R.unchanged_weights([updates["model.unused"]])
    assert unused_only is not None and unused_only.severity == "info"  # dead weight, not a bug
    assert "frozen on purpose" in finding.evidence[-1]


def test_batchnorm_with_tiny_momentum_on_shifted_data_is_named(tmp_path, pl_ns):
    def model(momentum):
        blocks = []
        for c_in, c_out in ((3, 8), (8, 16), (16, 16)):
            # no padding: zero borders would leak the shift past train-mode BatchNorm and spoil training
            blocks += [nn.Conv2d(c_in, c_out, 3), nn.BatchNorm2d(c_out, momentum=momentum), nn.ReLU()]
        return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

    shifted = dict(
        train=DataLoader(_shifted_data(128, 10.0, 0), batch_size=32, shuffle=True, generator=torch.Generator()),
        val=DataLoader(_shifted_data(64, 10.0, 1), batch_size=32),
    )
    diagnosis = DiagnosisMonitor()
    after = [ActivationMonitor(), diagnosis]
    _, sick, events = _fit(pl_ns, tmp_path / "sick", model(0.001), max_epochs=3, after=after, **shifted)
    # the final panel names the cause; dead filters, not learning, under-training measured in eval mode fold into it
    kinds = [f.kind for f in diagnosis.findings]
    assert kinds[0] == "batchnorm_mismatch" and not {"dead_filters", "not_learning", "undertraining"} & set(kinds)
    panel = _panel(events)
    assert "batchnorm mismatch" in panel and "momentum of those layers: 0.001" in panel
    assert "a consequence, not listed on its own: Dead filters" in panel  # named as a consequence, not a finding
    assert ": dead filters (since" not in panel and ": undertraining (since" not in panel
    assert "`dynamics/bn_probe/eval_loss`" in panel and "update_bn" in panel
    probe = _bus(sick).latest(rec.BatchNormProbe)[""]
    layers = _bus(sick).latest(rec.BatchNormStats)
    assert layers["model.1"].mean_shift > 2.0 and layers["model.1"].momentum == 0.001
    assert probe.eval_loss > 3 * probe.batch_stat_loss and probe.eval_accuracy < probe.batch_stat_accuracy
    finding = R.batchnorm_mismatch(probe, layers.values())
    assert finding is not None and finding.kind == "batchnorm_mismatch" and "model.1`" in finding.evidence[1]

    diagnosis = DiagnosisMonitor()
    _, healthy, events = _fit(pl_ns, tmp_path / "healthy", model(0.1), max_epochs=3, after=[diagnosis])
    assert not _new_kinds(diagnosis) and "batchnorm mismatch" not in _panel(events)
    probe = _bus(healthy).latest(rec.BatchNormProbe)[""]
    assert probe.eval_accuracy >= probe.batch_stat_accuracy - 0.1  # eval mode works about as well
    assert R.batchnorm_mismatch(probe, _bus(healthy).latest(rec.BatchNormStats).values()) is None


def test_functional_norms_and_moments_are_exact():
    a, b = torch.randn(3, 4), torch.randn(5)
    norms = D.layer_norms({"l": [a, None, b], "empty": [None]})
    assert norms["l"] == pytest.approx(torch.cat([a.flatten(), b]).norm().item(), rel=1e-6) and norms["empty"] is None
    assert D.difference_norms({"l": [a]}, {"l": [a - 1]})["l"] == pytest.approx(math.sqrt(12), rel=1e-6)
    assert D.update_ratios({"l": 0.5, "z": 1.0}, {"l": 100.0, "z": 0.0}) == {"l": 0.005, "z": None}
    moments, x = D.MomentStats(), torch.randn(7, 3, 5, 5) * 2 + 1
    moments.update(x[:4])
    moments.update(x[4:])
    mean, var = moments.mean_var()
    assert torch.allclose(mean, x.double().mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(var, x.double().var(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    shift, ratio = D.running_stat_distance(mean + 2 * var.sqrt(), 4 * var, mean, var, eps=0.0)
    assert shift == pytest.approx(2.0) and ratio == pytest.approx(math.log(4))
    y = torch.tensor([-0.99, -0.5, 0.0, 0.98])
    assert D.tail_mask(nn.Tanh(), y).tolist() == [True, False, False, True]
    assert D.tail_mask(nn.Hardtanh(), torch.tensor([-1.0, 0.3, 1.0])).tolist() == [True, False, True]
    assert list(D.saturating_layers(nn.Sequential(nn.ReLU6(), nn.Sigmoid()))) == ["1"]  # ReLU6 is a ReLU


def test_batch_statistics_restore_running_stats_exactly():
    model = TinyCNN()
    model.bn1.momentum = None  # cumulative average: uses num_batches_tracked too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = D.eval_vs_batch_stats(model, model, torch.randn(8, 3, 8, 8) + 2, torch.randint(0, 4, (8,)))
    assert result is not None and result["classes"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not m.training for m in model.modules())


def test_saturated_tanh_with_huge_weights(tmp_path, pl_ns):
    def model(scale):
        m = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Tanh(), nn.Linear(32, 3))
        with torch.no_grad():
            m[1].weight.mul_(scale)
        return m

    diagnosis = DiagnosisMonitor()
    _, sick, events = _fit(pl_ns, tmp_path / "sick", model(100.0), max_epochs=1, lr=0.0, after=[diagnosis])
    assert "CRITICAL: saturated activations" in _panel(events) and "`dynamics/saturation/model.2`" in _panel(events)
    stats = _bus(sick).latest(rec.SaturationStats)["model.2"]
    assert stats.kind == "Tanh" and stats.saturated_fraction > 0.95
    assert events.scalars("dynamics/saturation/model.2")[-1][1] > 0.95
    finding = R.saturated_activations("model.2", _bus(sick).history(rec.SaturationStats, "model.2"))
    assert finding is not None and finding.severity == "critical"

    diagnosis = DiagnosisMonitor()
    _, healthy, events = _fit(pl_ns, tmp_path / "healthy", model(1.0), max_epochs=1, lr=0.0, after=[diagnosis])
    assert "saturated_activations" not in _new_kinds(diagnosis) and "saturated" not in _panel(events)
    calm = _bus(healthy).history(rec.SaturationStats, "model.2")
    assert calm[-1].saturated_fraction < 0.2 and R.saturated_activations("model.2", calm) is None
    assert R.batchnorm_mismatch(None, []) is None  # no BatchNorm: no probe record, no finding
    assert _bus(healthy).latest(rec.BatchNormProbe) == {}


def test_deep_sigmoid_mlp_has_vanishing_gradients(tmp_path, pl_ns):
    def mlp(depth, act):
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(192, 32), act()]
        for _ in range(depth):
            layers += [nn.Linear(32, 32), act()]
        return nn.Sequential(*layers, nn.Linear(32, 3))

    diagnosis = DiagnosisMonitor()
    _, sick, events = _fit(pl_ns, tmp_path / "sick", mlp(10, nn.Sigmoid), max_epochs=2, after=[diagnosis])
    assert diagnosis.findings[0].kind == "vanishing_gradients"
    assert "vanishing gradients" in _panel(events) and "`dynamics/gradient_flow`" in _panel(events)
    assert "not learning" not in _panel(events).split("usual remedies")[-1]  # folded into the cause
    grads = _bus(sick).latest(rec.GradientStats)
    first, last = grads["model.1"].grad_norm, grads["model.23"].grad_norm
    assert math.log10(last / first) > 4
    losses = [(r.epoch, r.train_loss) for r in _bus(sick).history(rec.LossStats)]
    finding = R.vanishing_gradients(
        grads.values(), train_loss=losses, updates=_bus(sick).latest(rec.UpdateStats).values()
    )
    assert finding is not None and finding.kind == "vanishing_gradients" and "orders of magnitude" in finding.summary

    diagnosis = DiagnosisMonitor()
    _, healthy, _ = _fit(pl_ns, tmp_path / "healthy", mlp(1, nn.ReLU), max_epochs=2, after=[diagnosis])
    assert not _new_kinds(diagnosis)
    grads = _bus(healthy).latest(rec.GradientStats)
    losses = [(r.epoch, r.train_loss) for r in _bus(healthy).history(rec.LossStats)]
    assert R.vanishing_gradients(grads.values(), train_loss=losses) is None


def test_initial_loss_of_a_badly_scaled_last_layer(tmp_path, pl_ns):
    model = TinyCNN(num_classes=3)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([10.0, -10.0, 0.0]))  # confident before any training
    diagnosis = DiagnosisMonitor()
    _, sick, events = _fit(pl_ns, tmp_path / "sick", model, max_epochs=1, after=[diagnosis])
    assert "initial loss (since the start)" in _panel(events) and "chance level ln(3)" in _panel(events)
    loss = _bus(sick).latest(rec.LossStats)[""]
    assert loss.classes == 3 and loss.initial_loss > 2 * math.log(3)
    finding = R.initial_loss_off_chance(loss)
    assert finding is not None and "far above" in finding.summary and "ln(3)" in finding.evidence[0]

    diagnosis = DiagnosisMonitor()
    _, healthy, events = _fit(pl_ns, tmp_path / "healthy", TinyCNN(num_classes=3), max_epochs=1, after=[diagnosis])
    assert not _new_kinds(diagnosis) and "initial loss" not in _panel(events)
    loss = _bus(healthy).latest(rec.LossStats)[""]
    assert abs(loss.initial_loss - math.log(3)) < 0.3 and R.initial_loss_off_chance(loss) is None


# ---------------------------------------------------------------------------------------- rules on histories
def _grad(subject, order, norm, epoch=1, nonfinite=0, samples=4):
    return rec.GradientStats(
        step=epoch * 10,
        epoch=epoch,
        subject=subject,
        order=order,
        matrix=True,
        grad_norm=norm,
        grad_norm_max=norm,
        nonfinite_steps=nonfinite,
        samples=samples,
    )


def test_exploding_gradients_rule():
    growing = {f"l{i}": [_grad(f"l{i}", i, 0.1 * 10**e, epoch=e) for e in range(4)] for i in range(3)}
    finding = R.exploding_gradients(growing)
    assert finding is not None and finding.severity == "warning" and finding.since_epoch == 2
    steady = {f"l{i}": [_grad(f"l{i}", i, 0.1 * (1 + 0.2 * e), epoch=e) for e in range(4)] for i in range(3)}
    assert R.exploding_gradients(steady) is None
    broken = {"l0": [_grad("l0", 0, 0.1, epoch=1), _grad("l0", 0, None, epoch=2, nonfinite=4)]}
    finding = R.exploding_gradients(broken)
    assert finding is not None and finding.severity == "critical" and "NaN/Inf" in finding.evidence[0]


def test_vanishing_rule_stays_silent_when_the_network_learns():
    grads = [_grad(f"l{i}", i, 10.0 ** (i - 8)) for i in range(8)]
    assert R.vanishing_gradients(grads, train_loss=[(1, 2.0), (2, 1.0)]) is None  # gap, but the loss falls
    assert R.vanishing_gradients(grads, train_loss=[(1, 2.0), (2, 1.98)]) is not None
    assert R.vanishing_gradients([_grad(f"l{i}", i, 0.1) for i in range(8)], train_loss=[(1, 2.0), (2, 1.98)]) is None


def test_oscillating_loss_rule():
    zigzag = [(e, 1.0 - 0.02 * e + (0.3 if e % 2 else -0.3)) for e in range(8)]
    finding = R.oscillating_loss(zigzag)
    assert finding is not None and finding.kind == "oscillating_loss"
    assert R.oscillating_loss([(e, 2.0 * 0.7**e) for e in range(8)]) is None  # smooth decay
    assert R.oscillating_loss([(e, 1.0 + 0.01 * (-1) ** e) for e in range(8)]) is None  # small noise
    assert R.oscillating_loss(zigzag[:4]) is None  # too short to judge
    assert R.oscillating_loss([*zigzag, (8, float("nan"))]) is None  # NaN: divergence, not oscillation


def test_rules_on_planted_records_and_silence_on_healthy_ones():
    probe = rec.BatchNormProbe(
        step=9,
        epoch=3,
        subject="",
        eval_loss=2.3,
        batch_stat_loss=0.05,
        eval_accuracy=0.1,
        batch_stat_accuracy=0.98,
        samples=64,
        classes=10,
    )
    far = rec.BatchNormStats(step=9, epoch=3, subject="bn", mean_shift=3.0, var_log_ratio=2.0, momentum=0.01, batches=4)
    near = rec.BatchNormStats(step=9, epoch=3, subject="bn", mean_shift=0.1, var_log_ratio=0.1, momentum=0.1, batches=4)
    finding = R.batchnorm_mismatch(probe, [far])
    assert finding is not None and finding.severity == "critical" and "momentum of those layers: 0.01" in str(finding)
    assert any("larger BatchNorm momentum" in r for r in finding.remedies)
    usual = rec.BatchNormStats(**{**far.__dict__, "momentum": 0.1})  # already the usual momentum: not advised again
    assert not any("momentum" in r for r in R.batchnorm_mismatch(probe, [usual]).remedies)
    assert R.batchnorm_mismatch(probe, [near]) is None  # eval is worse, but not explained by the running stats
    fine = rec.BatchNormProbe(**{**probe.__dict__, "eval_loss": 0.06, "eval_accuracy": 0.97})
    assert R.batchnorm_mismatch(fine, [far]) is None
    loss = rec.LossStats(step=1, epoch=1, subject="", train_loss=1.0, initial_loss=2.31, classes=10, chance_loss=2.3026)
    assert R.initial_loss_off_chance(loss) is None
    assert R.initial_loss_off_chance(rec.LossStats(**{**loss.__dict__, "initial_loss": 9.0})).severity == "critical"
    assert R.initial_loss_off_chance(rec.LossStats(**{**loss.__dict__, "classes": None, "chance_loss": None})) is None
    assert (
        R.unchanged_weights([rec.UpdateStats(step=1, epoch=1, subject="fc", update_ratio=1e-3, weight_norm=1.0)])
        is None
    )


# ------------------------------------------------------------------------------- end to end: exploding, oscillating
def test_exploding_gradients_from_the_bus_and_an_oscillating_loss_reach_the_panel(tmp_path, pl_ns):
    """The wiring: gradient records growing by orders of magnitude (as a DynamicsMonitor publishes them; the rule
    on real runs is in benchmarks/diagnosis.py --dynamics) and a training loss that swings from epoch to epoch."""

    class Growing(pl_ns.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            bus, epoch = rec.bus_for(trainer), trainer.current_epoch + 1
            bus.announce(rec.GradientStats, "test")
            for i in range(3):
                bus.publish(_grad(f"l{i}", i, 0.1 * 10 ** (epoch - 1), epoch=epoch))

    def swinging_module():
        module = make_module(pl_ns, TinyCNN(num_classes=3), lr=1e-3)
        plain = type(module).training_step

        def swinging(self, batch, batch_idx):  # the loss a too-high restart every other epoch gives
            return plain(self, batch, batch_idx) * (2.0 if self.current_epoch % 2 else 1.0)

        type(module).training_step = swinging
        return module

    train, val = _shifted_data(64, 0.0, 0), _shifted_data(32, 0.0, 1)
    panels = []
    for name, callbacks in (("growing", [Growing()]), ("swinging", [])):
        diagnosis = DiagnosisMonitor()
        logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name=name, version=0)
        kwargs = trainer_kwargs(tmp_path, max_epochs=7)
        trainer = pl_ns.Trainer(callbacks=[*callbacks, diagnosis], logger=logger, **kwargs)
        trainer.fit(swinging_module(), DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
        panels.append(_panel(Events(str(tmp_path / name))))
    growing, swinging = panels
    assert "CRITICAL: exploding gradients (since epoch 2)" in growing and "orders of magnitude above its" in growing
    assert "`dynamics/gradient_flow`" in growing and "clip gradients" in growing
    assert "WARNING: oscillating loss" in swinging and "reverse direction" in swinging
    assert "exploding gradients (since" not in swinging
