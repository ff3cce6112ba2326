"""The typed contract between monitors (records on a per-Trainer bus) and the shared vocabulary of arguments."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import loaders, make_module, trainer_kwargs

import lightning_viz as lv
from lightning_viz import _validate as check
from lightning_viz.records import (
    ActivationStats,
    EmbeddingQuality,
    FilterStats,
    Record,
    RecordBus,
    bus_for,
)


def _stats(step: int, subject: str = "relu", dead: int = 1) -> ActivationStats:
    return ActivationStats(
        step=step, epoch=step // 4, subject=subject, channels=8, sparsity=0.5, mean=0.1, dead_count=dead,
        dead_fraction=dead / 8, dead_channels=tuple(range(dead)),
    )  # fmt: skip


def test_records_are_frozen_and_typed():
    record = _stats(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.sparsity = 1.0  # type: ignore[misc]
    assert isinstance(record, Record) and record.dead_channels == (0,)
    with pytest.raises(TypeError, match="Record instances"):
        RecordBus().publish({"sparsity": 0.5})  # type: ignore[arg-type]


def test_bus_keeps_latest_per_subject_history_and_subscribers():
    bus = RecordBus(history_length=3)
    seen: list[ActivationStats] = []
    unsubscribe = bus.subscribe(ActivationStats, seen.append)
    for step in (0, 4, 8, 12):
        bus.publish(_stats(step, dead=step // 4))
    bus.publish(_stats(4, subject="other"))
    bus.publish(_stats(12, dead=5))  # the same step again replaces, never duplicates
    assert [r.step for r in bus.history(ActivationStats, "relu")] == [4, 8, 12]
    assert bus.latest(ActivationStats)["relu"].dead_count == 5
    assert set(bus.latest(ActivationStats)) == {"relu", "other"}
    assert bus.latest(FilterStats) == {} and bus.history(EmbeddingQuality) == []
    assert len(seen) == 6
    unsubscribe()
    bus.publish(_stats(16))
    assert len(seen) == 6
    bus.clear()
    assert bus.latest(ActivationStats) == {}


def test_monitors_publish_records_a_users_callback_can_read(tmp_path, pl_ns):
    """The diagnosis is one reader; a user's own callback reads the same records without importing a monitor."""

    class Reader(pl_ns.Callback):
        def __init__(self) -> None:
            self.dead: list[int | None] = []
            self.filters: list[float | None] = []

        def on_train_epoch_end(self, trainer, pl_module):
            bus = bus_for(trainer)
            self.dead.extend(s.dead_count for s in bus.latest(ActivationStats).values())
            self.filters.extend(s.distance_from_init for s in bus.latest(FilterStats).values())

    reader = Reader()
    train, val = loaders()
    trainer = pl_ns.Trainer(
        callbacks=[lv.FilterMonitor(), lv.ActivationMonitor(), reader],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(make_module(pl_ns), train, val)
    bus = bus_for(trainer)
    assert bus.produced(ActivationStats) and bus.produced(FilterStats) and not bus.produced(EmbeddingQuality)
    assert [r.step for r in bus.history(FilterStats, "model.conv1")] == [0, 4, 8]
    assert [r.epoch for r in bus.history(FilterStats, "model.conv1")] == [0, 1, 2]
    assert bus.history(FilterStats, "model.conv1")[0].distance_from_init == 0.0
    assert all(d is not None for d in reader.dead) and len(reader.filters) == 2
    assert bus_for(pl_ns.Trainer(**trainer_kwargs(tmp_path))) is not bus  # one bus per Trainer


def test_no_monitor_imports_another():
    import ast
    import pathlib

    folder = pathlib.Path(lv.__file__).parent / "callbacks"
    monitors = {p.stem for p in folder.glob("*_monitor.py")}
    for path in folder.glob("*_monitor.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.rsplit(".", 1)[-1] not in monitors - {path.stem}, (path.name, node.module)


@pytest.mark.parametrize(
    "cls, old, new, value",
    [
        (lv.FilterMonitor, "max_channels", "max_input_channels", 4),
        (lv.ActivationMonitor, "history_length", "filmstrip_length", 5),
        (lv.ExemplarMonitor, "k", "top_k", 3),
        (lv.ExemplarMonitor, "projection", "projection_rule", "deconvnet"),
        (lv.EmbeddingMonitor, "projection", "reducer", "pca"),
        (lv.EmbeddingMonitor, "neighbours", "num_neighbours", 3),
        (lv.EmbeddingMonitor, "knn_k", "knn_neighbours", 7),
        (lv.FeatureVisMonitor, "param", "parameterization", "pixel"),
        (lv.FeatureVisMonitor, "size", "image_size", 40),
        (lv.FeatureVisMonitor, "seeds", "images_per_channel", 2),
    ],
)
def test_old_argument_names_still_work_and_warn(cls, old, new, value):
    with pytest.warns(FutureWarning, match=rf"`{old}` was renamed to `{new}`"):
        monitor = cls(**{old: value})
    assert getattr(monitor, new) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(cls(**{new: value}), new) == value


@pytest.mark.parametrize(
    "make",
    [
        lambda v: lv.FilterMonitor(max_filters=v),
        lambda v: lv.ActivationMonitor(max_batches=v),
        lambda v: lv.SaliencyMonitor(max_probes=v),
        lambda v: lv.EmbeddingMonitor(num_neighbours=v),
        lambda v: lv.ExemplarMonitor(top_k=v),
        lambda v: lv.FeatureVisMonitor(steps=v),
        lambda v: lv.DiagnosisMonitor(overfit_patience=v),
    ],
)
def test_the_same_bad_value_fails_the_same_way_everywhere(make):
    with pytest.raises(TypeError, match="must be a positive int, got '3'"):
        make("3")
    with pytest.raises(TypeError, match="must be a positive int, got 2.0"):
        make(2.0)
    with pytest.raises(ValueError, match=r"must be a positive int \(>= 1\), got 0"):
        make(0)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: lv.FilterMonitor(layers=v), "layers"),
        (lambda v: lv.ActivationMonitor(map_layers=v), "map_layers"),
        (lambda v: lv.ExemplarMonitor(layers=v), "layers"),
        (lambda v: lv.FeatureVisMonitor(layers=v), "layers"),
    ],
)
def test_layer_lists_are_checked_alike(make, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a list of layer names"):
        make("conv1")
    with pytest.raises(ValueError, match=rf"`{name}` must name at least one layer"):
        make([])


@pytest.mark.parametrize("cls", [lv.FilterMonitor, lv.SaliencyMonitor, lv.EmbeddingMonitor, lv.ExemplarMonitor])
def test_max_image_side_caps_every_monitor(cls):
    assert cls(max_image_side=256).max_image_side == 256
    with pytest.raises(ValueError, match="`max_image_side` must be a positive int"):
        cls(max_image_side=0)


def test_validators_name_the_argument_and_the_value():
    with pytest.raises(TypeError, match=r"`mode` must be one of \['a', 'b'\], got 3"):
        check.choice("mode", 3, ("a", "b"))
    with pytest.raises(ValueError, match=r"`mode` must be one of \['a', 'b'\], got 'c'"):
        check.choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"`share` must be in \(0.0, 1.0\], got nan"):
        check.fraction("share", float("nan"))
    assert check.choices("methods", ["b", "a"], ("a", "b", "c")) == ["a", "b"]


