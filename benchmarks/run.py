"""Cost of each lightning_viz monitor per call, next to one training step of the reference workload.

Reference workload: torchvision ``resnet18(num_classes=10)``, 32x32 inputs, batch 128, SGD, CPU; an epoch of
CIFAR-10's size (391 steps). Prints a Markdown table. Run: ``make benchmark`` or ``python benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import resnet18

import lightning_viz
from lightning_viz.sinks import Sink

STEPS_PER_EPOCH = 391


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def training_step_seconds(model: torch.nn.Module, repeats: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    return median_seconds(step, repeats)


VAL_BATCHES = 79  # CIFAR-10's 10,000 test images in batches of 128


def _fake_trainer(x: torch.Tensor, y: torch.Tensor) -> types.SimpleNamespace:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    return types.SimpleNamespace(
        global_step=0,
        sanity_checking=False,
        current_epoch=0,
        is_global_zero=True,
        world_size=1,
        val_dataloaders=loader,
        train_dataloader=loader,
        callbacks=[],
        should_stop=False,
        max_epochs=1000,
        callback_metrics={"train_loss": torch.tensor(1.0), "val_loss": torch.tensor(1.0)},
    )


def collection_seconds(monitor: lightning_viz.ActivationMonitor, model: torch.nn.Module, repeats: int) -> float:
    """Extra seconds per validation batch that the ActivationMonitor's hooks add (with hooks minus without)."""
    x = torch.randn(128, 3, 32, 32)
    model.eval()

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    def hooked() -> None:
        monitor._recorder.attach()
        try:
            monitor._recorder.reset()
            with torch.inference_mode():
                model(x)
        finally:
            monitor._recorder.detach()

    return max(0.0, median_seconds(hooked, repeats) - median_seconds(plain, repeats))


class _RecordingSink(Sink):
    """A sink that also remembers the scalars it was given (the benchmark has no Trainer loggers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[str, list[float]] = {}

    def scalars(self, metrics, step: int) -> None:
        for key, value in metrics.items():
            self.recorded.setdefault(key, []).append(float(value))


def monitor_seconds(monitor: lightning_viz.VizCallback, model: torch.nn.Module, repeats: int) -> float:
    """Time the monitor's full call path (isolation, computation, rendering, writing) against a real event file."""
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        monitor._sink = _RecordingSink(writer, [], is_global_zero=True)
        data = torch.randn(1000, 3, 32, 32), torch.randint(0, 10, (1000,))
        trainer = _fake_trainer(*data)
        monitor._resolve(trainer, model)
        if isinstance(monitor, lightning_viz.ActivationMonitor):
            monitor._start(trainer)  # statistics of two batches, as a validation epoch would gather them
            for i in range(2):
                monitor._batch(i)
                with torch.inference_mode():
                    model.eval()(data[0][i * 128 : (i + 1) * 128])
            monitor._recorder.detach()

        def call() -> None:
            trainer.global_step += 1
            monitor._run(trainer, model, epochs_done=trainer.global_step)

        seconds = median_seconds(call, repeats)
        if isinstance(monitor, lightning_viz.EmbeddingMonitor):
            # the usual case in a real fit: the codes were captured during the Trainer's validation pass
            captured_times = []
            for _ in range(repeats):
                with torch.inference_mode():
                    codes = monitor._features(model.eval(), data[0])[0]
                    logits = model(data[0])
                monitor._captured = {i: (codes[i], logits[i]) for i in range(len(codes))}
                monitor._captured_epoch = trainer.current_epoch
                started = time.perf_counter()
                call()
                captured_times.append(time.perf_counter() - started)
            monitor.benchmark_captured_seconds = statistics.median(captured_times)
            monitor._release(model)  # wait for the projections, off the clock
            projection = monitor._sink.recorded.get("embedding/projection_seconds", [])
            monitor.benchmark_projection_seconds = statistics.median(projection[1:] or projection)
        writer.close()
    return seconds


