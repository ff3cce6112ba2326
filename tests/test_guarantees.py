"""The promises the whole suite keeps: training is unchanged, nothing is left behind, failures never stop training."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import lightning_viz
from lightning_viz import VizCallback
from lightning_viz._hooks import hook_count, isolated

FAST = dict(featurevis={"steps": 4}, embedding={"reducer": "pca"})  # the full suite, quick settings


def _frozen_bn_model() -> nn.Module:
    model = TinyCNN()
    model.bn1.requires_grad_(False)  # a frozen BatchNorm submodule
    return model


def _train(pl_ns, tmp_path, callbacks, seed=7, **kw):
    pl_ns.seed_everything(seed)
    data = TensorDataset(torch.randn(96, 3, 16, 16), torch.randint(0, 4, (96,)))
    train = DataLoader(data, batch_size=16, sampler=RandomSampler(data))  # shuffled by the global RNG
    val = DataLoader(TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))), batch_size=16)
    module = make_module(pl_ns, _frozen_bn_model())
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run")
    kw = {**dict(max_epochs=3, accumulate_grad_batches=2), **kw}
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, train, val)
    return module, trainer


def test_default_suite_leaves_training_bit_identical(tmp_path, pl_ns):
    plain, plain_trainer = _train(pl_ns, tmp_path / "plain", [])
    after_plain = (torch.rand(4), np.random.rand(2), random.random())
    watched, watched_trainer = _train(pl_ns, tmp_path / "watched", lightning_viz.default_suite())
    after_watched = (torch.rand(4), np.random.rand(2), random.random())
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights and BatchNorm buffers (running stats, num_batches_tracked)
        assert torch.equal(a[key], b[key]), key
    opt_a = plain_trainer.optimizers[0].state_dict()
    opt_b = watched_trainer.optimizers[0].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for idx in opt_a["state"]:
        assert torch.equal(opt_a["state"][idx]["momentum_buffer"], opt_b["state"][idx]["momentum_buffer"])
    # the global RNG streams continue exactly as without the callbacks
    assert torch.equal(after_plain[0], after_watched[0])
    assert np.array_equal(after_plain[1], after_watched[1]) and after_plain[2] == after_watched[2]
    assert plain_trainer.global_step == watched_trainer.global_step == 9  # 6 batches / 2 accumulated, 3 epochs


def test_nothing_changes_around_any_callback_call(tmp_path, pl_ns, monkeypatch):
    """RNG states, every .grad (None included), every module's mode and every buffer are unchanged by each call."""
    violations, calls = [], []
    original = VizCallback._run

    def checked(self, trainer, pl_module, epochs_done):
        before = (
            torch.get_rng_state(),
            np.random.get_state()[1].copy(),
            random.getstate(),
            [p.grad for p in pl_module.parameters()],
            [p.grad.clone() if p.grad is not None else None for p in pl_module.parameters()],
            [m.training for m in pl_module.modules()],
            {k: v.clone() for k, v in pl_module.named_buffers()},
            [p.requires_grad for p in pl_module.parameters()],
            hook_count(pl_module),
        )
        original(self, trainer, pl_module, epochs_done)
        calls.append(type(self).__name__)
        name = type(self).__name__
        if not torch.equal(before[0], torch.get_rng_state()):
            violations.append(f"{name}: torch RNG")
        if not np.array_equal(before[1], np.random.get_state()[1]) or before[2] != random.getstate():
            violations.append(f"{name}: numpy/random RNG")
        for p, grad, value in zip(pl_module.parameters(), before[3], before[4]):
            if p.grad is not grad or (value is not None and not torch.equal(p.grad, value)):
                violations.append(f"{name}: .grad")
        if [m.training for m in pl_module.modules()] != before[5]:
            violations.append(f"{name}: training flags")
        for key, value in pl_module.named_buffers():
            if not torch.equal(value, before[6][key]):
                violations.append(f"{name}: buffer {key}")
        if [p.requires_grad for p in pl_module.parameters()] != before[7] or hook_count(pl_module) != before[8]:
            violations.append(f"{name}: requires_grad or hooks")

    monkeypatch.setattr(VizCallback, "_run", checked)
    module = make_module(pl_ns, _frozen_bn_model())
    module.model.bn2.eval()  # a mixed-mode model
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=lightning_viz.default_suite(every_n_epochs=1, **FAST),
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=3),  # .grad is mid-accumulation in calls
    )
    trainer.fit(module, train, val)
    assert not violations, violations
    assert set(calls) == {type(cb).__name__ for cb in lightning_viz.default_suite()}


def test_no_hooks_after_fit_validate_test_and_an_exception(tmp_path, pl_ns):
    module = make_module(pl_ns, TinyCNN())
    hooks = hook_count(module)
    train, val = loaders()
    suite = lightning_viz.default_suite(**FAST)
    kw = trainer_kwargs(tmp_path)
    trainer = pl_ns.Trainer(callbacks=suite, logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **kw)
    trainer.fit(module, train, val)
    assert hook_count(module) == hooks
    # validate() and test() run under Lightning's inference mode: every monitor stays quiet, nothing raises
    module.test_step = module.validation_step
    trainer.validate(module, val)
    trainer.test(module, val)
    assert hook_count(module) == hooks
    # an exception raised inside a monitor's forward hook, mid-validation, with on_error="raise"
    from lightning_viz.functional.activations import ChannelStats

    def boom(self, activation):
        raise RuntimeError("injected")

    failing = lightning_viz.default_suite(on_error="raise", **FAST)
    embedding = next(cb for cb in failing if isinstance(cb, lightning_viz.EmbeddingMonitor))
    original = ChannelStats.update
    ChannelStats.update = boom
    try:
        trainer = pl_ns.Trainer(callbacks=failing, logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **kw)
        with pytest.raises(RuntimeError, match="injected"):
            trainer.fit(module, train, val)
    finally:
        ChannelStats.update = original
    assert hook_count(module) == hooks
    assert not embedding._projections.running and not embedding._projections.pending


