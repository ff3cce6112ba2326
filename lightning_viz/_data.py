"""Data is taken, not drawn: samples kept from the batches the Trainer already produced (DESIGN rule 12).

A monitor never indexes a user's dataset nor iterates a loader: a dataset may own an RNG (augmentation), a loader
may share a ``torch.Generator`` with the training loader, and either read would change training. Instead each
monitor keeps a :class:`SampleBank`, a bounded, seeded reservoir fed from the sanity-check, validation (first
loader) or - when no validation runs - training batches, on CPU. What must stay fixed (probes) is chosen from it
once and saved in the callback's state.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_viz._compat import global_rank, is_overridden, rank_zero_warn
from lightning_viz._inputs import InputFn, class_labels, default_input_fn, split_inputs


def first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def validation_expected(trainer: Any, pl_module: Any) -> bool:
    """Whether the fit will run validation at all: a ``validation_step``, validation data, batches to run."""
    if not is_overridden("validation_step", pl_module) or getattr(trainer, "limit_val_batches", 1.0) == 0:
        return False
    try:  # Lightning loads the loaders lazily; whether a source of them was given is known from the start
        return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())
    except AttributeError:
        return True


def split_batch(batch: Any, input_fn: InputFn | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(images (N, C, H, W) float, labels (N,) long or None) of a batch, or (None, None) when it holds no images.

    ``input_fn`` (default: :func:`lightning_viz._inputs.default_input_fn`) says which part is the model's input.
    """
    images, labels, _, _ = read_batch(batch, input_fn)
    return images, labels


def read_batch(
    batch: Any, input_fn: InputFn | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...], str | None]:
    """(images (N, C, H, W) or None, labels (N,) or None, the model's other inputs, why there are no images or None).

    Never raises: a batch that cannot be read gives no images and the reason, to be said once.
    """
    try:
        inputs, target = (input_fn or default_input_fn)(batch)
        first, extra = split_inputs(inputs)
    except Exception as exc:  # a user's input_fn, or a batch the default rule cannot read
        return None, None, (), f"{type(exc).__name__}: {exc}"
    if not isinstance(first, torch.Tensor) or not first.is_floating_point() or first.ndim != 4:
        got = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, torch.Tensor) else type(first).__name__
        return None, None, (), f"the model's input is not a batch of images (N, C, H, W) of floats: {got}"
    extra = tuple(e for e in extra if isinstance(e, torch.Tensor))
    return first, class_labels(target, len(first)), extra, None


@dataclass
class _Pass:
    """One pass's reservoir: the kept rows, each row's position in the pass, and how many samples the pass had."""

    key: tuple[Any, ...]
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    extras: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  #: each kept row's other model inputs
    seen: int = 0
    complete: bool = False


