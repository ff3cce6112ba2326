"""One fit, one history: sweeps with the same monitors, resumes, interruptions (DESIGN rule 13)."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs

import lightning_viz
from lightning_viz.functional import filters as F

FAST = dict(
    featurevis={"steps": 2, "max_channels": 2},
    embedding={"reducer": "pca"},
    saliency={"methods": ["gradient"]},
    exemplars={"max_channels": 2, "top_k": 2, "max_samples": 32},
)


def _fit(pl_ns, tmp_path, callbacks, module, name, epochs=2, ckpt_path=None, **overrides):
    train, val = loaders(n=48)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name=name, version=0)
    trainer = pl_ns.Trainer(
        callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **{"max_epochs": epochs, **overrides})
    )
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, Events(str(tmp_path / name / "version_0"))


def _of(suite, kind):
    return next(cb for cb in suite if isinstance(cb, kind))


def _distance(final: torch.Tensor, initial: torch.Tensor) -> float:
    return F.finite_means(F.filter_statistics(final, initial))["distance_from_init"]


def test_a_sweep_with_the_same_instances_starts_each_fit_clean(tmp_path, pl_ns):
    # fixed cadences: a budget may leave the trained filters of a run this short out (tests/test_budget.py)
    suite = lightning_viz.default_suite(budget=None, **FAST)
    torch.manual_seed(1)
    first = make_module(pl_ns, TinyCNN())
    _fit(pl_ns, tmp_path, suite, first, "run1", epochs=2)
    torch.manual_seed(2)
    second = make_module(pl_ns, TinyCNN())
    w0 = second.model.conv1.weight.detach().clone()
    trainer, events = _fit(pl_ns, tmp_path, suite, second, "run2", epochs=2)

    # run 2 logs from its own step 0, not only once its steps pass run 1's last one
    assert events.image_steps("filters/model.conv1")[0] == 0
    assert [s for s, _ in events.scalars("filters/weight_norm/model.conv1")][0] == 0
    # distance_from_init is measured from run 2's own initial weights
    logged = events.scalars("filters/distance_from_init/model.conv1")
    final = second.model.conv1.weight.detach()
    assert logged[-1][0] == trainer.global_step
    assert logged[-1][1] == pytest.approx(_distance(final, w0), rel=1e-4)
    assert logged[-1][1] != pytest.approx(_distance(final, first.model.conv1.weight.detach()), rel=1e-2)
    # the diagnosis holds run 2's epochs only
    diagnosis = _of(suite, lightning_viz.DiagnosisMonitor)
    assert [e for e, _ in diagnosis._history["train_loss"]] == [1, 2]


def _checkpointed_run(pl_ns, tmp_path, callbacks, seed=1):
    torch.manual_seed(seed)
    module = make_module(pl_ns, TinyCNN())
    w0 = module.model.conv1.weight.detach().clone()
    checkpoint = pl_ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(pl_ns, tmp_path, [*callbacks, checkpoint], module, "first", epochs=2, enable_checkpointing=True)
    return w0, str(tmp_path / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("saved_with_state", [True, False])
@pytest.mark.parametrize("every_n_epochs", [1, 2])
def test_a_resumed_run_measures_from_the_true_initial_weights_or_says_it_cannot(
    tmp_path, pl_ns, saved_with_state, every_n_epochs
):
    first = [lightning_viz.FilterMonitor(every_n_epochs=1)] if saved_with_state else []
    w0, ckpt = _checkpointed_run(pl_ns, tmp_path, first)
    torch.manual_seed(99)  # a new model object: its weights at setup are not the run's W0
    module = make_module(pl_ns, TinyCNN())
    resumed_from = torch.load(ckpt, weights_only=False)["state_dict"]["model.conv1.weight"]
    monitor = lightning_viz.FilterMonitor(every_n_epochs=every_n_epochs)
    with (
        pytest.warns(UserWarning, match="initial weights|start of training are unknown")
        if not saved_with_state
        else (_no_warning("start of training are unknown"))
    ):
        _, events = _fit(pl_ns, tmp_path, [monitor], module, "second", epochs=4, ckpt_path=ckpt)
    final = module.model.conv1.weight.detach()
    if saved_with_state:  # the true W0 comes back with the checkpoint
        logged = events.scalars("filters/distance_from_init/model.conv1")
        assert logged[-1] == (12, pytest.approx(_distance(final, w0), rel=1e-4))
        assert "filters/distance_from_resume/model.conv1" not in events.tags["scalars"]
    else:  # unknown: no wrong number, the distance from the resume point under its own tag
        assert "filters/distance_from_init/model.conv1" not in events.tags["scalars"]
        logged = events.scalars("filters/distance_from_resume/model.conv1")
        assert logged[-1] == (12, pytest.approx(_distance(final, resumed_from), rel=1e-4))


class _no_warning:
    def __init__(self, text: str) -> None:
        self.text = text

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.caught if self.text in str(w.message)]


@pytest.mark.parametrize("hook", ["setup", "on_fit_start"])
def test_weights_the_user_loads_before_training_are_the_initial_weights(tmp_path, pl_ns, hook):
    torch.manual_seed(5)
    pretrained = TinyCNN().state_dict()
    torch.manual_seed(6)
    module = make_module(pl_ns, TinyCNN())

    def load(*args, **kwargs):
        module.model.load_state_dict(pretrained)

    setattr(module, hook, load)
    _, events = _fit(pl_ns, tmp_path, [lightning_viz.FilterMonitor(every_n_epochs=1)], module, "run")
    logged = events.scalars("filters/distance_from_init/model.conv1")
    assert logged[0] == (0, 0.0)
    final = module.model.conv1.weight.detach()
    assert logged[-1][1] == pytest.approx(_distance(final, pretrained["conv1.weight"]), rel=1e-4)


# ---- interruption: nothing of ours outlives a failed fit ----


def _child_pids() -> set[int]:
    import glob
    import os

    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def _pipes() -> set[str]:
    import os

    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "where, error, full",
    [
        ("training_step", _Boom, False),
        ("training_step", KeyboardInterrupt, False),
        ("callback on_train_batch_end", _Boom, False),
        ("callback on_validation_batch_end", _Boom, True),  # mid validation: our capture hooks are attached
    ],
)
def test_an_interrupted_fit_leaves_no_process_thread_temp_file_or_hook_of_ours(
    tmp_path, pl_ns, monkeypatch, where, error, full
):
    import signal
    import tempfile
    import threading

    from lightning_viz._hooks import hook_count

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # Lightning ignores SIGINT after a KeyboardInterrupt
    if full:
        suite = lightning_viz.default_suite(**{**FAST, "embedding": {"reducer": "tsne", "every_n_epochs": 1}})
    else:
        suite = [
            lightning_viz.EmbeddingMonitor(every_n_epochs=1, reducer="tsne"),  # PCA runs in process: no child
            lightning_viz.ActivationMonitor(every_n_epochs=1),
        ]
    embedding = _of(suite, lightning_viz.EmbeddingMonitor)
    module = make_module(pl_ns, TinyCNN())
    hooks, threads, children, pipes = hook_count(module), set(threading.enumerate()), _child_pids(), _pipes()
    seen: dict[str, object] = {}

    def boom(trainer) -> None:
        if trainer.global_step >= 4 and trainer.current_epoch >= 1 and not seen:
            seen["child"] = embedding._projections._child.pid if embedding._projections.running else None
            seen["temp"] = sorted(p.name for p in temp.iterdir())
            raise error("stop here")

    if where == "training_step":
        step = module.training_step

        def training_step(batch, batch_idx):
            boom(module.trainer)
            return step(batch, batch_idx)

        module.training_step = training_step
        extra = []
    else:
        hook = where.split()[1]
        extra = [type("Raiser", (pl_ns.Callback,), {hook: lambda self, trainer, *a: boom(trainer)})()]
    expected = SystemExit if error is KeyboardInterrupt else _Boom
    with pytest.raises(expected):
        _fit(pl_ns, tmp_path, [*suite, *extra], module, "run", epochs=3)

    assert seen["child"] is not None and seen["temp"], "the projection child was running when the fit failed"
    assert _child_pids() == children, "a child process of ours outlived the fit"
    assert _pipes() <= pipes, "a pipe to the projection child was left open"
    assert not embedding._projections.running and embedding._projections.workdir is None
    assert list(temp.iterdir()) == []
    ours = [t for t in set(threading.enumerate()) - threads if "lightning_viz" in repr(getattr(t, "_target", ""))]
    assert ours == []
    assert hook_count(module) == hooks


# ---- call sites are numbered within one forward pass ----


class _SharedReLU(torch.nn.Module):
    """One ReLU applied twice per forward (weight sharing, as torchvision's ResNet blocks do); the second sees
    inputs shifted to be mostly negative, so its sparsity differs from the first's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.relu(x - 2.0)
        return self.fc(x.mean(dim=(2, 3)))


def _twice_in_validation(pl_ns, model):
    import torch.nn.functional as tf

    module = make_module(pl_ns, model)

    def validation_step(batch, batch_idx):
        x, y = batch
        module.log("val_loss", tf.cross_entropy(module(x), y))  # one forward for the loss,
        module.log("val_acc", (module(x).argmax(1) == y).float().mean())  # another for the accuracy

    module.validation_step = validation_step
    return module


@pytest.mark.parametrize("twice", [False, True])
def test_a_second_forward_in_validation_step_is_the_same_call_site(tmp_path, pl_ns, twice):
    model = TinyCNN()
    module = _twice_in_validation(pl_ns, model) if twice else make_module(pl_ns, model)
    _, events = _fit(pl_ns, tmp_path, [lightning_viz.ActivationMonitor(every_n_epochs=1)], module, "run", epochs=1)
    sites = {t.split("/", 2)[2] for t in events.tags["scalars"] if t.startswith("activations/sparsity/")}
    assert sites == {"model.relu1", "model.relu2"}


@pytest.mark.parametrize("twice", [False, True])
def test_a_layer_called_twice_within_one_forward_keeps_two_call_sites(tmp_path, pl_ns, twice):
    model = _SharedReLU()
    module = _twice_in_validation(pl_ns, model) if twice else make_module(pl_ns, model)
    _, events = _fit(pl_ns, tmp_path, [lightning_viz.ActivationMonitor(every_n_epochs=1)], module, "run", epochs=1)
    sparsity = {
        t.split("/", 2)[2]: events.scalars(t)[-1][1] for t in events.tags["scalars"] if "activations/sparsity/" in t
    }
    assert set(sparsity) == {"model.relu#1", "model.relu#2"}
    assert sparsity["model.relu#2"] > sparsity["model.relu#1"] + 0.2  # two different activations, not one mixed


# ---- our forward passes never reach the user's self.log ----


def _logging_module(pl_ns, how: str):
    base = type(make_module(pl_ns))

    class Logging(base):
        def forward(self, x):
            out = super().forward(x)
            if how == "forward":
                self.log("logit_mean", out.mean(), on_epoch=True)
            elif how == "log_dict":
                self.log_dict({"logit_mean": out.mean(), "logit_std": out.std()}, on_epoch=True)
            return out

    torch.manual_seed(3)
    module = Logging()
    if how == "submodule hook":  # a hook of the user's on a submodule
        module.model.fc.register_forward_hook(lambda m, i, out: module.log("logit_mean", out.mean(), on_epoch=True))
    return module


@pytest.mark.parametrize("how", ["forward", "log_dict", "submodule hook"])
def test_our_forward_passes_never_reach_metrics_the_user_logs_in_forward(tmp_path, pl_ns, how):
    def run(with_suite: bool):
        module = _logging_module(pl_ns, how)
        stopping = pl_ns.callbacks.EarlyStopping(monitor="logit_mean", mode="max", patience=1, min_delta=1e-3)
        history: list[dict[str, float]] = []
        recorder = type(
            "Recorder",
            (pl_ns.Callback,),
            {
                "on_train_epoch_start": lambda self, t, m: history.append(
                    {k: float(v) for k, v in t.callback_metrics.items()}
                )
            },
        )()
        if not with_suite:
            suite = []
        elif how == "forward":
            suite = lightning_viz.default_suite(every_n_epochs=2, **FAST)
        else:
            suite = [
                lightning_viz.SaliencyMonitor(every_n_epochs=1, methods=["gradient"]),
                lightning_viz.EmbeddingMonitor(every_n_epochs=1, reducer="tsne"),  # PCA runs in process: no child
            ]
        trainer, _ = _fit(pl_ns, tmp_path / str(with_suite), [recorder, stopping, *suite], module, "run", epochs=2)
        history.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        return history, trainer.current_epoch, stopping.wait_count

    assert run(True) == run(False)


# ---- NaN/Inf are missing values, not zeros ----


def test_nan_activations_are_missing_values_not_dead_ones():
    from lightning_viz.functional.activations import ChannelStats

    x = torch.tensor([[1.0, -1.0, float("nan")], [2.0, float("nan"), float("nan")]]).T  # (N=3, C=2)
    stats = ChannelStats()
    stats.update(x)
    assert stats.sparsity() == pytest.approx(1 / 3)  # of the three finite values, one is <= 0
    assert stats.mean() == pytest.approx(2 / 3)
    assert stats.missing_fraction() == pytest.approx(3 / 6)
    assert stats.dead_mask().tolist() == [False, False]
    stats = ChannelStats()
    stats.update(torch.full((4, 3), float("nan")))
    assert stats.dead_mask().tolist() == [False, False, False] and stats.known_channels() == 0
    assert torch.isnan(torch.tensor([stats.sparsity(), stats.mean()])).all()
    assert torch.isnan(stats.firing_rate()).all()


@pytest.mark.parametrize(
    "column, finite",
    [([float("inf"), float("-inf"), 1.0, 2.0], [1.0, 2.0]), ([float("-inf"), 0.0, 3.0, 3.0], [0.0, 3.0, 3.0])],
)
def test_inf_activations_are_missing_values_and_huge_ones_are_not(column, finite):
    # The missing values are found through each channel's float64 sum (no full isfinite pass): +Inf and -Inf that
    # cancel to NaN, a lone -Inf, and finite values whose float32 sum would overflow must all be told apart.
    from lightning_viz.functional.activations import ChannelStats

    huge = [3e38, 3e38, -1.0, 3e38]
    stats = ChannelStats()
    stats.update(torch.tensor([column, huge]).T)
    assert stats.missing_fraction() == pytest.approx((4 - len(finite)) / 8)
    assert stats.firing_rate().tolist() == pytest.approx([sum(v > 0 for v in finite) / len(finite), 0.75])
    assert stats.mean() == pytest.approx((sum(finite) + 9e38 - 1.0) / (len(finite) + 4), rel=1e-6)
    assert len(stats.samples()) == len(finite) + 4 and torch.isfinite(stats.samples()).all()


def test_all_nan_codes_have_no_knn_accuracy():
    from lightning_viz.functional.embedding import finite_quality

    labels = torch.arange(32) % 4
    assert finite_quality(torch.full((32, 8), float("nan")), labels) == (None, None, 32)
    codes = torch.nn.functional.one_hot(labels, 8).float() + 0.01 * torch.randn(
        32, 8, generator=torch.Generator().manual_seed(0)
    )
    codes[:5] = float("nan")
    knn, _, left_out = finite_quality(codes, labels)
    assert left_out == 5 and knn == 1.0


def test_a_diverged_network_is_diagnosed_as_divergence_not_dead_filters(tmp_path, pl_ns):
    class Poison(pl_ns.Callback):  # the weights become NaN at the start of the second epoch
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.model.conv1.weight.fill_(float("nan"))

    suite = [
        lightning_viz.ActivationMonitor(every_n_epochs=1),
        lightning_viz.EmbeddingMonitor(every_n_epochs=1, reducer="tsne"),  # PCA runs in process: no child
        lightning_viz.DiagnosisMonitor(every_n_epochs=1),
    ]
    with pytest.warns(UserWarning, match="NaN/Inf") as caught:
        _, events = _fit(pl_ns, tmp_path, [Poison(), *suite], make_module(pl_ns, TinyCNN()), "run", epochs=2)
    site = "model.relu2"
    assert [s for s, _ in events.scalars(f"activations/dead_fraction/{site}")] == [3]  # not at the NaN step 6
    assert [s for s, _ in events.scalars(f"activations/sparsity/{site}")] == [3]
    assert events.scalars(f"activations/nonfinite_fraction/{site}") == [(6, 1.0)]
    assert 6 not in [s for s, _ in events.scalars("embedding/knn_accuracy")]
    assert events.scalars("diagnosis/divergence")[-1][1] == 1.0
    assert all(v == 0.0 for _, v in events.scalars("diagnosis/dead_filters"))
    assert not [w for w in caught if "switched off" in str(w.message)]


# ---- the samples the monitors scan represent the whole validation set ----


def test_samples_scanned_cover_every_class_of_a_validation_set_sorted_by_class(tmp_path, pl_ns):
    import glob

    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(24)  # 96 samples: all of class 0 first, then 1, 2, 3
    val = DataLoader(TensorDataset(torch.randn(96, 3, 16, 16, generator=gen), labels), batch_size=16)
    train, _ = loaders(n=48)
    embedding = lightning_viz.EmbeddingMonitor(every_n_epochs=1, reducer="pca", subset_size=16)
    exemplars = lightning_viz.ExemplarMonitor(every_n_epochs=5, max_samples=16, log_baseline=False)  # pool only
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[embedding, exemplars], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(make_module(pl_ns, TinyCNN()), train, val)

    for monitor in (embedding, exemplars):
        _, kept, positions, seen = monitor._samples.samples(complete=True)
        assert seen == 96 and len(positions) == 16
        assert sorted(set(kept.tolist())) == [0, 1, 2, 3], type(monitor).__name__
        assert max(positions) - min(positions) > 48  # spread over the pass, not its first batches
    # what the user sees: the projector's metadata lists every class
    (metadata,) = glob.glob(str(tmp_path / "run" / "version_0" / "**" / "metadata.tsv"), recursive=True)[-1:]
    with open(metadata) as f:
        true_labels = {line.split("\t")[0] for line in f.read().splitlines()[1:]}
    assert true_labels == {"0", "1", "2", "3"}


def test_one_monitor_instance_watches_one_fit_at_a_time(tmp_path, pl_ns):

    monitor = lightning_viz.FilterMonitor()
    module = make_module(pl_ns, TinyCNN())
    first = pl_ns.Trainer(logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path))
    second = pl_ns.Trainer(logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path))
    first.state.status = type(first.state.status).RUNNING  # the first fit has not ended
    monitor.setup(first, module, "fit")
    with pytest.raises(RuntimeError, match="already watching the fit of another Trainer"):
        monitor.setup(second, module, "fit")
    released = []
    monitor._release = lambda pl_module: released.append(pl_module)
    monitor.on_exception(second, module, RuntimeError())  # Lightning's clean-up of the refused fit
    monitor.teardown(second, module, "fit")
    assert released == []  # ...leaves the running fit's hooks alone
    monitor.on_exception(first, module, RuntimeError())
    assert released == [module]
    del monitor._release
    first.state.status = type(first.state.status).INTERRUPTED  # a failed fit has ended: the instance is free
    monitor.setup(second, module, "fit")
    monitor._sink = None
    assert pickle.loads(pickle.dumps(monitor))._fit_trainer is None  # ddp_spawn pickles the callbacks


def test_call_sites_skip_our_own_passes():
    from lightning_viz._hooks import CallSiteRecorder, silenced_logging

    model = _SharedReLU()
    seen: list[tuple[str, int]] = []
    recorder = CallSiteRecorder({"relu": model.relu}, lambda name, index, out: seen.append((name, index)), root=model)
    recorder.attach()
    try:
        model(torch.randn(2, 3, 8, 8))
        model(torch.randn(2, 3, 8, 8))  # a second forward pass of the model: numbered afresh
        with silenced_logging(model):  # a monitor's own pass while the Trainer's batches are watched
            model(torch.randn(2, 3, 8, 8))
    finally:
        recorder.detach()
    assert seen == [("relu", 0), ("relu", 1), ("relu", 0), ("relu", 1)]
    assert recorder.site_name("relu", 1) == "relu#2"
