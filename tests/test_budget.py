"""The suite's budget: a measured, deterministic schedule within a share of training, and the last word at the end."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs

import lightning_viz
from lightning_viz import VizCallback
from lightning_viz._budget import Budget
from lightning_viz.functional import saliency as sal

STEPS_PER_EPOCH = 4  # 64 samples, batches of 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleepy(VizCallback):
    """A monitor whose call costs `seconds * work / 8` on the fake clock; `work` is a budget knob (8 down to 2)."""

    budget_knobs = {"work": 2}

    def __init__(self, name: str, seconds: float, clock: FakeClock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.monitor_name, self.seconds, self.clock, self.work = name, seconds, clock, 8
        self.calls: list[tuple[int, int]] = []

    def _state_key_fields(self):
        return {"name": self.monitor_name}

    def _log(self, trainer, pl_module, step, epochs_done):
        self.calls.append((step, self.work))
        self.clock.now += self.seconds * self.work / 8
        self._sink.scalars({f"test/{self.monitor_name}": float(self.work)}, step)


class Cheap(Sleepy):
    budget_knobs = {}


def _tick(pl_ns, clock: FakeClock, seconds: float = 1.0):
    class Tick(pl_ns.Callback):  # one training step costs `seconds` on the fake clock
        def on_train_batch_end(self, *args, **kwargs):
            clock.now += seconds

    return Tick()


def _fit(pl_ns, tmp_path, callbacks, *, ckpt_path=None, **overrides):
    train, val = loaders()
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(make_module(pl_ns), train, val, ckpt_path=ckpt_path)
    return trainer


def _suite(clock, share=0.125, **kwargs):
    # costs and steps are binary fractions: the fake clock's sums are exact, so runs compare exactly
    budget = Budget(share, clock=clock)
    cheap = Cheap("cheap", 0.0625, clock, budget=budget)
    costly = Sleepy("costly", 1.5, clock, budget=budget, **kwargs)
    return budget, cheap, costly


def _steps(monitor):
    return [step for step, _ in monitor.calls]


def test_schedule_is_deterministic_within_budget_and_ends_with_the_trained_network(tmp_path, pl_ns):
    runs = []
    for i in range(2):
        clock = FakeClock()
        budget, cheap, costly = _suite(clock)
        _fit(pl_ns, tmp_path / str(i), [_tick(pl_ns, clock), cheap, costly], max_epochs=6)
        runs.append((cheap.calls, costly.calls))
        final = 6 * STEPS_PER_EPOCH
        # the budget is a ceiling: 24 s of training, 12.5 % of it
        assert budget.train_seconds == 24.0
        assert budget.spent_total <= 0.125 * budget.train_seconds
        # the cheap monitor has its baseline and logs often; the expensive one makes its step-0 view after the
        # first epoch (from the initial weights), logs rarely and scaled down; both show the trained network at the end
        assert _steps(cheap)[0] == 0 and len(cheap.calls) >= 5
        assert _steps(costly)[0] == 0 and 2 <= len(costly.calls) <= len(cheap.calls)
        assert _steps(cheap)[-1] == _steps(costly)[-1] == final
        assert all(work < 8 for _, work in costly.calls)
        for monitor in (cheap, costly):
            logged = [s for s, _ in Events(str(tmp_path / str(i) / "run")).scalars(f"test/{monitor.monitor_name}")]
            assert logged == sorted(set(logged)) == _steps(monitor)
    assert runs[0] == runs[1]


def test_explicit_every_n_epochs_is_honoured_exactly(tmp_path, pl_ns):
    clock = FakeClock()
    _, cheap, costly = _suite(clock, every_n_epochs=2)
    _fit(pl_ns, tmp_path, [_tick(pl_ns, clock), cheap, costly], max_epochs=5)
    assert _steps(costly) == [0, 8, 16]  # baseline, epochs 2 and 4; no budget schedule, no extra last word
    assert all(work == 8 for _, work in costly.calls)


@pytest.mark.parametrize("ending", ["early_stop", "max_steps"])
def test_last_word_once_at_the_final_step(tmp_path, pl_ns, ending):
    clock = FakeClock()
    _, cheap, costly = _suite(clock)
    callbacks = [_tick(pl_ns, clock), cheap, costly]
    if ending == "early_stop":
        callbacks.append(pl_ns.callbacks.EarlyStopping("val_loss", patience=0, divergence_threshold=-1.0))
        final = 1 * STEPS_PER_EPOCH  # the first check stops the fit
        trainer = _fit(pl_ns, tmp_path, callbacks, max_epochs=6)
    else:
        final = 10  # in the middle of the third epoch
        trainer = _fit(pl_ns, tmp_path, callbacks, max_epochs=-1, max_steps=final)
    assert trainer.global_step == final
    for monitor in (cheap, costly):
        assert _steps(monitor)[-1] == final
        assert len(_steps(monitor)) == len(set(_steps(monitor)))


def test_resumed_run_continues_the_same_schedule(tmp_path, pl_ns):
    clock = FakeClock()
    _, cheap, costly = _suite(clock)
    _fit(pl_ns, tmp_path / "whole", [_tick(pl_ns, clock), cheap, costly], max_epochs=8)
    whole = (cheap.calls, costly.calls)

    ckpt = str(tmp_path / "half.ckpt")

    class StopAfterThree(pl_ns.Callback):  # a crash after epoch 3's checkpoint
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                trainer.save_checkpoint(ckpt)
                trainer.should_stop = True

    clock = FakeClock()
    _, cheap, costly = _suite(clock)
    _fit(pl_ns, tmp_path / "first", [_tick(pl_ns, clock), cheap, costly, StopAfterThree()], max_epochs=8)
    assert [c for c in cheap.calls if c[0] <= 12] == [c for c in whole[0] if c[0] <= 12]

    clock = FakeClock()
    _, cheap, costly = _suite(clock)
    _fit(pl_ns, tmp_path / "second", [_tick(pl_ns, clock), cheap, costly], max_epochs=8, ckpt_path=ckpt)
    assert cheap.calls == [c for c in whole[0] if c[0] > 12]
    assert costly.calls == [c for c in whole[1] if c[0] > 12]


@pytest.fixture
def one_thread():
    """Real timings on a shared CPU: one torch thread (several spin against other processes' load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_suite_has_a_budget_and_every_monitor_shows_the_trained_network(tmp_path, pl_ns, one_thread):
    suite = lightning_viz.default_suite(budget=0.5, featurevis={"steps": 4}, embedding={"reducer": "pca"})
    budgeted = [cb for cb in suite if cb.monitor_name != "diagnosis"]  # the verdict is written every epoch
    assert all(cb._budget is suite[0]._budget is not None for cb in budgeted)
    assert suite[-1].monitor_name == "diagnosis" and suite[-1]._budget is None
    assert not any(cb._budget_managed for cb in lightning_viz.default_suite(every_n_epochs=1))
    with pytest.raises(ValueError, match="`budget`"):
        lightning_viz.default_suite(budget=0.0)

    class Slow(pl_ns.Callback):  # training steps of a real model's length: 6 epochs of 0.5 s
        def on_train_batch_end(self, *args, **kwargs):
            time.sleep(0.125)

    _fit(pl_ns, tmp_path, [Slow(), *suite], max_epochs=6)
    events = Events(str(tmp_path / "run"))
    final = 6 * STEPS_PER_EPOCH
    for cb in suite:
        if cb.monitor_name == "diagnosis":
            continue  # text, no images
        tags = [t for t in events.tags["images"] if t.split("/")[0] in (cb.monitor_name, "activation", "exemplar")]
        if cb.monitor_name == "attention":  # a CNN has no attention: the monitor steps aside and writes nothing
            assert not tags
            continue
        assert tags, cb.monitor_name
        missing = [t for t in tags if final not in events.image_steps(t)]
        assert not missing, (cb.monitor_name, missing)
    spent = suite[0]._budget.spent_total
    assert spent > 0


def test_cached_inference_copy_equals_a_fresh_one_after_the_weights_change():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    cache = sal.InferenceCopy()
    x = torch.randn(3, 3, 16, 16)
    first = cache(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.bn1.running_mean.add_(0.3)
    again = cache(model)
    assert again is first  # refreshed, not rebuilt
    fresh = sal.inference_copy(copy.deepcopy(model))
    target = torch.tensor([0, 1, 2])
    assert torch.equal(again(x), fresh(x))
    assert torch.equal(sal.gradient(again, x, target), sal.gradient(fresh, x, target))
    model.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)  # another structure: rebuilt
    assert cache(model.eval()) is not first


def test_cheap_monitors_keep_their_cadence_when_expensive_ones_spent_the_budget():
    """The filters and activation statistics of every epoch are not starved by an expensive monitor's overrun."""
    from lightning_viz._budget import Budget

    now = [0.0]
    budget = Budget(0.05, clock=lambda: now[0])
    budget.join("filters", 1, {})
    budget.join("featurevis", 1, {"steps": (64, 16)})
    for epoch in range(4):
        budget.epoch_start(epoch)
        now[0] += 10.0  # a 10 s training epoch
        budget.epoch_end(epoch)
        plan = budget.plan(epoch)
        if "filters" in plan:
            budget.charge("filters", 0.04, epoch=epoch + 1)  # 0.4 % of an epoch: cheap
        if "featurevis" in plan:
            budget.charge("featurevis", 8.0, scale=plan["featurevis"], epoch=epoch + 1)  # far over budget
    assert all("filters" in budget.plans[e] for e in range(4))
    assert sum("featurevis" in budget.plans[e] for e in range(4)) <= 2
    # a monitor without knobs that is *not* cheap is budgeted like the others
    assert budget.estimate("filters", 1.0) == 0.04


class Declared(Sleepy):
    """An expensive monitor that declares its work: 4 sample passes per unit of `work` (8 at full scale)."""

    def _budget_units(self):
        return 4.0 * self.work


def test_cost_is_estimated_before_the_first_call_and_the_last_word_fits(tmp_path, pl_ns):
    # 1 s per training step of 16 samples; a call costs 1.5 s * work / 8: at full scale 1.5 s, 0.375 s at the smallest
    clock = FakeClock()
    budget = Budget(0.1, clock=clock)
    costly = Declared("costly", 1.5, clock, budget=budget, log_baseline=False)
    _fit(pl_ns, tmp_path, [_tick(pl_ns, clock), costly], max_epochs=3)
    # 12 s of training, 1.2 s of budget: known before it ever ran, the one call (the last epoch's) is scaled to fit
    assert budget.spent_total <= 0.1 * budget.train_seconds
    assert [step for step, _ in costly.calls][-1] == 3 * STEPS_PER_EPOCH
    assert all(work < 8 for _, work in costly.calls)


def test_what_cannot_fit_is_left_out_and_said_once(tmp_path, pl_ns, capsys):
    clock = FakeClock()
    budget = Budget(0.01, clock=clock)  # 0.04 s per epoch: not even the smallest call (0.375 s) fits
    monitors = [Declared(name, 1.5, clock, budget=budget) for name in ("first", "second")]
    _fit(pl_ns, tmp_path, [_tick(pl_ns, clock), *monitors], max_epochs=2, enable_progress_bar=True)
    assert all(not m.calls for m in monitors)
    said = [line for line in capsys.readouterr().out.splitlines() if "left out" in line]
    assert len(said) == 1 and "first" in said[0] and "second" in said[0] and "Raise `budget`" in said[0]


def test_long_work_says_what_it_is_doing_in_one_line(tmp_path, pl_ns, capsys):
    clock = FakeClock()
    budget = Budget(1.0, clock=clock)
    monitors = [Declared(name, 16.0, clock, budget=budget) for name in ("first", "second")]  # 4 s at the smallest
    _fit(pl_ns, tmp_path, [_tick(pl_ns, clock, 4.0), *monitors], max_epochs=2, enable_progress_bar=True)
    out = capsys.readouterr().out
    untrained = [line for line in out.splitlines() if "drawing the untrained network's views" in line]
    assert len(untrained) == 1 and "lightning_viz: " in untrained[0]
    assert monitors[0].calls[0][0] == 0  # a step-0 view (0.25 of the run's allowance may go to them)
    # no progress bar: nothing printed
    _fit(pl_ns, tmp_path / "quiet", [_tick(pl_ns, FakeClock(), 4.0), Declared("q", 16.0, FakeClock(), budget=0.5)])
    assert "lightning_viz: drawing" not in capsys.readouterr().out


def test_a_suite_without_an_image_logger_warns_once_and_skips_image_only_work(tmp_path, pl_ns):
    suite = lightning_viz.default_suite(featurevis={"steps": 2}, embedding={"reducer": "pca"})
    train, val = loaders()
    logger = pl_ns.loggers.CSVLogger(str(tmp_path))
    trainer = pl_ns.Trainer(callbacks=suite, logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning) as caught:
        trainer.fit(make_module(pl_ns), train, val)
    said = [str(w.message) for w in caught if "TensorBoardLogger" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("lightning_viz: ")
    skipped = {cb.monitor_name for cb in suite if not cb._seconds}
    assert {"saliency", "exemplars", "featurevis"} <= skipped
    assert "filters" not in skipped  # its scale scalars and statistics still go to the CSV logger


def test_what_the_final_diagnosis_judges_is_measured_at_the_end_whatever_the_budget(tmp_path, pl_ns):
    """A budget too small for anything else still lets the dead-unit and dynamics monitors measure the trained network:
    the final verdict is never drawn from an older epoch's numbers. What the ceiling cannot afford they measure without
    drawing (scalars and records, no images or histograms); what it can, they draw."""
    from lightning_viz.records import ActivationStats, GradientStats, bus_for

    final = 3 * STEPS_PER_EPOCH
    for share, drawn in ((0.001, False), (0.5, True)):
        if drawn:  # on a fake clock (1 s a training step) the monitors' own seconds cost nothing: all is affordable
            clock = FakeClock()
            budget = Budget(share, clock=clock)
            suite = [_tick(pl_ns, clock), lightning_viz.ActivationMonitor(budget=budget)]
            suite.append(lightning_viz.DynamicsMonitor(budget=budget))
        else:
            suite = lightning_viz.default_suite(budget=share, featurevis=False, exemplars=False, embedding=False)
        trainer = _fit(pl_ns, tmp_path / str(share), suite, max_epochs=3)
        bus = bus_for(trainer)
        assert {stats.epoch for stats in bus.latest(ActivationStats).values()} == {3}
        assert {stats.epoch for stats in bus.latest(GradientStats).values()} == {3}
        events = Events(str(tmp_path / str(share) / "run"))
        dead_counts = [tag for tag in events.tags["scalars"] if tag.startswith("activations/dead_count/")]
        assert dead_counts and all(final in [s for s, _ in events.scalars(tag)] for tag in dead_counts)
        history = "activations/dead_channels_by_layer"
        assert (history in events.tags["images"] and final in events.image_steps(history)) == drawn
        histograms = [tag for tag in events.tags["histograms"] if tag.startswith("activations/")]
        assert any(final in [e.step for e in events.acc.Histograms(tag)] for tag in histograms) == drawn
        if not drawn:
            saliency = next(cb for cb in suite if cb.monitor_name == "saliency")
            assert any("saliency" in what for what in saliency._budget.dropped)  # the rest was left out, and said


def test_a_long_run_keeps_to_the_pace_not_the_ceiling():
    """The budget is a ceiling, not a target: on long epochs an expensive monitor keeps to a fifth of it (1 %)."""
    now = [0.0]
    budget = Budget(0.05, clock=lambda: now[0])
    budget.join("featurevis", 1, {"steps": (64, 8)})
    budget.charge("featurevis", 3.0, scale=1.0, epoch=0)  # 3 s at full scale: 3 % of a 100 s epoch
    budget.spent.clear()
    for epoch in range(20):
        budget.epoch_start(epoch)
        now[0] += 100.0
        budget.epoch_end(epoch)
        for name, scale in budget.plan(epoch).items():
            budget.charge(name, budget.estimate(name, scale), scale=scale, epoch=epoch + 1)
    # within the ceiling it could have run every epoch at full scale (3 %); it kept to about 1 % instead
    assert budget.spent_total <= 0.01 * budget.train_seconds + 3.0
    scales = [plan["featurevis"] for plan in budget.plans.values() if plan]
    assert scales and sum(scales) < 0.5 * len(scales)  # mostly scaled down, not at full scale every epoch


def test_a_full_garbage_collection_is_not_charged_to_the_call_it_falls_in(tmp_path, pl_ns):
    # A full collection walks the whole process's objects (most of them the training's) and can take 0.3 s: caught in
    # a monitor's call or the timed pass, it was charged to them, and on a short run the budget then left out the
    # trained network's pictures. Here every allocation triggers a collection that costs 1 s on the fake clock.
    import gc

    clock = FakeClock()
    collections = {"inside": 0, "outside": 0}
    inside = [False]

    def slow_collection(phase, info):
        if phase == "start":
            clock.now += 1.0
            collections["inside" if inside[0] else "outside"] += 1

    class Allocating(Cheap):
        def _log(self, trainer, pl_module, step, epochs_done):
            inside[0] = True
            garbage = [[i] for i in range(1000)]  # allocations past any threshold
            garbage.append(garbage)  # and a cycle
            inside[0] = False
            super()._log(trainer, pl_module, step, epochs_done)

    budget = Budget(0.5, clock=clock)
    monitor = Allocating("alloc", 0.0625, clock, budget=budget)
    thresholds = gc.get_threshold()
    gc.callbacks.append(slow_collection)
    gc.set_threshold(1, 1, 1)
    try:
        budget.calibrate(TinyCNN(), torch.randn(4, 3, 16, 16))
        _fit(pl_ns, tmp_path, [_tick(pl_ns, clock), monitor], max_epochs=2)
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(slow_collection)
    assert gc.isenabled()
    assert budget.spent["calibration"] == 0.0 and budget.pass_seconds == 0.0
    assert len(monitor.calls) >= 2 and budget.spent[monitor._budget_key] == 0.0625 * len(monitor.calls)
    assert collections["inside"] == 0 and collections["outside"] > 0  # they ran, in the training's time


def test_what_was_left_out_is_said_in_one_short_phrase_per_network():
    budget = Budget(0.05)
    for what in ("saliency", "embedding", "exemplars"):
        budget.drop(f"the untrained network's {what}")
    budget.drop("the embedding's UMAP map (PCA instead)")
    budget.drop("the trained network's feature visualisation")
    budget.drop("the untrained network's saliency")  # said once
    assert budget.dropped_text() == (
        "the untrained network's saliency, embedding and exemplars; the embedding's UMAP map (PCA instead); "
        "the trained network's feature visualisation"
    )


def test_what_the_monitors_hooks_spend_on_every_batch_is_counted_once_as_the_suites(tmp_path, pl_ns):
    # Per-batch bookkeeping (samples kept, losses read, gradients sampled) is the suite's cost, not training time: it
    # is counted once (a hook calling its parent through super() is timed once), and a call charged inside a hook is
    # not counted again.
    clock = FakeClock()

    batches = {"train": 0, "val": 0}

    class Busy(Cheap):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.now += 0.03125  # this subclass's bookkeeping ...
            batches["train"] += 1
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        def on_validation_batch_end(self, *args, **kwargs):
            clock.now += 0.015625
            batches["val"] += 1
            super().on_validation_batch_end(*args, **kwargs)

    budget = Budget(0.5, clock=clock)
    monitor = Busy("busy", 0.0625, clock, budget=budget, log_baseline=False)
    _fit(pl_ns, tmp_path, [_tick(pl_ns, clock), monitor], max_epochs=2)
    train_batches, val_batches = batches["train"], batches["val"]
    assert train_batches == 2 * STEPS_PER_EPOCH and val_batches >= 2
    assert budget.spent["hooks"] == 0.03125 * train_batches + 0.015625 * val_batches
    assert budget.hook_seconds["Busy.on_train_batch_end"] == 0.03125 * train_batches
    assert budget.spent[monitor._budget_key] == 0.0625 * len(monitor.calls)  # its calls, charged once
    assert budget.train_seconds == 1.0 * train_batches  # the ticks alone: the hooks' seconds are not training
