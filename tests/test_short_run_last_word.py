"""Short runs under the default budget: every monitor logs the trained network at the end, and the budget's estimate
of a monitor's smallest call (made before it ever ran) is close to what the call then costs."""

from __future__ import annotations

import time

import torch
from conftest import Events, loaders, make_module, trainer_kwargs

import lightning_viz

EPOCHS, STEPS_PER_EPOCH = 5, 4  # 64 samples, batches of 16
EXPENSIVE = ("embedding", "exemplars", "featurevis", "saliency")


def _short_fit(pl_ns, tmp_path, suite, step_seconds: float):
    class Slow(pl_ns.Callback):  # training steps of a real model's length, without the CPU they would take
        def on_train_batch_end(self, *args, **kwargs):
            time.sleep(step_seconds)

    train, val = loaders()
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[Slow(), *suite], logger=logger, **trainer_kwargs(tmp_path, max_epochs=EPOCHS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timings on a shared CPU
    try:
        trainer.fit(make_module(pl_ns), train, val)
    finally:
        torch.set_num_threads(threads)
    return Events(str(tmp_path / "run"))


def test_every_monitor_logs_the_trained_network_at_the_end_of_a_short_run(tmp_path, pl_ns):
    # 5 epochs of 4 steps of 0.5 s: 10 s of training, so the default 5 % is 0.5 s for the whole suite
    suite = lightning_viz.default_suite()
    estimates: dict[str, float | None] = {}
    for cb in suite:
        if cb.monitor_name in EXPENSIVE:
            _record_first_estimate(cb, estimates)
    events = _short_fit(pl_ns, tmp_path, suite, step_seconds=0.5)
    budget = suite[0]._budget
    assert not [what for what in budget.dropped if what.startswith("the trained network's")], budget.dropped
    final = EPOCHS * STEPS_PER_EPOCH
    for cb in suite:
        if cb.monitor_name in ("diagnosis", "attention"):  # text only; a CNN has no attention
            continue
        tags = [t for t in events.tags["images"] if t.split("/")[0] == cb.monitor_name]
        assert tags, cb.monitor_name
        missing = [t for t in tags if final not in events.image_steps(t)]
        assert not missing, (cb.monitor_name, missing)
    assert {"embedding/neighbours", "embedding/map", "saliency/grid"} <= set(events.tags["images"])
    assert budget.spent_total <= 0.05 * budget.train_seconds * 1.5  # (a first call costs what it costs)
    # the estimate before a monitor's first call (its smallest) is within a factor 3 of what that call cost
    for cb in suite:
        if cb.monitor_name in EXPENSIVE:
            estimate, measured = estimates[cb.monitor_name], cb._seconds[0]
            assert estimate is not None and measured / 3 <= estimate <= 3 * measured, (
                cb.monitor_name,
                estimate,
                measured,
            )


def _record_first_estimate(cb, estimates: dict[str, float | None]) -> None:
    """Keep the budget's estimate of ``cb``'s call at its smallest scale, as it stood just before its first call."""
    original = cb._log

    def log(*args, **kwargs):
        if cb.monitor_name not in estimates:
            estimates[cb.monitor_name] = cb._budget.estimate(cb._budget_key, 0.0)
        return original(*args, **kwargs)

    cb._log = log


def test_the_cheap_parts_match_what_they_replace():
    import numpy as np
    from conftest import TinyCNN

    from lightning_viz.functional import embedding as E
    from lightning_viz.functional import exemplars as X

    # the probes' codes are found among the subset's rows (no forward pass); a probe not among them is None
    images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert E.matching_rows(images, torch.cat([images[[5, 31]], images[:1] + 1])) == [5, 31, None]
    # the in-process PCA map is the child's, up to each axis' sign
    codes = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    ours, child = E.pca_map(codes), E.pca_2d(codes.double().numpy())
    assert np.allclose(np.abs(ours), np.abs(child), atol=1e-4)
    # receptive fields without a model copy: the model keeps its mode, its hooks and its weights
    model = TinyCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    boxes = X.receptive_field_boxes(model, model.conv2, (3, 16, 16), torch.tensor([[4, 4], [0, 0]]))
    assert boxes.tolist() == [[5, 5, 13, 13], [0, 0, 5, 5]]  # 3x3 conv, 2x2 max pool, 3x3 conv (clipped)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
