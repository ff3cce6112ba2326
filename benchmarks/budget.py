"""The suite's share of a run, baseline and end of fit included: training without and with ``default_suite()``.

(a) the reference workload (resnet18, 32x32, batches of 128, CPU; reduce ``--ref-steps`` / ``--ref-epochs`` to fit
the time you have) and (b) a short run (mobilenet_v3_small on sklearn's digits upscaled to 64x64, 6 epochs of a few
seconds). Then the fixed CPU-side costs of one logged epoch: PNG encoding, event-file writing, the saliency
inference copy (built vs. refreshed), torch.fx tracing. Run: ``python benchmarks/budget.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import lightning_viz
from lightning_viz._budget import PACE
from lightning_viz.functional import saliency as sal


def lightning_module(pl, make_model, lr: float = 0.01, channels_last: bool = False):
    """A LightningModule of ``pl`` (the Lightning namespace) around ``make_model()``: cross-entropy, SGD."""

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model()

        def forward(self, x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return Module()


def quiet_trainer(pl, logdir: str, epochs: int, callbacks: list, **kwargs):
    """A Trainer of ``pl`` for timing: TensorBoard logger, no progress bar, summary, checkpoints or sanity check."""
    options = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    options.update(enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)
    logger = pl.loggers.TensorBoardLogger(logdir, name="r", version=0)
    return pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, **options)


def fit_seconds(make_model, train, val, epochs: int, suite: list, batch_size: int) -> tuple[float, list]:
    """Wall time of ``trainer.fit`` (setup, baseline, epochs, end of fit) and the suite's budget, if any."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory() as logdir:
        torch.manual_seed(0)
        trainer = quiet_trainer(pl, logdir, epochs, suite)
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
        gc.collect()  # the fit before this one left garbage: each fit starts with none, with or without the suite
        started = time.perf_counter()
        trainer.fit(lightning_module(pl, make_model), loader, DataLoader(val, batch_size=batch_size))
        return time.perf_counter() - started, [(type(cb).__name__, cb._seconds) for cb in suite]


def digits_64() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


def cifar_shaped(steps: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(steps * 128, 3, 32, 32, generator=gen), torch.randint(0, 10, (steps * 128,)))
    val = TensorDataset(torch.randn(1024, 3, 32, 32, generator=gen), torch.randint(0, 10, (1024,)))
    return train, val


def compare(
    label: str, make_model, data, epochs: int, batch_size: int, budget: float, plain: bool = True, repeats: int = 1
) -> None:
    """Rows of pairs of fits, without the suite and with it, in turn (on a shared CPU two plain fits of the same run
    differ by up to 5 %), then, for several pairs, the fastest of each: the least disturbed measurement of both."""
    pairs = [_pair(label, make_model, data, epochs, batch_size, budget, plain) for _ in range(repeats)]
    if repeats > 1 and plain:
        without, with_suite = min(p[0] for p in pairs), min(p[1] for p in pairs)
        shares = sorted(p[2] for p in pairs)
        print(
            f"| {label}, fastest of {repeats} pairs | {epochs} | {without:.1f} | {with_suite:.1f} | "
            f"{(with_suite - without) / without:+.1%} | {shares[len(shares) // 2]:.1%} (median) | {budget:.0%} | |",
            flush=True,
        )


