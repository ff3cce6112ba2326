"""Short CPU runs on offline data that each show one problem the DiagnosisMonitor names.

    python examples/scenarios.py --scenario healthy       # no finding
    python examples/scenarios.py --scenario high-lr       # dead filters (learning rate far too high)
    python examples/scenarios.py --scenario overfit       # over-fitting (40 training images, Adam, no regularisation)
    python examples/scenarios.py --scenario undertrained  # under-training (too few epochs, tiny learning rate)

Data: scikit-learn's digits (offline). Logs go to ``--logdir`` (default ``runs/scenarios``), one run per scenario;
``--suite full`` adds every monitor, ``--suite fast`` (default) only filters, activations and the diagnosis.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import lightning_viz  # noqa: E402

SCENARIOS = ("healthy", "high-lr", "overfit", "undertrained")


def _two_conv_blocks() -> list[nn.Module]:
    return [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()]


def plain_cnn(num_classes: int = 10) -> nn.Module:
    """No BatchNorm: nothing protects its ReLUs from a learning rate that is far too high."""
    return nn.Sequential(
        *_two_conv_blocks(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class AdamClassifier(common.Classifier):
    """The same classifier trained with Adam (no weight decay): it fits a tiny training set fast."""

    def configure_optimizers(self):  # noqa: D102
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def wide_cnn(num_classes: int = 10) -> nn.Module:
    """No BatchNorm, a wide fully-connected head on the flattened maps: it memorises a tiny training set."""
    return nn.Sequential(
        *_two_conv_blocks(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def configure(name: str):
    """(model, lr, weight decay, epochs, number of training samples or None) for a scenario."""
    if name == "healthy":
        return common.DemoCNN(1, 10), 0.05, 5e-4, 8, None
    if name == "high-lr":
        return plain_cnn(), 0.8, 0.0, 4, None
    if name == "overfit":
        return wide_cnn(), 3e-3, 0.0, 40, 40
    if name == "undertrained":
        return common.DemoCNN(1, 10), 0.001, 0.0, 2, None
    raise ValueError(f"unknown scenario {name!r}; choose from {list(SCENARIOS)}.")


def run(name: str, logdir: str = "runs/scenarios", suite: str = "fast", seed: int = 0) -> list:
    """Train one scenario; returns the DiagnosisMonitor's final findings."""
    pl.seed_everything(seed, workers=True)
    model, lr, weight_decay, epochs, n_train = configure(name)
    train, val = common.split(*common.digits(size=16), seed=seed)
    if n_train is not None:
        train = Subset(train, list(range(n_train)))
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=256)
    if suite == "full":
        callbacks = lightning_viz.default_suite(every_n_epochs=1)
    else:
        callbacks = [lightning_viz.FilterMonitor(), lightning_viz.ActivationMonitor(), lightning_viz.DiagnosisMonitor()]
    diagnosis = next(cb for cb in callbacks if isinstance(cb, lightning_viz.DiagnosisMonitor))
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(logdir, name=name),
        callbacks=callbacks,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
        log_every_n_steps=5,
    )
    classifier = AdamClassifier if name == "overfit" else common.Classifier
    module = classifier(model, lr=lr, weight_decay=weight_decay)
    trainer.fit(module, loader, val_loader)
    return diagnosis.findings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--logdir", default="runs/scenarios")
    parser.add_argument("--suite", choices=["fast", "full"], default="fast")
    args = parser.parse_args(argv)
    findings = run(args.scenario, args.logdir, args.suite)
    print(f"\n{args.scenario}: {len(findings)} finding(s)")
    for f in findings:
        print(f"  [{f.severity}] {f.kind}: {f.summary}")
    print(f"\nOpen the run: lightning-viz board {args.logdir}/   or   lightning-viz report {args.logdir}/")


if __name__ == "__main__":
    main()
