"""Real-world data: the monitors take samples from the Trainer's own batches, never from the user's data (issue #14)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import Events, TinyCNN, make_module, trainer_kwargs
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, random_split

import lightning_viz
from lightning_viz.callbacks import ActivationMonitor, EmbeddingMonitor, ExemplarMonitor, SaliencyMonitor

FAST = dict(
    featurevis={"steps": 2},
    embedding={"reducer": "pca", "subset_size": 16},
    saliency={"smoothgrad_samples": 2, "max_probes": 2},
    exemplars={"max_samples": 32, "top_k": 2, "max_channels": 2},
    max_overhead=1e9,
)


class Augmenting(Dataset):
    """A dataset that augments with its own generator: every read advances it."""

    def __init__(self, n: int = 48, size: int = 8, sort: bool = False) -> None:
        gen = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 3, size, size, generator=gen)
        self.y = torch.arange(n) % 4
        if sort:
            self.y = self.y.sort().values
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = torch.from_numpy(self.rng.normal(size=tuple(self.x[i].shape)).astype(np.float32))
        return self.x[i] + 0.1 * noise, self.y[i]


class Stream(IterableDataset):
    """Validation batches drawn from a generator the training loader shares."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def __iter__(self):
        for _ in range(2):
            yield torch.randn(8, 3, 8, 8, generator=self.gen), torch.randint(0, 4, (8,), generator=self.gen)


def _perturbation_case(case: str):
    """(train loader, val loader or None, a function reading the data's RNG state)."""
    if case == "own_rng_no_validation":
        data = Augmenting()
        return DataLoader(data, batch_size=16), None, lambda: data.rng.bit_generator.state
    if case == "random_split":
        full = Augmenting(64)
        train, val = random_split(full, [48, 16], generator=torch.Generator().manual_seed(0))
        return DataLoader(train, batch_size=16), DataLoader(val, batch_size=8), lambda: full.rng.bit_generator.state
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 8, 8), torch.arange(48) % 4)
    train = DataLoader(data, batch_size=16, shuffle=True, generator=gen)
    return train, DataLoader(Stream(gen), batch_size=None), lambda: gen.get_state()


def _fit(pl_ns, tmp_path, case, callbacks, **kw):
    pl_ns.seed_everything(3)
    train, val, rng_state = _perturbation_case(case)
    module = make_module(pl_ns, TinyCNN(width=4))
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **{"max_epochs": 2, **kw}))
    trainer.fit(module, train, val)
    return module, trainer, rng_state()


@pytest.mark.parametrize("case", ["own_rng_no_validation", "random_split", "iterable_val_shares_generator"])
def test_reading_data_never_perturbs_training(tmp_path, pl_ns, case):
    sanity = 0 if case == "own_rng_no_validation" else 2
    plain, plain_trainer, plain_rng = _fit(
        pl_ns, tmp_path / "plain", case, [], num_sanity_val_steps=sanity, max_epochs=1
    )
    suite = lightning_viz.default_suite(every_n_epochs=1, **FAST)
    watched, watched_trainer, watched_rng = _fit(
        pl_ns, tmp_path / "w", case, suite, num_sanity_val_steps=sanity, max_epochs=1
    )
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key
    opt_a, opt_b = (t.optimizers[0].state_dict() for t in (plain_trainer, watched_trainer))
    for idx in opt_a["state"]:
        assert torch.equal(opt_a["state"][idx]["momentum_buffer"], opt_b["state"][idx]["momentum_buffer"])
    if isinstance(plain_rng, torch.Tensor):
        assert torch.equal(plain_rng, watched_rng)
    else:
        assert plain_rng == watched_rng
    events = Events(str(tmp_path / "w" / "run"))  # and the monitors did show samples, step 0 included
    assert events.image_steps("saliency/grid")[0] == 0
    assert 0 in events.image_steps("embedding/neighbours")


