"""What DynamicsMonitor costs per epoch, against the training epoch's time: torchvision resnet18 on random 32x32 data.

The monitor works in three places: in the training loop (gradient norms and a parameter copy at the sampled steps,
the update norms after them, the loss), in the validation loop (forward hooks on the BatchNorm layers and bounded
activations, the probe samples), and once per logged epoch (the probe's two forward passes, the records, scalars and
the gradient-flow image). Each is timed separately; the epoch without the monitor is timed in the same process.
A third run trains with ``default_suite()`` (which includes the monitor, inside the suite's shared budget) and lists
what the budget's ledger charged to the DynamicsMonitor (its per-step sampling included) and to the whole suite,
against the training time the budget measured::

    python benchmarks/dynamics_cost.py [--epochs 3] [--batches 16] [--batch-size 64] [--device cpu] [--no-suite]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict


def classifier_module(pl, model, optimizer):
    """A LightningModule that trains ``model`` with cross-entropy and ``optimizer(parameters)``, logging
    ``train_loss``, ``val_loss`` and ``val_acc``."""
    import torch.nn.functional as F

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            logits = self(batch[0])
            self.log("val_loss", F.cross_entropy(logits, batch[1]), on_epoch=True)
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean(), on_epoch=True)

        def configure_optimizers(self):
            return optimizer(self.parameters())

    return Classifier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-suite", action="store_true", help="skip the default_suite run")
    args = parser.parse_args()

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import resnet18

    import lightning_viz
    from lightning_viz.callbacks.dynamics_monitor import DynamicsMonitor
    from lightning_viz.functional import dynamics as D

    torch.set_num_threads(args.threads)
    n = args.batches * args.batch_size
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    val = TensorDataset(torch.randn(n // 4, 3, 32, 32, generator=gen), torch.randint(0, 10, (n // 4,), generator=gen))

    seconds: dict[str, float] = defaultdict(float)

    def timed(where: str, fn, *a):
        started = time.perf_counter()
        try:
            return fn(*a)
        finally:
            seconds[where] += time.perf_counter() - started

    class Timed(DynamicsMonitor):
        """DynamicsMonitor with a stopwatch around the hooks that run inside the loops."""

        def on_before_optimizer_step(self, *a):
            return timed("train loop", super().on_before_optimizer_step, *a)

        def on_train_batch_end(self, *a):
            return timed("train loop", super().on_train_batch_end, *a)

        def on_validation_epoch_start(self, *a):
            return timed("validation loop", super().on_validation_epoch_start, *a)

        def on_validation_batch_start(self, *a):
            return timed("validation loop", super().on_validation_batch_start, *a)

        def on_validation_epoch_end(self, *a):
            return timed("validation loop", super().on_validation_epoch_end, *a)

    for cls, method in ((D.MomentStats, "update"), (D.SaturationCounter, "add")):  # the forward hooks' work
        original = getattr(cls, method)
        setattr(cls, method, lambda *a, fn=original: timed("validation loop", fn, *a))

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.train, self.val = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module):
            self.train.append(time.perf_counter() - self._t)
            self._v = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):
            self.val.append(time.perf_counter() - self._v)

    def run(*monitors):
        pl.seed_everything(0)
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(
                max_epochs=args.epochs,
                accelerator=args.device,
                devices=1,
                callbacks=[timer, *monitors],
                logger=pl.loggers.TensorBoardLogger(logdir),
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(
                classifier_module(pl, resnet18(num_classes=10), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
                DataLoader(data, batch_size=args.batch_size, shuffle=True),
                DataLoader(val, batch_size=args.batch_size),
            )
        return timer

    plain = run()
    monitor = Timed()
    watched = run(monitor)
    per_epoch = {k: v / args.epochs for k, v in seconds.items()}
    logged = sum(monitor._seconds) / max(1, len(monitor._seconds))
    train_plain = sorted(plain.train)[len(plain.train) // 2]
    train_watched = sorted(watched.train)[len(watched.train) // 2]
    total = per_epoch.get("train loop", 0) + per_epoch.get("validation loop", 0) + logged
    print(
        f"\nresnet18, {args.batches} batches of {args.batch_size} at 32x32 per epoch, {args.device}, "
        f"{torch.get_num_threads()} threads; sampled every {monitor._every} optimizer step(s)\n"
    )
    rows = [
        ("training epoch without the monitor (median)", train_plain),
        ("training epoch with the monitor (median)", train_watched),
        ("validation epoch without the monitor (median)", sorted(plain.val)[len(plain.val) // 2]),
        ("monitor: in the training loop, per epoch", per_epoch.get("train loop", 0.0)),
        ("monitor: in the validation loop, per epoch", per_epoch.get("validation loop", 0.0)),
        ("monitor: logging at the epoch's end", logged),
        ("monitor: total per epoch", total),
    ]
    print(f"| {'what':<48} | {'seconds':>8} | {'share of training epoch':>23} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 25}|")
    if not args.no_suite:
        suite = lightning_viz.default_suite(embedding={"reducer": "pca"})
        run(*suite)
        budget = next(cb._budget for cb in suite if cb._budget is not None)
        dynamics = next(cb for cb in suite if isinstance(cb, DynamicsMonitor))
        trained = budget.train_seconds
        rows += [
            ("default_suite: training time the budget measured", trained),
            ("default_suite: DynamicsMonitor charged, all epochs", budget.spent.get(dynamics._budget_key, 0.0)),
            ("default_suite: all monitors charged, all epochs", budget.spent_total),
        ]
    for label, seconds in rows:
        base = trained if label.startswith("default_suite") else train_plain
        print(f"| {label:<48} | {seconds:8.3f} | {seconds / base:22.1%} |")
    if not args.no_suite:
        print(f"(default_suite rows: share of the training time of that run; its budget is {budget.share:.0%})")


if __name__ == "__main__":
    main()