def real_run(steps: int, epochs: int, projection: str = "umap") -> None:
    """Fit resnet18 on CIFAR-shaped random data with and without the suite (every monitor logging every epoch, so
    each epoch pays for all of them), and compare the measured extra time with the per-call costs measured above."""
    import glob
    import os

    import pytorch_lightning as pl
    from budget import lightning_module, quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    class EpochClock(pl.Callback):
        """Placed last: times each training epoch including validation and every other callback's epoch-end work."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self.started)

    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(steps * 128, 3, 32, 32, generator=gen), torch.randint(0, 10, (steps * 128,)))
    val = TensorDataset(torch.randn(1024, 3, 32, 32, generator=gen), torch.randint(0, 10, (1024,)))
    results = {}
    full = lightning_viz.default_suite(every_n_epochs=1, embedding={"reducer": projection})
    clocks = {}
    for label, suite in (("plain", []), ("suite", full)):
        clocks[label] = EpochClock()
        suite = [*suite, clocks[label]]
        with tempfile.TemporaryDirectory() as logdir:
            torch.manual_seed(0)
            trainer = quiet_trainer(pl, logdir, epochs, suite)
            started = time.perf_counter()
            trainer.fit(
                lightning_module(pl, lambda: resnet18(num_classes=10)),
                DataLoader(train, batch_size=128),
                DataLoader(val, batch_size=128),
            )
            seconds = time.perf_counter() - started
            size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(logdir, "r", "version_0", "events.*")))
            results[label] = (seconds, size)
    extra = results["suite"][0] - results["plain"][0]
    print(
        f"\nreal run: resnet18, {steps} steps of 128 + 8 validation batches per epoch, {epochs} epochs, CPU, "
        f"embedding projection {projection}"
    )
    print(
        f"- without callbacks: {results['plain'][0]:.1f} s; with default_suite(every_n_epochs=1): "
        f"{results['suite'][0]:.1f} s; measured extra: {extra:.1f} s over {epochs + 1} logged points "
        "(baseline + epochs)"
    )
    print(
        f"- event-file bytes with every monitor logging: {results['suite'][1] / 1e6:.2f} MB for {epochs + 1} "
        f"logged points = {results['suite'][1] / (epochs + 1) / 1e6:.2f} MB per logged epoch"
    )
    REAL["extra"] = extra
    # steady state: epochs after the first, whose calls pay no one-off costs
    later = [s - p for s, p in zip(clocks["suite"].seconds[1:], clocks["plain"].seconds[1:])]
    REAL["steady"] = statistics.median(later) if later else float("nan")
    print(f"- per-epoch extra after the first epoch: {[round(v, 1) for v in later]} s")


REAL: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", type=int, default=0, help="also fit for real with this many training steps/epoch")
    parser.add_argument("--real-epochs", type=int, default=2)
    parser.add_argument("--real-projection", default="umap", help="the EmbeddingMonitor's projection in the real run")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    step = training_step_seconds(model, args.repeats)
    epoch = step * STEPS_PER_EPOCH
    rows = []
    for monitor in lightning_viz.default_suite():
        seconds = monitor_seconds(monitor, model, args.repeats)
        per_epoch = seconds
        if isinstance(monitor, lightning_viz.ActivationMonitor):
            hooks = collection_seconds(monitor, model, args.repeats)
            per_epoch += hooks * min(VAL_BATCHES, monitor.max_batches)
            rows.append(("ActivationMonitor hooks, per validation batch", hooks, monitor.every_n_epochs, None))
        overhead = per_epoch / monitor.every_n_epochs / epoch
        rows.append((type(monitor).__name__, seconds, monitor.every_n_epochs, overhead))
        if isinstance(monitor, lightning_viz.EmbeddingMonitor):
            captured = monitor.benchmark_captured_seconds
            rows[-1] = (
                "EmbeddingMonitor (codes captured from validation)",
                captured,
                monitor.every_n_epochs,
                captured / monitor.every_n_epochs / epoch,
            )
            rows.append(
                (
                    "(EmbeddingMonitor reading the subset itself: DDP, shuffled loader)",
                    seconds,
                    monitor.every_n_epochs,
                    None,
                )
            )
            umap = monitor.benchmark_projection_seconds
            rows.append(
                (f"({monitor.projection} in the child process, not blocking)", umap, monitor.every_n_epochs, None)
            )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"reference: resnet18(num_classes=10), 32x32, batch 128, CPU; {STEPS_PER_EPOCH} steps/epoch\n")
    print("| what | seconds per call | every n epochs | overhead per epoch |")
    print("|---|---:|---:|---:|")
    print(f"| training step | {step:.4f} | - | - |")
    print(f"| training epoch ({STEPS_PER_EPOCH} steps) | {epoch:.1f} | - | - |")
    for name, seconds, every, overhead in rows:
        share = "-" if overhead is None else f"{overhead:.3%}"
        print(f"| {name} | {seconds:.4f} | {every} | {share} |")
    total = sum(r[3] for r in rows if r[3] is not None)
    print(f"| **default suite** | | | **{total:.3%}** |")
    if args.real:
        per_call = sum(r[1] for r in rows if r[3] is not None)  # every monitor once (hooks counted below)
        hooks = next((r[1] for r in rows if r[3] is None and "hooks" in r[0]), 0.0)
        predicted = (args.real_epochs + 1) * per_call + args.real_epochs * 8 * hooks
        real_run(args.real, args.real_epochs, args.real_projection)
        print(
            f"- predicted from the per-call table: {predicted:.1f} s (each monitor at every logged point, "
            f"ActivationMonitor hooks on 8 validation batches per epoch); measured / predicted = "
            f"{REAL['extra'] / predicted:.2f}"
        )
        per_epoch = per_call + 8 * hooks
        print(
            f"- steady state: {REAL['steady']:.1f} s measured per epoch against {per_epoch:.1f} s predicted "
            f"(measured / predicted = {REAL['steady'] / per_epoch:.2f})"
        )


if __name__ == "__main__":
    main()
