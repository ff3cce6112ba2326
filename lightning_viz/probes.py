"""ProbeSet: the fixed images that per-image visualizations look at, epoch after epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from lightning_viz import _validate as check


def _split_sample(sample: Any) -> tuple[torch.Tensor, Any]:
    """A dataset item is an image tensor, or a (image, label, ...) tuple/list, or a dict with 'image'/'label'."""
    if isinstance(sample, torch.Tensor):
        return sample, None
    if isinstance(sample, dict):
        image = sample.get("image", sample.get("x", sample.get("input")))
        label = sample.get("label", sample.get("y", sample.get("target")))
        if image is None:
            raise TypeError(f"cannot find the image in a dict sample with keys {sorted(sample)}.")
        return torch.as_tensor(image), label
    if isinstance(sample, (tuple, list)) and sample:
        label = sample[1] if len(sample) > 1 else None
        return torch.as_tensor(sample[0]), label
    raise TypeError(f"cannot read an image from a sample of type {type(sample).__name__}.")


def _as_label(label: Any) -> int | None:
    if label is None:
        return None
    t = torch.as_tensor(label)
    if t.numel() != 1 or t.is_floating_point():
        return None
    return int(t)


class ProbeSet:
    """A fixed set of probe images (and labels, if known).

    Build it from a tensor (``ProbeSet(images, labels)``), from a dataset and indices (:meth:`from_dataset`), or let a
    callback choose it on first use from the validation data (:meth:`auto`): deterministically, from a seeded choice of
    dataset indices, covering as many classes as it can. Once chosen it is saved in the callback's ``state_dict``, so
    a resumed run shows the same probes.

    Args:
        images: (N, C, H, W) float tensor.
        labels: (N,) integer tensor, or ``None`` when unknown.
    """

    def __init__(self, images: torch.Tensor | None = None, labels: torch.Tensor | Sequence[int] | None = None) -> None:
        self._auto: tuple[int, int] | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        if images is not None:
            self._set(images, labels)

    @classmethod
    def from_dataset(cls, dataset: Dataset, indices: Sequence[int]) -> ProbeSet:
        """The dataset items at ``indices`` (each an image, or an ``(image, label)`` pair)."""
        if not len(indices):
            raise ValueError("`indices` is empty; choose at least one probe.")
        images, labels = [], []
        for i in indices:
            image, label = _split_sample(dataset[int(i)])
            images.append(image)
            labels.append(_as_label(label))
        has_labels = all(lb is not None for lb in labels)
        return cls(torch.stack(images), torch.tensor(labels) if has_labels else None)

    @classmethod
    def auto(cls, n: int = 8, seed: int = 0) -> ProbeSet:
        """A probe set of ``n`` images that a callback chooses from the validation data on first use."""
        check.positive_int("n", n)
        check.integer("seed", seed)
        probes = cls()
        probes._auto = (n, seed)
        return probes

    @property
    def is_resolved(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def _set(self, images: torch.Tensor, labels: Any) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"probe `images` must be a torch.Tensor, got {type(images).__name__}.")
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                "probe `images` must be a float tensor of shape (N, C, H, W), "
                f"got {tuple(images.shape)} {images.dtype}."
            )
        if labels is not None:
            labels = torch.as_tensor(labels).long().flatten()
            if len(labels) != len(images):
                raise ValueError(f"probe `labels` has {len(labels)} entries for {len(images)} images.")
        self.images = images.detach().cpu().clone()
        self.labels = labels.cpu().clone() if labels is not None else None

    def resolve(self, dataset: Dataset | None = None, loader: Any = None) -> None:
        """Choose the probes (for :meth:`auto`) from ``dataset`` (indexable) or, failing that, ``loader``'s batches.

        Indexing the dataset draws nothing from the sampler, so this takes no RNG draw from training.
        """
        if self.images is not None:
            return
        if self._auto is None:
            raise RuntimeError("ProbeSet has no images; build it with images, `from_dataset` or `auto`.")
        n, seed = self._auto
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            size = len(dataset)
            if size == 0:
                raise ValueError("cannot choose probes: the validation dataset is empty.")
            gen = torch.Generator().manual_seed(seed)
            candidates = torch.randperm(size, generator=gen)[: min(size, 20 * n)].tolist()
            chosen = _cover_classes(dataset, candidates, n)
            resolved = ProbeSet.from_dataset(dataset, chosen)
            self._set(resolved.images, resolved.labels)
            return
        if loader is None:
            raise ValueError("cannot choose probes: no validation data. Pass `probes=ProbeSet(images, labels)`.")
        images, labels = [], []
        for batch in loader:
            x, y = _split_sample(batch)
            images.append(x)
            labels.append(None if y is None else torch.as_tensor(y).flatten())
            if sum(len(i) for i in images) >= n:
                break
        if not images:
            raise ValueError("cannot choose probes: the validation loader is empty.")
        lab = None if any(lb is None for lb in labels) else torch.cat(labels)[:n]
        self._set(torch.cat(images)[:n].float(), lab)

    def take(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Choose the probes (for :meth:`auto`) among samples already at hand (the batches the Trainer produced).

        Seeded, deterministic, and covering as many classes as it can; reads nothing from any dataset or loader.
        """
        if self.images is not None:
            return
        if self._auto is None:
            raise RuntimeError("ProbeSet has no images; build it with images, `from_dataset` or `auto`.")
        if not len(images):
            raise ValueError("cannot choose probes: no samples.")
        n, seed = self._auto
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen: list[int] = []
        seen: set[int] = set()
        if labels is not None:
            for i in order:
                if int(labels[i]) not in seen and len(chosen) < n:
                    seen.add(int(labels[i]))
                    chosen.append(i)
        chosen += [i for i in order if i not in chosen][: n - len(chosen)]
        self._set(images[chosen].float(), labels[chosen] if labels is not None else None)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "auto": list(self._auto) if self._auto else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        auto = state.get("auto")
        self._auto = (int(auto[0]), int(auto[1])) if auto else None
        if state.get("images") is not None:
            self._set(state["images"], state.get("labels"))


def _cover_classes(dataset: Dataset, candidates: list[int], n: int) -> list[int]:
    """Pick ``n`` of ``candidates``, preferring one per class first (in candidate order), then the rest in order."""
    chosen: list[int] = []
    seen: set[int] = set()
    rest: list[int] = []
    for i in candidates:
        _, label = _split_sample(dataset[i])
        label = _as_label(label)
        if label is not None and label not in seen and len(chosen) < n:
            seen.add(label)
            chosen.append(i)
        else:
            rest.append(i)
    chosen.extend(rest[: n - len(chosen)])
    return chosen[:n]
