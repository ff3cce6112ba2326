"""Reading the Trainer's data without touching its loaders' samplers (so no RNG draw leaves training's stream)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from lightning_viz.probes import _as_label, _split_sample


def first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def trainer_dataset(trainer: Any, prefer: str = "val") -> Dataset | None:
    """The indexable dataset behind the Trainer's validation (or training) loader, or ``None``."""
    order = ("val_dataloaders", "train_dataloader") if prefer == "val" else ("train_dataloader", "val_dataloaders")
    for attr in order:
        loader = first_loader(getattr(trainer, attr, None))
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            return dataset
    return None


def read_batches(
    dataset: Dataset, indices: Sequence[int], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[int | None]]]:
    """Images and labels of ``dataset[indices]``, ``batch_size`` at a time."""
    for start in range(0, len(indices), batch_size):
        images, labels = [], []
        for i in indices[start : start + batch_size]:
            image, label = _split_sample(dataset[int(i)])
            images.append(torch.as_tensor(image))
            labels.append(_as_label(label))
        yield torch.stack(images), labels


def _has_batches(loader: Any) -> bool:
    if loader is None:
        return False
    try:
        return len(loader) > 0
    except TypeError:  # an iterable-style loader has no length: it may still have batches
        return True


def resolve_probes(probes: Any, trainer: Any, sources: Sequence[str] = ("val_dataloaders", "train_dataloader")) -> None:
    """Choose an automatic ProbeSet from the first of the Trainer's ``sources`` loaders that has batches."""
    if probes.is_resolved:
        return
    loaders = (first_loader(getattr(trainer, attr, None)) for attr in sources)
    loader = next((lo for lo in loaders if _has_batches(lo)), None)
    probes.resolve(getattr(loader, "dataset", None), loader)
