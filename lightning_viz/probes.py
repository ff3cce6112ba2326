"""ProbeSet: the fixed images that per-image visualizations look at, epoch after epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from lightning_viz import _validate as check
from lightning_viz._inputs import FIX, InputFn


def _sample_label(sample: Any) -> int | None:
    """The class label of one dataset item, read as the monitors read a batch of it."""
    from torch.utils.data import default_collate

    from lightning_viz._data import read_batch

    labels = read_batch(default_collate([sample]))[1]
    return int(labels[0]) if labels is not None else None


class ProbeSet:
    """A fixed set of probe images (and labels, if known).

    Build it from a tensor (``ProbeSet(images, labels)``), from a dataset and indices (:meth:`from_dataset`), or let a
    callback choose it on first use from the validation data (:meth:`auto`): deterministically, from a seeded choice of
    dataset indices, covering as many classes as it can. Once chosen it is saved in the callback's ``state_dict``, so
    a resumed run shows the same probes.

    Args:
        images: (N, C, H, W) float tensor.
        labels: (N,) integer tensor, or ``None`` when unknown.
        extra_inputs: for a model called as ``model(image, *more)``, the other inputs of each probe (a tuple of
            tensors of N rows each): every view of a probe (a noisy or occluded copy too) is computed with them.
    """

    def __init__(
        self,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | Sequence[int] | None = None,
        extra_inputs: Sequence[torch.Tensor] = (),
    ) -> None:
        self._auto: tuple[int, int] | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.extra_inputs: tuple[torch.Tensor, ...] = ()
        if images is not None:
            self._set(images, labels, extra_inputs)

    @classmethod
    def from_dataset(cls, dataset: Dataset, indices: Sequence[int], *, input_fn: InputFn | None = None) -> ProbeSet:
        """The dataset items at ``indices``, read as the monitors read a batch: the items are collated as a
        ``DataLoader`` would, then split by ``input_fn`` (default: the rule of :mod:`lightning_viz._inputs`, so
        ``(image, label)``, ``(path, image, label)`` and dict samples all work). When ``input_fn`` returns more
        model inputs than the image, each probe keeps its own (``extra_inputs``).

        Raises:
            ValueError: ``indices`` is empty, or the items hold no images (the message names the cause and the fix).
        """
        from torch.utils.data import default_collate

        from lightning_viz._data import read_batch

        if not len(indices):
            raise ValueError("`indices` is empty; choose at least one probe.")
        batch = default_collate([dataset[int(i)] for i in indices])
        images, labels, extra, problem = read_batch(batch, input_fn)
        if images is None:
            raise ValueError(f"`ProbeSet.from_dataset`: cannot read probe images from the dataset: {problem}. {FIX}")
        return cls(images.float(), labels, extra)

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

    def _set(self, images: torch.Tensor, labels: Any, extra_inputs: Sequence[torch.Tensor] = ()) -> None:
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
        extra = tuple(extra_inputs)
        if any(not isinstance(e, torch.Tensor) or e.ndim == 0 or len(e) != len(images) for e in extra):
            raise ValueError(f"probe `extra_inputs` must be tensors of {len(images)} rows, one per probe image.")
        self.images = images.detach().cpu().clone()
        self.labels = labels.cpu().clone() if labels is not None else None
        self.extra_inputs = tuple(e.detach().cpu().clone() for e in extra)

    def resolve(self, dataset: Dataset | None = None, loader: Any = None) -> None:
        """Choose the probes (for :meth:`auto`) from ``dataset`` (indexable) or, failing that, ``loader``'s batches.

        Indexing the dataset draws nothing from the sampler, so this takes no RNG draw from training.
        """
        if self.images is not None:
            return
        if self._auto is None:
            raise RuntimeError("ProbeSet has no images; build it with images, `from_dataset` or `auto`.")
        from lightning_viz._data import read_batch

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
            x, y, _, problem = read_batch(batch)
            if x is None:
                raise ValueError(f"cannot choose probes: {problem}. {FIX}")
            images.append(x)
            labels.append(y)
            if sum(len(i) for i in images) >= n:
                break
        if not images:
            raise ValueError("cannot choose probes: the validation loader is empty.")
        lab = None if any(lb is None for lb in labels) else torch.cat(labels)[:n]
        self._set(torch.cat(images)[:n].float(), lab)

    def take(
        self, images: torch.Tensor, labels: torch.Tensor | None, extra_inputs: Sequence[torch.Tensor] = ()
    ) -> None:
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
        extra = tuple(e[chosen] for e in extra_inputs if len(e) == len(images))
        self._set(images[chosen].float(), labels[chosen] if labels is not None else None, extra)

    def state_dict(self) -> dict[str, Any]:
        auto = list(self._auto) if self._auto else None
        return {"images": self.images, "labels": self.labels, "auto": auto, "extra_inputs": list(self.extra_inputs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        auto = state.get("auto")
        self._auto = (int(auto[0]), int(auto[1])) if auto else None
        if state.get("images") is not None:
            self._set(state["images"], state.get("labels"), state.get("extra_inputs", ()))


def _cover_classes(dataset: Dataset, candidates: list[int], n: int) -> list[int]:
    """Pick ``n`` of ``candidates``, preferring one per class first (in candidate order), then the rest in order."""
    chosen: list[int] = []
    seen: set[int] = set()
    rest: list[int] = []
    for i in candidates:
        label = _sample_label(dataset[i])
        if label is not None and label not in seen and len(chosen) < n:
            seen.add(label)
            chosen.append(i)
        else:
            rest.append(i)
    chosen.extend(rest[: n - len(chosen)])
    return chosen[:n]
