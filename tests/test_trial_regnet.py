"""Defects found by a new-user trial (regnet_x_400mf on scikit-image crops, validation every 2 epochs)."""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_viz import diagnosis as D
from lightning_viz import records as rec
from lightning_viz._diagnosis_records import RecordReader, disabled_checks


def _ev(**kw):
    base = dict(epoch=kw.get("epoch", 7), num_classes=3, chance_loss=math.log(3), initial_loss=1.19)
    return D.Evidence(**{**base, **kw})


def _curve(values, start=1):
    return [(start + i, float(v)) for i, v in enumerate(values)]


def test_a_loss_spike_that_recovered_is_not_a_critical_divergence():
    # the trial's curve: 20.2, 15.0, 22.8 in the first epochs, then back to 0.76 (below its initial 1.19)
    recovered = D.divergence(_ev(train_loss=_curve([20.2, 15.0, 22.8, 5.19, 1.08, 0.85, 0.76])))
    assert recovered is not None and recovered.severity == "warning"
    assert "recovered" in recovered.summary and "Training has diverged" not in recovered.summary
    assert any("since come back to 0.76 in epoch 6" in e for e in recovered.evidence)
    # still up, or back but NaN weights seen: critical as before
    for curve, nonfinite in (([20.2, 15.0, 22.8], None), ([20.2, 1.0, 0.8], 2), ([2.0, 30.0, 1.5], None)):
        found = D.divergence(_ev(train_loss=_curve(curve), nonfinite_epoch=nonfinite))
        assert found is not None and found.severity == "critical" and found.summary == "Training has diverged.", curve


def _stats(epoch, dead):
    return rec.ActivationStats(
        step=epoch * 12,
        epoch=epoch,
        subject="net.relu",
        channels=8,
        sparsity=0.5,
        mean=0.1,
        dead_count=dead,
        dead_fraction=None if dead is None else dead / 8,
    )


def _off(bus, reader, epochs_done):
    return disabled_checks(
        bus,
        reader,
        val_tag="val_loss",
        val_name="val_loss",
        train_name="train_loss",
        val_expected=True,
        has_train_loss=True,
        epochs_done=epochs_done,
        chance_classes=3,
        warn=lambda key, message: None,
    )


def test_no_relu_message_waits_for_the_activation_monitor_to_report():
    # validation every 2 epochs: after epoch 1 the ActivationMonitor has not run yet; that is not "no ReLU modules"
    bus = rec.RecordBus()
    bus.announce(rec.ActivationStats, "ActivationMonitor")
    reader = RecordReader()
    assert not any("ReLU-family" in line for line in _off(bus, reader, 1))
    # it reported, with dead counts: nothing switched off
    bus.publish(_stats(2, 1))
    reader.gather(bus, torch.nn.ReLU())
    assert not any("dead filters" in line for line in _off(bus, reader, 2))
    # it reported, with no dead counts anywhere (no ReLU-family module): said
    bus2, reader2 = rec.RecordBus(), RecordReader()
    bus2.announce(rec.ActivationStats, "ActivationMonitor")
    bus2.publish(_stats(2, None))
    reader2.gather(bus2, torch.nn.ReLU())
    assert any("ReLU-family" in line for line in _off(bus2, reader2, 2))


def test_dead_history_panel_fits_the_image_cap_instead_of_shrinking_its_text():
    # regnet_x_400mf has 36 ReLU sites: 3 logged epochs made a 350x2461 panel that the sink shrank to 291 px wide
    # (at 4 epochs to 158 px): every label unreadable. The panel keeps to the cap, worst layers first, and says so.
    from lightning_viz import render

    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(36):
        rates = [torch.rand(160, generator=gen) + 0.01 for _ in range(3)]
        rates[-1][: i % 7] = 0.0  # layer i has i % 7 dead channels now
        layers.append((f"net.block{i}.relu", [(f"ep {e}", r) for e, r in zip((1, 3, 5), rates)]))
    panel = render.dead_history_panel(layers, max_height=2048)
    assert panel.shape[0] <= 2048 and panel.shape[1] == render.CARD_WIDTH
    # a short model is drawn whole, exactly as before
    few = render.dead_history_panel(layers[:4], max_height=2048)
    assert few.shape[0] < 2048 and np.array_equal(few, render.dead_history_panel(layers[:4]))
