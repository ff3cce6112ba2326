"""The promises every callback keeps: training is unchanged, nothing is left behind, failures never stop training."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN, loaders, make_module, trainer_kwargs

import lightning_viz
from lightning_viz._hooks import hook_count


def _train(pl_ns, tmp_path, callbacks, seed=7, **kw):
    pl_ns.seed_everything(seed)
    train, val = loaders(n=96, shuffle_seed=seed)
    module = make_module(pl_ns, TinyCNN())
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, max_epochs=3, **kw))
    trainer.fit(module, train, val)
    return module, trainer


def test_default_suite_leaves_training_bit_identical(tmp_path, pl_ns):
    plain, plain_trainer = _train(pl_ns, tmp_path / "plain", [])
    watched, watched_trainer = _train(pl_ns, tmp_path / "watched", lightning_viz.default_suite())
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights and BatchNorm buffers
        assert torch.equal(a[key], b[key]), key
    opt_a = plain_trainer.optimizers[0].state_dict()["state"]
    opt_b = watched_trainer.optimizers[0].state_dict()["state"]
    for idx in opt_a:
        assert torch.equal(opt_a[idx]["momentum_buffer"], opt_b[idx]["momentum_buffer"])
    # and the global RNG stream continues exactly as without the callbacks
    _train(pl_ns, tmp_path / "p2", [])
    after_plain = torch.rand(4)
    _train(pl_ns, tmp_path / "w2", lightning_viz.default_suite())
    assert torch.equal(torch.rand(4), after_plain)


def test_no_hooks_or_mode_changes_after_fit(tmp_path, pl_ns):
    module = make_module(pl_ns, TinyCNN())
    module.model.bn1.eval()
    modes = [m.training for m in module.modules()]
    hooks = hook_count(module)
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=lightning_viz.default_suite(),
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module, train, val)
    assert hook_count(module) == hooks
    assert [m.training for m in module.modules()] == modes
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_default_suite_options():
    suite = lightning_viz.default_suite(every_n_epochs=3, filters={"max_filters": 8}, seed=5)
    assert [type(cb).__name__ for cb in suite] == [
        "FilterMonitor",
        "ActivationMonitor",
        "SaliencyMonitor",
        "EmbeddingMonitor",
        "ExemplarMonitor",
        "FeatureVisMonitor",
        "DiagnosisMonitor",
    ]
    assert all(cb.every_n_epochs == 3 and cb.seed == 5 for cb in suite)
    assert suite[0].max_filters == 8
    assert [type(cb).__name__ for cb in lightning_viz.default_suite(filters=False)] == [
        "ActivationMonitor",
        "SaliencyMonitor",
        "EmbeddingMonitor",
        "ExemplarMonitor",
        "FeatureVisMonitor",
        "DiagnosisMonitor",
    ]
    assert [cb.every_n_epochs for cb in lightning_viz.default_suite()] == [1, 1, 2, 2, 5, 5, 1]
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['filter'\]"):
        lightning_viz.default_suite(filter={})
    with pytest.raises(TypeError, match=r"`filters` must be a dict of FilterMonitor options or False"):
        lightning_viz.default_suite(filters=3)