def test_state_key_does_not_depend_on_the_cadence(tmp_path, pl_ns):
    """A resumed run with another `every_n_epochs` still finds the saved state (the filmstrip goes on)."""
    assert lv.FilterMonitor(every_n_epochs=1).state_key == lv.FilterMonitor(every_n_epochs=3).state_key
    assert lv.SaliencyMonitor(every_n_epochs=1).state_key == lv.SaliencyMonitor(every_n_epochs=4).state_key
    train, val = loaders()
    first = lv.FilterMonitor(every_n_epochs=1)
    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    kwargs = {**trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = pl_ns.Trainer(
        callbacks=[first, ckpt], logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="a"), **kwargs
    )
    trainer.fit(make_module(pl_ns), train, val)
    resumed = lv.FilterMonitor(every_n_epochs=2)
    kwargs["max_epochs"] = 4
    trainer = pl_ns.Trainer(
        callbacks=[resumed], logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="b"), **kwargs
    )
    trainer.fit(make_module(pl_ns), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    labels = [label for label, _ in resumed._filmstrips["model.conv1"].frames]
    assert labels == ["init", "ep 0", "ep 1", "ep 3"]  # Lightning's epochs; init: the untrained baseline
    assert torch.equal(resumed._initial["model.conv1"], first._initial["model.conv1"])


def test_monitors_do_nothing_outside_fit(tmp_path, pl_ns):
    train, val = loaders()
    monitor = lv.FilterMonitor()
    trainer = pl_ns.Trainer(
        callbacks=[monitor],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run"),
        **trainer_kwargs(tmp_path),
    )
    trainer.validate(make_module(pl_ns), val)
    assert monitor._sink is None and not monitor._active
