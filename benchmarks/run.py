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
            monitor._release(model)  # wait for the projections, off the clock
            projection = monitor._sink.recorded.get("embedding/projection_seconds", [])
            monitor.benchmark_projection_seconds = statistics.median(projection[1:] or projection)
        writer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
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


if __name__ == "__main__":
    main()
