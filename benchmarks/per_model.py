"""Seconds per call of the heavier monitors on the demo model (its validation set) and on a ResNet-18.

- ExemplarMonitor (defaults: last conv layer, 16 channels, k=9, up to 2000 samples).
- FeatureVisMonitor (defaults: last conv layer, 16 channels, 128 steps, image size = the data's).
CPU, median of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import resnet18

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from run import _fake_trainer, median_seconds  # noqa: E402

from lightning_viz import ExemplarMonitor, FeatureVisMonitor  # noqa: E402
from lightning_viz.sinks import Sink  # noqa: E402


def time_monitor(monitor, model, loader, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        monitor._sink = Sink(writer, [], is_global_zero=True)
        trainer = _fake_trainer(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
        trainer.val_dataloaders = loader
        monitor._resolve(trainer, model)

        def call() -> None:
            trainer.global_step += 1
            monitor._run(trainer, model, epochs_done=trainer.global_step)

        seconds = median_seconds(call, repeats)
        writer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, val, channels, classes = common.load("photos")
    workloads = [
        (f"demo CNN, demo validation set ({len(val)} images, 3x32x32)", common.DemoCNN(channels, classes), val),
        (
            "resnet18(num_classes=10), 1000 images 3x32x32",
            resnet18(num_classes=10),
            TensorDataset(torch.randn(1000, 3, 32, 32), torch.randint(0, 10, (1000,))),
        ),
    ]
    print(f"CPU, {torch.get_num_threads()} threads\n")
    print("| workload | ExemplarMonitor (s/call) | FeatureVisMonitor, 16 channels (s/call) |")
    print("|---|---:|---:|")
    for name, model, data in workloads:
        loader = DataLoader(data, batch_size=256)
        exemplars = time_monitor(ExemplarMonitor(), model.eval(), loader, args.repeats)
        featurevis = time_monitor(FeatureVisMonitor(), model.eval(), loader, args.repeats)
        print(f"| {name} | {exemplars:.2f} | {featurevis:.2f} |")


if __name__ == "__main__":
    main()