def _schedule_fit(pl_ns, tmp_path, callbacks, *, two_val=False, datamodule=None, **kw):
    train = DataLoader(TensorDataset(torch.randn(48, 3, 8, 8), torch.arange(48) % 4), batch_size=8)
    val_x = torch.randn(32, 3, 8, 8) + 5.0  # validation images are told apart from training ones by their mean
    val = DataLoader(TensorDataset(val_x, torch.arange(32) % 4), batch_size=8)
    module = make_module(pl_ns, TinyCNN(width=4))
    if two_val:
        type(module).validation_step = lambda self, batch, batch_idx, dataloader_idx=0: self(batch[0])
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **{"max_epochs": 2, **kw}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule)
        else:
            trainer.fit(module, train, [val, val] if two_val else val)
    ours = [str(w.message) for w in record if "Monitor" in str(w.message) or "lightning_viz" in str(w.message)]
    return trainer, ours


def _monitors():
    return [
        ActivationMonitor(on_error="raise", max_overhead=1e9),
        EmbeddingMonitor(reducer="pca", every_n_epochs=1, subset_size=16, on_error="raise", max_overhead=1e9),
        SaliencyMonitor(every_n_epochs=1, smoothgrad_samples=2, max_probes=2, on_error="raise", max_overhead=1e9),
    ]


@pytest.mark.parametrize(
    "schedule",
    [
        dict(check_val_every_n_epoch=2),
        dict(check_val_every_n_epoch=2, num_sanity_val_steps=2),
        dict(check_val_every_n_epoch=None, val_check_interval=4),
        dict(val_check_interval=0.5),
        dict(two_val=True),
        dict(limit_val_batches=0),
    ],
    ids=["every_2_epochs", "every_2_epochs_sanity", "every_4_steps", "half_epoch", "two_loaders", "no_validation"],
)
def test_every_validation_schedule_runs_with_the_right_sources(tmp_path, pl_ns, schedule):
    callbacks = _monitors()
    trainer, ours = _schedule_fit(pl_ns, tmp_path, callbacks, **schedule)
    assert len(ours) <= 1, ours
    activation, embedding, saliency = callbacks
    from_validation = schedule.get("limit_val_batches", 1) != 0
    assert activation._source == ("val" if from_validation else "train")
    for probes in (saliency.probes, embedding.probes):  # taken from the validation data when there is some
        assert (probes.images.mean() > 2.5) == from_validation
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("saliency/grid")[0] == 0 and events.image_steps("embedding/neighbours")[0] == 0
    assert events.scalars("activations/sparsity/model.relu1")


def test_class_sorted_validation_set_gives_a_subset_of_every_class(tmp_path, pl_ns):
    embedding = EmbeddingMonitor(reducer="pca", every_n_epochs=1, subset_size=12, on_error="raise")
    exemplars = ExemplarMonitor(max_samples=12, top_k=2, max_channels=2, every_n_epochs=1, on_error="raise")
    labels = torch.arange(64) // 16  # a validation set sorted by class: four classes, 16 images each, in order
    val = TensorDataset(torch.randn(64, 3, 8, 8), labels)
    module = make_module(pl_ns, TinyCNN(width=4))
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[embedding, exemplars], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    train = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 4), batch_size=8)
    trainer.fit(module, train, DataLoader(val, batch_size=8))
    for monitor in (embedding, exemplars):
        _, labels, positions, seen = monitor._samples.samples(complete=True)
        assert seen == 64 and set(labels.tolist()) == {0, 1, 2, 3} and max(positions) >= 48


def test_reloaded_validation_set_of_another_size_falls_back_with_one_warning(tmp_path, pl_ns):
    class Data(pl_ns.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 4), batch_size=8)

        def val_dataloader(self):
            n = 24 + 8 * self.trainer.current_epoch  # the validation set grows every epoch
            return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8), torch.arange(n) % 4), batch_size=8)

    embedding = EmbeddingMonitor(reducer="pca", every_n_epochs=1, subset_size=8, on_error="raise", max_overhead=1e9)
    trainer, ours = _schedule_fit(
        pl_ns, tmp_path, [embedding], datamodule=Data(), max_epochs=3, reload_dataloaders_every_n_epochs=1
    )
    assert trainer.current_epoch == 3
    assert len(ours) == 1 and "the validation pass had 32 samples, the one the subset was taken from 24" in ours[0]
    steps = [s for s, _ in Events(str(tmp_path / "run")).scalars("embedding/knn_accuracy")]
    assert steps == [0, 2, 4, 6]