def test_gradient_monitors_work_inside_inference_mode(tmp_path, pl_ns):
    """Called from inside torch.inference_mode (as from a validation hook), gradient methods still work."""

    class InsideValidation(lightning_viz.SaliencyMonitor):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                with torch.inference_mode():  # as Lightning's validation steps run
                    self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

        def on_train_epoch_end(self, trainer, pl_module):
            pass

    monitor = InsideValidation(every_n_epochs=1, on_error="raise", occlusion_window=4, log_baseline=False)
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=[monitor],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="r", version=0),
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    assert Events(str(tmp_path / "r" / "version_0")).image_steps("saliency/grid") == [4, 8]


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["resnet18", "functional_relu", "compiled"])
def test_models_with_the_full_suite(tmp_path, pl_ns, kind):
    if kind == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=4)
    elif kind == "functional_relu":
        model = FunctionalReLU()
    else:
        model = torch.compile(TinyCNN(), backend="eager")
    train, val = loaders(n=32)
    module = make_module(pl_ns, model)
    hooks = hook_count(module)
    trainer = pl_ns.Trainer(
        callbacks=lightning_viz.default_suite(every_n_epochs=1, **FAST),
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="r", version=0),
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    ours = [str(w.message) for w in record if "Monitor" in str(w.message)]
    failures = [m for m in ours if "switched off" in m]
    assert trainer.current_epoch == 1 and hook_count(module) == hooks
    events = Events(str(tmp_path / "r" / "version_0"))
    assert "saliency/grid" in events.tags["images"] and "diagnosis/findings/text_summary" in events.tags["tensors"]
    if kind == "functional_relu":  # said clearly, once each: no activation modules, no ReLU rule to swap
        assert any("no activation modules" in m for m in ours) and any("no nn.ReLU modules" in m for m in ours)
    else:
        assert not failures, failures


def test_fast_dev_run_and_loggers(tmp_path, pl_ns):
    train, val = loaders(n=32)
    trainer = pl_ns.Trainer(
        callbacks=lightning_viz.default_suite(**FAST), **trainer_kwargs(tmp_path, fast_dev_run=True)
    )
    with pytest.warns(UserWarning, match="fast_dev_run"):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    trainer = pl_ns.Trainer(callbacks=lightning_viz.default_suite(**FAST), **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match="has no logger"):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    csv = pl_ns.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl_ns.Trainer(
        callbacks=lightning_viz.default_suite(**FAST), logger=csv, **trainer_kwargs(tmp_path, max_epochs=1)
    )
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "diagnosis/findings" in text and "activations/sparsity/model.relu1" in text


def test_default_suite_options():
    suite = lightning_viz.default_suite(every_n_epochs=3, filters={"max_filters": 8}, seed=5)
    names = [type(cb).__name__ for cb in suite]
    assert names == [
        "FilterMonitor",
        "ActivationMonitor",
        "SaliencyMonitor",
        "EmbeddingMonitor",
        "ExemplarMonitor",
        "FeatureVisMonitor",
        "AttentionMonitor",
        "DynamicsMonitor",
        "DiagnosisMonitor",
    ]
    assert all(cb.every_n_epochs == 3 and cb.seed == 5 for cb in suite)
    assert [cb.every_n_epochs for cb in lightning_viz.default_suite()] == [1, 1, 2, 3, 5, 10, 1, 1, 1]
    assert suite[0].max_filters == 8
    assert "FilterMonitor" not in [type(cb).__name__ for cb in lightning_viz.default_suite(filters=False)]
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['filter'\]"):
        lightning_viz.default_suite(filter={})
    with pytest.raises(TypeError, match=r"`filters` must be a dict of FilterMonitor options or False"):
        lightning_viz.default_suite(filters=3)


def test_compiled_models_run_eagerly_inside_our_work():
    """Our hooks fire on a torch.compile-d model, and our calls cause no recompilation of the user's model."""
    from lightning_viz.functional import saliency as sal

    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # no compiled code cached by earlier tests for TinyCNN.forward
    torch.manual_seed(0)
    model = torch.compile(TinyCNN(), backend=counting_backend).eval()
    x = torch.randn(2, 3, 16, 16)
    model(x)
    compiled = len(compiled_graphs)
    assert compiled >= 1
    with isolated(model, grad=True):
        cam = sal.grad_cam(model, x, torch.tensor([0, 1]), model._orig_mod.conv2)
        guided = sal.guided_backprop(model, x, torch.tensor([0, 1]))
    assert cam.shape == (2, 16, 16) and torch.isfinite(guided).all()
    assert len(compiled_graphs) == compiled  # nothing recompiled for our passes
    model(x)
    assert len(compiled_graphs) == compiled  # and the user's next call still uses the compiled code
