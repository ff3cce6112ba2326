"""Offline data sets and the example CNN shared by the demo and the scenarios.

- ``photo_patches``: 32x32 RGB patches cut from scikit-image's bundled colour photos, one class per photo, so that
  first-layer filters learn colour and texture detectors.
- ``digits``: scikit-learn's 8x8 digits, upsampled to 32x32 grayscale.
- ``cifar10``: torchvision's CIFAR-10 (downloads on first use: needs internet).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo_patches(n_per_class: int = 400, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``size`` x ``size`` crops of each bundled photo (half resolution), labelled by photo."""
    import skimage.data
    import skimage.transform

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        photo = skimage.transform.rescale(photo, 0.5, channel_axis=-1, anti_aliasing=True).astype(np.float32)
        h, w = photo.shape[:2]
        for _ in range(n_per_class):
            top, left = rng.integers(0, h - size), rng.integers(0, w - size)
            images.append(photo[top : top + size, left : left + size])
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    x = (x - 0.5) / 0.25
    return x, torch.tensor(labels)


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, bilinearly upsampled to ``size`` x ``size``, standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.tensor(data.target)


def split(x: torch.Tensor, y: torch.Tensor, val_share: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_share)
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def cifar10(root: str = "data") -> tuple[Dataset, Dataset]:  # pragma: no cover - needs internet
    import torchvision
    import torchvision.transforms as T

    tf = T.Compose([T.ToTensor(), T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    train = torchvision.datasets.CIFAR10(root, train=True, download=True, transform=tf)
    val = torchvision.datasets.CIFAR10(root, train=False, download=True, transform=tf)
    return train, val


def load(name: str, seed: int = 0) -> tuple[Dataset, Dataset, int, int]:
    """(train, val, in_channels, num_classes) for ``photos``, ``digits`` or ``cifar10``.

    Both data sets carry their class names as ``classes`` (as torchvision's do), so monitors show names, not numbers.
    """
    if name == "photos":
        train, val = split(*photo_patches(seed=seed), seed=seed)
        train.classes = val.classes = list(PHOTOS)
        return train, val, 3, len(PHOTOS)
    if name == "digits":
        train, val = split(*digits(), seed=seed)
        train.classes = val.classes = [str(d) for d in range(10)]
        return train, val, 1, 10
    if name == "cifar10":
        return (*cifar10(), 3, 10)
    raise ValueError(f"unknown data set {name!r}; choose photos, digits or cifar10.")


class DemoCNN(nn.Module):
    """A small VGG-style CNN: 3 conv blocks (conv-BN-ReLU-pool), global average pooling, a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 6, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.gap(x).flatten(1))


class Classifier(pl.LightningModule):
    """Cross-entropy classification of any image model; logs train/val loss and accuracy per epoch."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        #: Lightning traces the model with this for TensorBoard's Graphs tab (``TensorBoardLogger(log_graph=True)``).
        self.example_input_array = example_input
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")

    def configure_optimizers(self):  # noqa: D102
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def loaders(train: Dataset, val: Dataset, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        DataLoader(val, batch_size=256, shuffle=False),
    )