class SampleBank:
    """A bounded, seeded, uniform reservoir of the samples of one pass over the Trainer's data.

    Feed it with :meth:`offer` (one call per batch; ``key`` names the pass the batch belongs to) and close a pass
    that ran to its end with :meth:`end`. A pass that ran to its end is kept for the rest of the fit (samples stay
    the same epoch after epoch); until then the latest pass (e.g. the sanity check's few batches) is used. Being a
    reservoir over the whole pass, the samples represent the whole validation set even when it is sorted by class.
    Randomness comes from a private generator; only the kept rows are copied to the CPU.

    Args:
        capacity: samples kept at most.
        seed: seed of the private generator.
        max_bytes: memory cap; the capacity shrinks to fit (see :attr:`capped`).
    """

    def __init__(self, capacity: int, seed: int, max_bytes: int = 256 * 2**20, input_fn: InputFn | None = None) -> None:
        self.capacity = capacity
        self.input_fn = input_fn
        #: the model's inputs after the image, those of the first sample kept (each ``(1, ...)``, on the CPU); each
        #: kept row's own are kept with it (:meth:`extras`) when they have one row per sample
        self.extra_inputs: tuple[torch.Tensor, ...] = ()
        #: why a batch gave no images (the latest such reason), to be said once
        self.problem: str | None = None
        self.max_bytes = max_bytes
        self._seed = seed
        # made on first use: a callback holding a generator's state tensor cannot be handed to processes that
        # `ddp_spawn` starts (torch shares the tensor as a file descriptor, which fails at spawn)
        self._gen: torch.Generator | None = None
        self._kept: _Pass | None = None
        self._pending: _Pass | None = None
        #: the capacity asked for, when memory made it smaller (else None)
        self.capped: int | None = None

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self._seed)
        return self._gen

    def reset(self) -> None:
        self._gen = None
        self._kept = self._pending = None

    @property
    def frozen(self) -> bool:
        """A whole pass is kept: nothing more is taken."""
        return self._kept is not None and self._kept.complete

    def offer(self, key: tuple[Any, ...], batch: Any) -> None:
        if self.frozen or self.capacity <= 0:
            return
        if self._pending is None or self._pending.key != key:
            self._commit()
            self._pending = _Pass(key)
        images, labels, extra, problem = read_batch(batch, self.input_fn)
        if images is None:
            self.problem = problem
            return
        if extra and not self.extra_inputs:
            self.extra_inputs = tuple(e[:1].detach().to("cpu", copy=True) for e in extra)
        per_row = bool(extra) and all(e.ndim >= 1 and len(e) == len(images) for e in extra)
        part = self._pending
        if not part.images and images[0].numel():
            self._cap(images[0].numel() * images.element_size())
        for row in range(len(images)):
            slot = len(part.images) if len(part.images) < self.capacity else None
            if slot is None:
                j = int(torch.randint(0, part.seen + 1, (1,), generator=self._generator()))
                slot = j if j < self.capacity else None
            if slot is not None:
                image = images[row].detach().to("cpu", copy=True)
                label = int(labels[row]) if labels is not None else None
                others = tuple(e[row].detach().to("cpu", copy=True) for e in extra) if per_row else ()
                if slot == len(part.images):
                    part.images.append(image)
                    part.labels.append(label)
                    part.positions.append(part.seen)
                    part.extras.append(others)
                else:
                    part.images[slot], part.labels[slot], part.positions[slot] = image, label, part.seen
                    part.extras[slot] = others
            part.seen += 1

    def _cap(self, sample_bytes: int) -> None:
        fits = max(2, self.max_bytes // max(1, sample_bytes))
        if fits < self.capacity:
            self.capped, self.capacity = self.capacity, fits

    def end(self, key: tuple[Any, ...]) -> None:
        """The pass ``key`` ran to its end (a validation epoch, a training epoch)."""
        if self._pending is not None and self._pending.key == key:
            self._pending.complete = True
            self._commit()

    def _commit(self) -> None:
        if self._pending is not None and self._pending.images and not self.frozen:
            self._kept = self._pending
        self._pending = None

    def _current(self, complete: bool = False) -> _Pass | None:
        for part in (self._kept, self._pending):
            if part is not None and part.images and (part.complete or not complete):
                return part
        return None

    def has_samples(self, complete: bool = False) -> bool:
        return self._current(complete) is not None

    def count(self, complete: bool = False, seen: bool = False) -> int:
        """How many samples :meth:`samples` would return (``seen``: the pass had), without stacking them."""
        part = self._current(complete)
        return 0 if part is None else part.seen if seen else len(part.images)

    def samples(self, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, list[int], int]:
        """(images (N, C, H, W), labels (N,) or None, positions in the pass (ascending), samples in the pass)."""
        part = self._current(complete)
        if part is None:
            raise ValueError("no batch has been seen yet")
        order = sorted(range(len(part.images)), key=part.positions.__getitem__)
        images = torch.stack([part.images[i] for i in order])
        labels = [part.labels[i] for i in order]
        known = all(lb is not None for lb in labels)
        return images, torch.tensor(labels) if known else None, [part.positions[i] for i in order], part.seen

    def extras(self, complete: bool = False) -> tuple[torch.Tensor, ...]:
        """The model's other inputs of the kept samples, each ``(N, ...)`` in the order of :meth:`samples`; ``()``
        when the model takes none, or they do not have one row per sample."""
        part = self._current(complete)
        if part is None or not part.extras or any(not e for e in part.extras):
            return ()
        order = sorted(range(len(part.images)), key=part.positions.__getitem__)
        return tuple(torch.stack([part.extras[i][k] for i in order]) for k in range(len(part.extras[0])))


def extra_rows(bank: SampleBank, probes: Any = None) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """``(rows, extra)`` for :func:`lightning_viz._inputs.model_inputs`: the samples a monitor kept and its probes,
    with each one's own other model inputs; ``(None, the first sample's)`` when they are not known per sample."""
    parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
    if probes is not None and getattr(probes, "extra_inputs", ()) and probes.images is not None:
        parts.append((probes.images, probes.extra_inputs))
    if bank.has_samples() and bank.extras():
        parts.append((bank.samples()[0], bank.extras()))
    fits = [p for p in parts if p[0].shape[1:] == parts[0][0].shape[1:] and len(p[1]) == len(parts[0][1])]
    if not fits:
        return None, bank.extra_inputs
    try:
        extra = tuple(torch.cat([p[1][k] for p in fits]) for k in range(len(fits[0][1])))
    except RuntimeError:  # other inputs of different shapes: the first part's alone
        return fits[0]
    return torch.cat([p[0] for p in fits]), extra


# ---- one message per Trainer, and the untrained weights for a baseline that has to wait for data ----

_TOLD: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_INITIAL: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def told(trainer: Any, fallback: set[str] | None = None) -> set[str]:
    """The keys of what has been said once per ``trainer`` (:func:`tell_once`, progress lines); a stand-in trainer
    that cannot be weakly referenced gets ``fallback`` (a monitor's own set) or a fresh set."""
    try:
        return _TOLD.setdefault(trainer, set())
    except TypeError:
        return fallback if fallback is not None else set()


def tell_once(trainer: Any, key: str, message: str, *, warn: bool = True) -> None:
    """Say ``message`` once per Trainer, however many monitors have it to say: a warning, or (``warn=False``, for
    what is shown anyway, only later) an info line in the ``lightning_viz`` log."""
    said = told(trainer)
    if key not in said:
        said.add(key)
        if warn:
            rank_zero_warn(message)
        elif global_rank() == 0:
            logging.getLogger("lightning_viz").info(message)


_ASIDE: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, str | None]]] = weakref.WeakKeyDictionary()


