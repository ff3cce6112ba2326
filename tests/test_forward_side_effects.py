"""A forward that updates a torchmetrics metric (issue 14, section 4): our extra forward passes leave it alone, so
what the user logs is identical with and without the suite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN, loaders, trainer_kwargs
from torch import nn

import lightning_viz as lv

torchmetrics = pytest.importorskip("torchmetrics")


class Watched(nn.Module):
    """A CNN whose forward feeds metrics of its own (in a submodule of the user's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = TinyCNN()
        self.peak = torchmetrics.MaxMetric()
        self.spread = torchmetrics.MetricCollection({"std": torchmetrics.MeanMetric(), "n": torchmetrics.SumMetric()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cnn(x)
        self.peak.update(out.detach().abs().max())
        self.spread["std"].update(out.detach().std())
        self.spread["n"].update(torch.tensor(float(len(x))))
        return out


def _module(pl_ns, how: str):
    class Module(pl_ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Watched()
            self.logit_mean = torchmetrics.MeanMetric()  # updated in forward, logged as an object
            self.logits = torchmetrics.CatMetric()  # a list state
            self.history: list[dict[str, float]] = []

        def forward(self, x):
            out = self.model(x)
            self.logit_mean.update(out.detach().mean())
            self.logits.update(out.detach().flatten())
            return out

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            if how == "object":
                self.log("logit_mean", self.logit_mean, on_epoch=True)
            self.log("val_loss", loss)

        def on_train_epoch_end(self):
            values = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            # read by hand, never reset by Lightning: every call of forward since the start counts
            values.update(peak=float(self.model.peak.compute()), seen=float(len(self.logits.compute())))
            values.update({k: float(v) for k, v in self.model.spread.compute().items()})
            if how == "by hand":
                values["logit_mean"] = float(self.logit_mean.compute())
            self.history.append(values)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Module()


def _fit(pl_ns, tmp_path, how: str, suite: bool):
    torch.manual_seed(0)
    module = _module(pl_ns, how)
    callbacks = (
        lv.default_suite(budget=None, embedding={"reducer": "pca"}, featurevis={"steps": 2, "max_channels": 2})
        if suite
        else []
    )
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0) if suite else False
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, num_sanity_val_steps=1))
    trainer.fit(module, *loaders(n=32))
    return module


@pytest.mark.parametrize("how", ["object", "by hand"])
def test_metrics_a_forward_updates_are_identical_with_and_without_the_suite(tmp_path, pl_ns, how):
    plain = _fit(pl_ns, tmp_path / "plain", how, suite=False)
    watched = _fit(pl_ns, tmp_path / "suite", how, suite=True)
    assert len(plain.history) == 2 and "logit_mean" in plain.history[0]
    assert watched.history == plain.history
    for key, value in plain.state_dict().items():
        assert torch.equal(watched.state_dict()[key], value), key


def test_preserved_metrics_puts_back_every_state_and_the_bookkeeping():
    from lightning_viz._hooks import isolated

    model = Watched()
    model(torch.randn(4, 3, 8, 8))
    before = (float(model.peak.compute()), model.peak._update_count, model.spread["n"].compute().item())
    with isolated(model):
        for _ in range(3):
            model(torch.randn(5, 3, 8, 8) * 10)
    assert (float(model.peak.compute()), model.peak._update_count, model.spread["n"].compute().item()) == before
    model(torch.randn(2, 3, 8, 8))
    assert model.spread["n"].compute().item() == 6.0  # the metric still works after being put back
