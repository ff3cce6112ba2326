"""Shared fixtures: tiny models, tiny data, and a reader for the event files we write."""

from __future__ import annotations

import glob
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(2)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2, global pooling, linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_module(base, model: nn.Module | None = None, lr: float = 0.05):
    """A LightningModule class from either namespace (``base`` is ``lightning.pytorch`` or ``pytorch_lightning``)."""

    class Module(base.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model if model is not None else TinyCNN()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y), on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return Module()


def make_data(n: int = 64, channels: int = 3, size: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


def loaders(n: int = 64, channels: int = 3, batch_size: int = 16, shuffle_seed: int = 0, **kw):
    train = make_data(n, channels, **kw)
    val = make_data(n // 2, channels, seed=1, **kw)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(shuffle_seed)),
        DataLoader(val, batch_size=batch_size),
    )


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        default_root_dir=str(tmp_path),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


def fit_monitor(pl_ns, tmp_path, monitor, model=None, *, train=None, val=None, channels=3, n=64, **trainer_overrides):
    """Fit a tiny module with one monitor and a TensorBoard logger at ``tmp_path/run``; returns (module, Events)."""
    if train is None:
        train, val = loaders(n=n, channels=channels)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, **trainer_overrides))
    module = make_module(pl_ns, model)
    trainer.fit(module, train, val)
    return module, Events(str(tmp_path / "run"))


class Events:
    """Everything in a run directory's event files, read with TensorBoard's own EventAccumulator."""

    def __init__(self, logdir: str) -> None:
        from tensorboard.backend.event_processing import event_accumulator as ea

        files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
        assert files, f"no event files under {logdir}"
        self.acc = ea.EventAccumulator(
            os.path.dirname(files[0]),
            size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0},
        )
        self.acc.Reload()
        self.tags = self.acc.Tags()

    def image_steps(self, tag: str) -> list[int]:
        return [e.step for e in self.acc.Images(tag)]

    def image(self, tag: str, index: int = -1):
        import io

        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.acc.Images(tag)[index].encoded_image_string)).convert("RGB"))

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in self.acc.Scalars(tag)]

    def text(self, tag: str) -> list[tuple[int, str]]:
        out = []
        # torch's SummaryWriter.add_text stores a tag under "<tag>/text_summary"
        if tag not in self.tags["tensors"]:
            tag = f"{tag}/text_summary"
        for e in self.acc.Tensors(tag):
            out.append((e.step, e.tensor_proto.string_val[0].decode()))
        return out


@pytest.fixture(params=["pytorch_lightning", "lightning.pytorch"])
def namespace(request):
    """Each Lightning namespace in turn."""
    import importlib

    return importlib.import_module(request.param)


@pytest.fixture
def pl_ns():
    return pl


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DemoRun(tuple):
    """``(log directory, stdout)``, and the run's ``stderr``."""

    def __new__(cls, logdir, stdout: str, stderr: str):
        run = super().__new__(cls, (logdir, stdout))
        run.stderr = stderr
        return run


@pytest.fixture(scope="session")
def demo_logs(tmp_path_factory):
    """The demo, shortened (3 epochs of 4 batches), run once per session: (log directory, its stdout), and its
    ``stderr``."""
    import subprocess
    import sys

    logdir = tmp_path_factory.mktemp("demo")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "demo.py"),
            "--logdir",
            str(logdir),
            "--epochs",
            "3",
            "--limit-batches",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return DemoRun(logdir, out.stdout, out.stderr)