def step_aside(trainer: Any, monitor: str, reason: str, fix: str | None = None) -> None:
    """Note that ``monitor`` (or a part of it: ``"SaliencyMonitor's Grad-CAM"``) does not apply to this run - a
    default target the model lacks, inputs that are not images - and steps aside; :func:`say_steps_aside` says so
    for all of them in one line, each reason and each ``fix`` once."""
    _ASIDE.setdefault(trainer, {}).setdefault(monitor, (reason.rstrip(". "), fix))


def say_steps_aside(trainer: Any, *, final: bool) -> None:
    """Say, in one warning, which monitors do not apply and why (once per Trainer).

    Called at the start of training (``final=False``: only if a batch has been seen, so that monitors that learn
    from the first batch that the inputs are not images are in the same line) and after the first training epoch.
    """
    pending = _ASIDE.get(trainer)
    if not pending or (not final and not _seen_batches(trainer)):
        return
    _ASIDE[trainer] = {}
    by_reason: dict[str, list[str]] = {}
    fixes: list[str] = []
    for name, (reason, fix) in pending.items():
        by_reason.setdefault(reason, []).append(name)
        if fix and fix not in fixes:
            fixes.append(fix)
    parts = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
    rank_zero_warn(
        f"lightning_viz: not applicable to this run, so off while training goes on: {parts}. "
        + "".join(f"{fix} " for fix in fixes)
        + "To silence this, leave them out (e.g. `default_suite(filters=False)`)."
    )


def _seen_batches(trainer: Any) -> bool:
    return bool(getattr(trainer, "num_sanity_val_steps", 0)) and validation_expected(trainer, trainer.lightning_module)


def keep_initial_weights(trainer: Any, model: nn.Module) -> None:
    """Keep a CPU copy of the model's parameters and buffers as they are now (once per fit of a Trainer).

    Called at ``on_train_start`` of a fresh fit: after a checkpoint is restored and after the user's ``setup`` and
    ``on_fit_start`` (which may load weights), so the copy is what the first optimizer step starts from.
    """
    if trainer not in _INITIAL:
        _INITIAL[trainer] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()}


def forget_initial_weights(trainer: Any) -> None:
    """A fit begins: weights kept by an earlier fit of the same Trainer are no longer its starting point."""
    _INITIAL.pop(trainer, None)


def has_initial_weights(trainer: Any) -> bool:
    return trainer in _INITIAL


@contextlib.contextmanager
def initial_weights(trainer: Any, model: nn.Module) -> Iterator[None]:
    """Run the body with the kept initial weights in ``model``; the current ones are put back exactly on exit."""
    initial = _INITIAL[trainer]
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items() if k in initial}
    current = {k: v.detach().clone() for k, v in tensors.items()}
    try:
        with torch.no_grad():
            for k, v in tensors.items():
                v.data.copy_(initial[k])
        yield
    finally:
        with torch.no_grad():
            for k, v in tensors.items():
                v.data.copy_(current[k])


def resolve_probes(probes: Any, trainer: Any = None, sources: Any = None) -> None:
    """Probes are chosen from the batches a monitor took (:meth:`VizCallback._take_probes`); this never reads data."""
    if not probes.is_resolved:
        raise ValueError("no probes yet: no batch of the Trainer has been seen (data is taken, never drawn).")
