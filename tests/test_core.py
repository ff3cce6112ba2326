"""The core every monitor shares: namespaces, schedule, sink, isolation, failure handling."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs
from torch import nn

from lightning_viz import FilterMonitor, VizCallback
from lightning_viz._hooks import capture, hook_count, isolated


def _tb_logger(namespace, tmp_path):
    return namespace.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)


def test_both_namespaces_accept_and_log(namespace, tmp_path):
    train, val = loaders()
    trainer = namespace.Trainer(
        callbacks=[FilterMonitor()], logger=_tb_logger(namespace, tmp_path), **trainer_kwargs(tmp_path)
    )
    trainer.fit(make_module(namespace), train, val)
    events = Events(str(tmp_path / "run"))
    # baseline at step 0, then after each of the 2 epochs (4 steps each)
    assert events.image_steps("filters/model.conv1") == [0, 4, 8]


def test_every_n_epochs_schedule_and_steps_are_global_step(tmp_path, pl_ns):
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=[FilterMonitor(every_n_epochs=2)],
        logger=_tb_logger(pl_ns, tmp_path),
        **trainer_kwargs(tmp_path, max_epochs=5, num_sanity_val_steps=2),
    )
    trainer.fit(make_module(pl_ns), train, val)
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("filters/model.conv1") == [0, 8, 16]
    assert [s for s, _ in events.scalars("lightning_viz/seconds/filters")] == [0, 8, 16]


def test_no_baseline_when_disabled(tmp_path, pl_ns):
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=[FilterMonitor(log_baseline=False)], logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path)
    )
    trainer.fit(make_module(pl_ns), train, val)
    assert Events(str(tmp_path / "run")).image_steps("filters/model.conv1") == [4, 8]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be a positive int \(>= 1\), got 0"),
        ({"every_n_epochs": 1.5}, TypeError, r"`every_n_epochs` must be a positive int, got 1.5"),
        ({"every_n_epochs": True}, TypeError, r"`every_n_epochs` must be a positive int"),
        ({"on_error": "ignore"}, ValueError, r"`on_error` must be one of \['warn', 'raise'\], got 'ignore'"),
        ({"seed": "1"}, TypeError, r"`seed` must be an int"),
        ({"max_overhead": 0}, ValueError, r"`max_overhead` must be in"),
        ({"log_baseline": 1}, TypeError, r"`log_baseline` must be True or False"),
    ],
)
def test_base_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FilterMonitor(**kwargs)


def test_no_logger_fails_at_setup_with_a_fix(tmp_path, pl_ns):
    train, val = loaders()
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor()], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match=r"has no logger.*TensorBoardLogger"):
        trainer.fit(make_module(pl_ns), train, val)


def test_fast_dev_run_warns_once_and_logs_nothing(tmp_path, pl_ns):
    train, val = loaders()
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor()], **trainer_kwargs(tmp_path, fast_dev_run=True))
    with pytest.warns(UserWarning, match="fast_dev_run") as record:
        trainer.fit(make_module(pl_ns), train, val)
    assert sum("fast_dev_run" in str(w.message) and "lightning_viz" in str(w.message) for w in record) == 1
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_csv_only_logger_gets_scalars_and_a_warning(tmp_path, pl_ns, monkeypatch):
    """Images no logger can take are not drawn at all: the work is skipped, not done and thrown away."""
    from lightning_viz import render

    drawn = []
    monkeypatch.setattr(render, "filter_grid", lambda *a, **k: drawn.append(1))
    train, val = loaders()
    csv = pl_ns.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor()], logger=csv, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        trainer.fit(make_module(pl_ns), train, val)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "filters/noise_score/model.conv1" in text
    assert "lightning_viz/seconds/filters" in text
    assert not drawn


def test_several_loggers_tensorboard_is_found(tmp_path, pl_ns):
    train, val = loaders()
    loggers = [pl_ns.loggers.CSVLogger(str(tmp_path), name="csv"), _tb_logger(pl_ns, tmp_path)]
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor()], logger=loggers, **trainer_kwargs(tmp_path))
    trainer.fit(make_module(pl_ns), train, val)
    assert Events(str(tmp_path / "run")).image_steps("filters/model.conv1") == [0, 4, 8]


def test_isolated_restores_rng_modes_and_grads():
    model = TinyCNN()
    model.bn1.eval()  # a mixed-mode model: per-module flags must come back, not a blanket train()
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    grad_before = model.conv1.weight.grad
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    modes = [m.training for m in model.modules()]
    with isolated(model, grad=True):
        assert not model.training
        torch.rand(10), np.random.rand(10), random.random()
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        (g,) = torch.autograd.grad(model(x).sum(), x)
        assert g.shape == x.shape
        model.conv2.weight.grad = torch.zeros_like(model.conv2.weight)
    assert [m.training for m in model.modules()] == modes
    assert model.conv1.weight.grad is grad_before and model.conv2.weight.grad is None
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_isolated_enables_grad_inside_inference_mode():
    model = TinyCNN()
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)
        with isolated(model, grad=True):
            x = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.isfinite(g).all()


def test_forward_hooks_removed_when_body_raises():
    model = TinyCNN()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture([model.conv1]):
            assert hook_count(model) == before + 1
            raise RuntimeError("boom")
    assert hook_count(model) == before


class _Failing(VizCallback):
    monitor_name = "failing"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def _log(self, trainer, pl_module, step, epochs_done):
        self.calls += 1
        raise RuntimeError("cannot draw this")


def test_runtime_failure_warns_once_switches_off_and_training_goes_on(tmp_path, pl_ns):
    train, val = loaders()
    failing = _Failing()
    trainer = pl_ns.Trainer(callbacks=[failing], logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(make_module(pl_ns), train, val)
    messages = [str(w.message) for w in record if "cannot draw this" in str(w.message)]
    assert len(messages) == 1 and "switched off" in messages[0]
    assert failing.calls == 1
    assert trainer.current_epoch == 2  # training finished


def test_runtime_failure_raises_with_on_error_raise(tmp_path, pl_ns):
    train, val = loaders()
    module = make_module(pl_ns)
    hooks = hook_count(module)
    trainer = pl_ns.Trainer(
        callbacks=[_Failing(on_error="raise")], logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path)
    )
    with pytest.raises(RuntimeError, match="cannot draw this"):
        trainer.fit(module, train, val)
    assert hook_count(module) == hooks


def test_overhead_warning_names_the_knob(tmp_path, pl_ns):
    class Slow(VizCallback):
        monitor_name = "slow"
        overhead_floor_seconds = 0.1

        def _log(self, trainer, pl_module, step, epochs_done):
            import time

            time.sleep(0.3)

    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=[Slow(max_overhead=0.01)], logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path)
    )
    with pytest.warns(UserWarning, match=r"Slow took .* Raise `every_n_epochs` \(now 1\)") as record:
        trainer.fit(make_module(pl_ns), train, val)
    assert sum("Slow took" in str(w.message) for w in record) == 1


def test_callback_is_a_callback_of_both_namespaces():
    import lightning.pytorch
    import pytorch_lightning

    cb = FilterMonitor()
    assert isinstance(cb, pytorch_lightning.Callback)
    assert isinstance(cb, lightning.pytorch.Callback)


def test_model_without_conv_steps_aside_with_one_warning(tmp_path, pl_ns):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    train, val = loaders()
    trainer = pl_ns.Trainer(callbacks=[FilterMonitor()], logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"not applicable to this run.*FilterMonitor \(`layers`: the model has no"):
        trainer.fit(make_module(pl_ns, model), train, val)
    assert trainer.current_epoch == 2  # training finished


# ---- capture (lightning_viz._hooks) ----
def test_capture_keeps_outputs_inputs_all_or_last():
    from lightning_viz._hooks import capture

    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with capture([model.conv1, model.relu1], keep="all") as outs, capture([model.relu1], what="input") as ins:
            model(x)
            model(x)
        with capture([model.conv1], keep="last") as last:
            model(x)
            model(x)
    assert [len(o) for o in outs] == [2, 2] and len(ins[0]) == 2 and len(last[0]) == 1
    assert torch.equal(ins[0][0], model.bn1(model.conv1(x)))
    assert torch.equal(outs[0][-1], model.conv1(x))
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match=r"`keep` must be one of \['all', 'last'\], got 'first'"):
        with capture([model.conv1], keep="first"):
            pass


def test_default_suite_steps_aside_on_a_model_without_conv_layers(tmp_path, pl_ns):
    """An MLP: the monitors whose default target is a conv layer say so once and step aside; training finishes, the
    others log. A layer the user *names* and that is missing still fails at setup."""
    import lightning_viz

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    train, val = loaders(size=8)
    suite = lightning_viz.default_suite(budget=None, featurevis={"steps": 2}, embedding={"reducer": "pca"})
    trainer = pl_ns.Trainer(callbacks=suite, logger=_tb_logger(pl_ns, tmp_path), **trainer_kwargs(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(pl_ns, mlp), train, val)
    aside = [str(w.message) for w in caught if "not applicable to this run" in str(w.message)]
    assert len(aside) == 1, aside  # one line for all of them
    for name in ("FilterMonitor", "ExemplarMonitor", "FeatureVisMonitor"):
        assert name in aside[0], name
    assert "SaliencyMonitor's Grad-CAM (`gradcam_layer`" in aside[0]
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("saliency/grid") and events.scalars("activations/dead_fraction/model.2")
    assert not [t for t in events.tags["images"] if t.startswith(("filters/", "exemplars/", "featurevis/"))]
    with pytest.raises(ValueError, match="`layers`"):
        trainer = pl_ns.Trainer(
            callbacks=[FilterMonitor(layers=["model.1"])], logger=_tb_logger(pl_ns, tmp_path / "b"),
            **trainer_kwargs(tmp_path / "b"),
        )  # fmt: skip
        trainer.fit(make_module(pl_ns, mlp), train, val)
