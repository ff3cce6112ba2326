"""A 2-process DDP run on CPU (gloo, ddp_spawn) with BatchNorm and the full suite. Run by test_ddp.py.

SyncBatchNorm cannot be used here: torch's DistributedDataParallel refuses it on CPU ("SyncBatchNorm layers only
work with GPU modules"), so the CPU run keeps plain BatchNorm.

MASTER_ADDR / MASTER_PORT come from the caller (test_ddp.py picks a free loopback port); the process group times out
after ``DDP_TIMEOUT_S`` seconds instead of torch's 30 minutes, so a rank that never arrives fails the run.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_viz


class Net(nn.Module):
    """Channel 3 of ``conv`` fires only on images whose centre pixel is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-1.0)
            self.conv.weight[3, 0] = 1.0  # fires only where the red channel exceeds 1
            for c in range(8):
                if c != 3:
                    self.conv.weight[c, 1] = 1.0  # the others fire wherever green > 1

    def forward(self, x):
        return self.fc(self.bn(self.relu(self.conv(x))).mean(dim=(2, 3)))


class _ShutDownProcessGroup(pl.Callback):
    """Each rank waits for the others, then destroys the process group while Python is still fully alive.

    Without this a rank could reach interpreter shutdown right after its last gloo all-reduce: the gloo worker thread
    that releases that all-reduce's tensors then needs the GIL of a finalizing interpreter, is made to exit, and
    libstdc++ aborts ("terminate called without an active exception", the rank dies with SIGABRT). Rank 1 did so in
    about one run in five; a loaded machine, which delays that thread, makes it likelier. Lightning's own ``atexit``
    clean-up runs too late to prevent it.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: the planted channel stays as built


DDP_TIMEOUT_S = 180


def main(logdir: str) -> None:
    n = 32
    x = torch.zeros(n, 3, 8, 8)
    x[:, 1] = 2.0  # every image: green > 1
    x[1::2, 0] = 2.0  # odd images only: red > 1. DistributedSampler gives odd indices to rank 1.
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    suite = lightning_viz.default_suite(
        every_n_epochs=1,
        featurevis={"steps": 2},
        embedding={"reducer": "pca"},
        on_error="raise",
        activations={"layers": ["model.relu"]},
        saliency={"occlusion_window": 4},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=pl.strategies.DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=DDP_TIMEOUT_S)
        ),
        max_epochs=2,
        logger=pl.loggers.TensorBoardLogger(logdir, name="ddp", version=0),
        callbacks=[*suite, _ShutDownProcessGroup()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=True,
    )
    loader = DataLoader(data, batch_size=8, shuffle=False)
    trainer.fit(Module(), loader, loader)


if __name__ == "__main__":
    main(sys.argv[1])
    print("DDP_DONE", os.getpid())