def _pair(label: str, make_model, data, epochs: int, batch_size: int, budget: float, plain: bool = True):
    """One row: the fit without the suite (unless ``plain`` is false: the budget's own training time stands in) and
    with ``default_suite(budget=budget)``, then the budget's ledger, part by part."""
    train, val = data
    without = fit_seconds(make_model, train, val, epochs, [], batch_size)[0] if plain else None
    suite = lightning_viz.default_suite(budget=budget)
    with_suite, costs = fit_seconds(make_model, train, val, epochs, suite, batch_size)
    ledger = suite[0]._budget
    plain = without if without is not None else ledger.train_seconds
    extra = f"{(with_suite - plain) / plain:+.1%}" if without is not None else "(not run)"
    spent = ledger.spent_total  # every call, step 0 and end of fit included, and the one timed pass
    calls = ", ".join(f"{name.removesuffix('Monitor')} {len(s)}" for name, s in costs)
    print(
        f"| {label} | {epochs} | {without or float('nan'):.1f} | {with_suite:.1f} | {extra} | "
        f"{spent / plain:.1%} | {budget:.0%} | {calls} |",
        flush=True,
    )
    # the budget's ledger: what each part spent, as a share of training; its step-0 view and per-step sampling apart
    parts = []
    for key, seconds in ledger.spent.items():
        detail = [f"step 0 {ledger.step0[key]:.2f} s"] if ledger.step0.get(key) else []
        if key == "hooks":  # per-step work, the dynamics' sampling included: the largest three
            top = sorted(ledger.hook_seconds.items(), key=lambda kv: -kv[1])[:3]
            detail.extend(f"{what} {seconds:.3f} s" for what, seconds in top)
        detail = f" [{', '.join(detail)}]" if detail else ""
        parts.append(f"{key.split('{')[0]} {seconds:.2f} s ({seconds / plain:.2%}){detail}")
    last = max(ledger.plans, default=0)
    print(
        f"  ledger: {', '.join(parts)}; of which step 0 {ledger.baseline_spent:.2f} s; the budget's own account: "
        f"{spent:.2f} s of {ledger.train_seconds:.1f} s of training ({spent / max(ledger.train_seconds, 1e-9):.2%}; "
        f"the pace: {ledger.share * PACE:.0%}); long epochs: {ledger.long_epochs(last)}; "
        f"left out: {'; '.join(ledger.dropped) or 'nothing'}",
        flush=True,
    )
    return without, with_suite, spent / plain


def fixed_costs(repeats: int) -> None:
    """The CPU-side costs of one logged epoch that don't shrink with faster training."""
    import pytorch_lightning as pl
    from run import median_seconds
    from torchvision.models import resnet18

    from lightning_viz.sinks import Sink

    def median(fn) -> float:
        return median_seconds(fn, repeats)

    model = resnet18(num_classes=10).eval()
    image = (np.random.default_rng(0).random((1024, 1024, 3)) * 255).astype(np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as logdir:
        logger = pl.loggers.TensorBoardLogger(logdir, name="r", version=0)
        trainer = type("T", (), {"loggers": [logger], "is_global_zero": True})()
        sink = Sink.for_trainer(trainer, max_image_side=1024)
        step = iter(range(10**6))
        rows.append(("PNG encode + write one 1024x1024 image", median(lambda: sink.image("b/img", image, next(step)))))
        rows.append(("flush the event file", median(sink.flush)))
    rows.append(("torch.fx trace of resnet18", median(lambda: torch.fx.symbolic_trace(copy.deepcopy(model)))))
    rows.append(("saliency inference copy, built each call (before)", median(lambda: sal.inference_copy(model))))
    cache = sal.InferenceCopy()
    cache(model)
    rows.append(("saliency inference copy, cached and refreshed (now)", median(lambda: cache(model))))
    rows.append(("deepcopy of resnet18", median(lambda: copy.deepcopy(model))))
    print("\n| fixed CPU-side cost (resnet18) | seconds |\n|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=lightning_viz.DEFAULT_BUDGET)
    parser.add_argument("--ref-steps", type=int, default=60, help="training steps per epoch of the reference run")
    parser.add_argument("--ref-epochs", "--reference-epochs", type=int, default=3)
    parser.add_argument("--no-plain", action="store_true", help="skip the fits without the suite (half the time)")
    parser.add_argument("--short-epochs", type=int, default=6)
    parser.add_argument("--short-repeats", type=int, default=3, help="pairs of short fits (the fastest of each)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("reference", "short", "fixed"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| run | epochs | without suite (s) | with default_suite() (s) | measured extra | suite's own seconds / "
        "training | budget | calls per monitor |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    if "short" not in args.skip:
        from torchvision.models import mobilenet_v3_small

        compare(
            "mobilenet_v3_small, digits 64x64",
            lambda: mobilenet_v3_small(num_classes=10),
            digits_64(),
            args.short_epochs,
            64,
            args.budget,
            not args.no_plain,
            args.short_repeats,
        )
    if "reference" not in args.skip:
        from torchvision.models import resnet18

        compare(
            f"resnet18, 32x32, {args.ref_steps} steps x 128",
            lambda: resnet18(num_classes=10),
            cifar_shaped(args.ref_steps),
            args.ref_epochs,
            128,
            args.budget,
            not args.no_plain,
        )
    if "fixed" not in args.skip:
        fixed_costs(args.repeats)


if __name__ == "__main__":
    main()
