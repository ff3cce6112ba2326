"""The diagnosis over a whole run: a gradient explosion within one epoch, an oscillation episode that settles, an
intended warm-restart schedule, and the reference weights taken when training starts."""

from __future__ import annotations

import torch
from conftest import Events, TinyCNN, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz import DiagnosisMonitor
from lightning_viz import diagnosis as D
from lightning_viz import diagnosis_rules as R
from lightning_viz import records as rec
from lightning_viz.callbacks.dynamics_monitor import DynamicsMonitor


def _data(n: int, seed: int, noisy: bool = False) -> TensorDataset:
    """Three learnable classes (channel c brighter for class c); ``noisy``: labels drawn apart from the inputs."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen) * 0.5
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen) if noisy else y)


def _fit(pl_ns, tmp_path, module, callbacks, *, batch_size=8, n=128, noisy=False, **kw):
    torch.manual_seed(0)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **kw))
    train = DataLoader(
        _data(n, 0, noisy), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer.fit(module, train, DataLoader(_data(32, 1), batch_size=16))
    return Events(str(tmp_path / "run")).text("diagnosis/findings")[-1][1]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_gradients_that_explode_between_sampled_steps_are_named_exploding(tmp_path, pl_ns):
    """The learning rate grows 1.6x per step in the second epoch; only each epoch's first step is sampled, so the
    per-layer samples never see the growth: every step's total norm does, and exploding gradients hosts the NaN."""
    torch.manual_seed(0)
    module = make_module(pl_ns, _mlp(), lr=0.01)

    def optimizers():
        opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        grow = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 16 else 1.6 ** (step - 16))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": grow, "interval": "step"}}

    module.configure_optimizers = optimizers
    diagnosis = DiagnosisMonitor()
    callbacks = [DynamicsMonitor(every_n_steps=1000), diagnosis]
    panel = _fit(pl_ns, tmp_path, module, callbacks, noisy=True, max_epochs=3)  # the loss cannot reach 0
    kinds = {f.kind for f in diagnosis.findings}
    assert "exploding_gradients" in kinds and "divergence" not in kinds, panel
    assert "read at every one of 48 optimizer steps" in panel and "orders of magnitude above" in panel
    assert "`dynamics/grad_norm_total/peak`" in panel
    sampled = diagnosis._bus.history(rec.GradientStats, "model.1")
    assert all(r.samples == 1 for r in sampled)  # one sampled step per epoch: the samples alone could not tell


def test_oscillation_episode_mid_run_is_found_and_when_it_settled():
    curve = [2.0, 1.2, 0.8, 1.3, 0.7, 1.25, 0.65, 1.2, 0.6, 0.45, 0.40, 0.37, 0.35, 0.34]
    finding = R.oscillating_loss(list(enumerate(curve, 1)))
    assert finding is not None and finding.kind == "oscillating_loss"
    assert "settled by epoch 13" in finding.evidence[0] and finding.since_epoch <= 3
    assert R.oscillating_loss(list(enumerate(curve, 1))[-6:]) is None  # the last epochs alone: calm


def test_warm_restart_rises_are_the_schedules_but_restarts_that_undo_progress_are_not():
    sgdr = [1.38, 0.343, 0.226, 0.095, 0.163, 0.095, 0.115, 0.042]  # benchmark: CNN+BN, SGDR every 2 epochs
    lr = [(e, 0.05, 0.05, 0.025) if e % 2 else (e, 0.025, 0.025, 0.0) for e in range(1, 9)]
    assert R.oscillating_loss(list(enumerate(sgdr, 1)), learning_rate=lr) is None
    too_high = [0.949, 0.226, 0.448, 0.148, 0.192, 0.125, 0.265, 0.088]  # restarts to an lr 100x too high
    lr = [(e, 0.3, 0.3, 0.3) if e % 2 else (e, 0.003, 0.003, 0.003) for e in range(1, 9)]
    assert R.oscillating_loss(list(enumerate(too_high, 1)), learning_rate=lr) is not None


def test_oscillation_hosts_the_dead_filters_it_causes():
    oscillating = D.Finding("oscillating_loss", "warning", 2, "The training loss oscillates.")
    dead = D.Finding("dead_filters", "warning", 4, "Filters died.")
    found = D.diagnose(D.Evidence(epoch=8), rules=[lambda ev: dead, lambda ev: oscillating])
    assert [f.kind for f in found] == ["oscillating_loss"]
    assert "a consequence, not listed on its own: Filters died." in found[0].evidence


def test_healthy_cosine_warm_restarts_run_is_silent(tmp_path, pl_ns):
    torch.manual_seed(0)
    module = make_module(pl_ns, TinyCNN(num_classes=3), lr=0.05)

    def optimizers():
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
        sgdr = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2 * 8)  # restart every 2 epochs
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sgdr, "interval": "step"}}

    module.configure_optimizers = optimizers
    diagnosis = DiagnosisMonitor()
    panel = _fit(pl_ns, tmp_path, module, [DynamicsMonitor(), diagnosis], batch_size=16, max_epochs=8)
    restarts = [e for (e, first, _, _), (_, _, _, last) in zip(diagnosis._lr[1:], diagnosis._lr) if first > 1.5 * last]
    assert restarts == [3, 5, 7]  # the schedule was read from the optimizer
    assert not {f.kind for f in diagnosis.findings} & set(R.KINDS), panel


def test_initial_weight_norm_is_taken_when_training_starts(tmp_path, pl_ns):
    """Weights loaded in on_fit_start (after setup) are what training starts from: the reference for 'exploding'."""
    torch.manual_seed(0)
    module = make_module(pl_ns, TinyCNN(num_classes=3), lr=1e-3)

    def load_pretrained():
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(5.0)

    module.on_fit_start = load_pretrained
    seen = []

    class AtStart(pl_ns.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(D.weight_norm(pl_module))

    diagnosis = DiagnosisMonitor()
    _fit(pl_ns, tmp_path, module, [AtStart(), diagnosis], n=32, max_epochs=1)
    assert diagnosis._initial_norm == seen[0]
