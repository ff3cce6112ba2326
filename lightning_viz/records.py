"""What each monitor measured, as small typed records that other callbacks read. Public API.

Every monitor publishes one frozen record per subject (a layer, an activation call site) and logged step on the
Trainer's :class:`RecordBus`. The :class:`~lightning_viz.DiagnosisMonitor` reads them from there, and so can your own
callback — no monitor imports another, and a renamed statistic is a type error, not a silently missing dict key::

    from lightning_viz.records import ActivationStats, bus_for

    class DeadAlarm(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            for site, stats in bus_for(trainer).latest(ActivationStats).items():
                if stats.dead_fraction is not None and stats.dead_fraction > 0.5:
                    print(f"{site}: {stats.dead_count} dead channels")

Records are published on global rank zero (where the monitors compute them). ``step`` is ``trainer.global_step`` and
``epoch`` the number of training epochs completed when the numbers were taken (0 for the untrained baseline).
Missing values (a statistic that is not defined, or NaN weights) are ``None``, never a made-up number.
"""

from __future__ import annotations

import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = [
    "ActivationStats",
    "EmbeddingQuality",
    "ExemplarStats",
    "FeatureVisStats",
    "FilterStats",
    "Record",
    "RecordBus",
    "bus_for",
]


@dataclass(frozen=True)
class Record:
    """Fields every record has."""

    #: ``trainer.global_step`` when the numbers were taken.
    step: int
    #: Training epochs completed (0: the untrained baseline).
    epoch: int
    #: What the numbers are about: a layer name, an activation call site (``layer1.0.relu#2``); ``""`` for the model.
    subject: str


@dataclass(frozen=True)
class FilterStats(Record):
    """A convolution layer's weights (published by :class:`~lightning_viz.FilterMonitor`); means over its filters."""

    #: Mean L2 norm of the filters.
    weight_norm: float | None
    #: Mean noise score: about 1 = as rough as random noise, well below 1 = smooth, structured filters.
    noise_score: float | None
    #: Mean ``||W - W0|| / ||W0||`` against the weights at the start of the fit; ``None`` when W0 is not known.
    distance_from_init: float | None
    #: The colour scale the filters were drawn with (largest ``|w|`` so far, or the fixed ``scale``).
    scale: float
    #: Whether any weight is NaN or infinite.
    nonfinite: bool


@dataclass(frozen=True)
class ActivationStats(Record):
    """An activation call site over a validation epoch (published by :class:`~lightning_viz.ActivationMonitor`)."""

    #: Number of channels (conv) or hidden units (linear).
    channels: int
    #: Share of values <= 0.
    sparsity: float
    #: Mean activation.
    mean: float
    #: Channels that never fired on any sample; ``None`` where "dead" is not defined (not a ReLU-family activation).
    dead_count: int | None = None
    #: ``dead_count / channels``; ``None`` where "dead" is not defined.
    dead_fraction: float | None = None
    #: Indices of the dead channels.
    dead_channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbeddingQuality(Record):
    """How well a layer's code separates the classes (published by :class:`~lightning_viz.EmbeddingMonitor`)."""

    #: Leave-one-out k-NN accuracy of the code (cosine).
    knn_accuracy: float | None
    #: Silhouette score of the classes in the code (cosine), in [-1, 1].
    silhouette: float | None


@dataclass(frozen=True)
class ExemplarStats(Record):
    """The top exemplars of a layer's channels (published by :class:`~lightning_viz.ExemplarMonitor`)."""

    #: The channels shown.
    channels: tuple[int, ...]
    #: Dataset indices of the top exemplars, shape (channels, top_k); -1 where fewer were seen.
    ids: torch.Tensor
    #: Their spatial-maximum activations, shape (channels, top_k).
    scores: torch.Tensor
    #: Receptive-field boxes per channel and exemplar, ``(top, left, bottom, right)`` in input pixels.
    boxes: Any = None


@dataclass(frozen=True)
class FeatureVisStats(Record):
    """Feature-visualisation objective values of a layer (published by :class:`~lightning_viz.FeatureVisMonitor`)."""

    #: The channels (or classes) optimised.
    channels: tuple[int, ...]
    #: Objective value per image at the starting noise.
    initial_objective: torch.Tensor
    #: Objective value per image after optimisation.
    final_objective: torch.Tensor


R = TypeVar("R", bound=Record)


class RecordBus:
    """The records published during one Trainer's runs: latest per subject, a bounded history, subscribers.

    Get a Trainer's bus with :func:`bus_for`. ``history_length`` records are kept per (type, subject).
    """

    def __init__(self, history_length: int = 256) -> None:
        self._history: dict[type, dict[str, deque]] = defaultdict(dict)
        self._subscribers: dict[type, list[Callable[[Record], None]]] = defaultdict(list)
        self._producers: dict[type, set[str]] = defaultdict(set)
        self._history_length = history_length

    def announce(self, kind: type[Record], producer: str) -> None:
        """Say that ``producer`` (a monitor's name) publishes records of ``kind`` in this run."""
        self._producers[kind].add(producer)

    def produced(self, kind: type[Record]) -> bool:
        """Whether some callback announced that it publishes ``kind``."""
        return bool(self._producers.get(kind))

    def publish(self, record: Record) -> None:
        """Keep ``record`` and hand it to the subscribers of its type."""
        if not isinstance(record, Record):
            raise TypeError(f"only lightning_viz.records.Record instances can be published, got {type(record)}.")
        kind = type(record)
        history = self._history[kind].setdefault(record.subject, deque(maxlen=self._history_length))
        if history and history[-1].step == record.step:
            history[-1] = record  # a step is published once per subject; a republish replaces it
        else:
            history.append(record)
        for callback in list(self._subscribers.get(kind, ())):
            callback(record)

    def latest(self, kind: type[R]) -> dict[str, R]:
        """The newest record of ``kind`` per subject."""
        return {subject: records[-1] for subject, records in self._history.get(kind, {}).items() if records}

    def history(self, kind: type[R], subject: str = "") -> list[R]:
        """Records of ``kind`` about ``subject``, oldest first."""
        return list(self._history.get(kind, {}).get(subject, ()))

    def subscribe(self, kind: type[R], callback: Callable[[R], None]) -> Callable[[], None]:
        """Call ``callback(record)`` for each new record of ``kind``; returns a function that unsubscribes."""
        self._subscribers[kind].append(callback)  # type: ignore[arg-type]

        def unsubscribe() -> None:
            if callback in self._subscribers.get(kind, []):
                self._subscribers[kind].remove(callback)  # type: ignore[arg-type]

        return unsubscribe

    def clear(self) -> None:
        """Forget every record (a new fit starts a new history); subscribers and producers stay."""
        self._history.clear()


_BUSES: weakref.WeakKeyDictionary[Any, RecordBus] = weakref.WeakKeyDictionary()


def bus_for(trainer: Any) -> RecordBus:
    """The :class:`RecordBus` of ``trainer`` (one per Trainer, created on first use, gone with the Trainer)."""
    bus = _BUSES.get(trainer)
    if bus is None:
        bus = _BUSES[trainer] = RecordBus()
    return bus


# ---- attention (AttentionMonitor) ----


@dataclass(frozen=True)
class AttentionStats(Record):
    """One attention layer's weights on the probe images (published by :class:`~lightning_viz.AttentionMonitor`).

    Attention collapse (every query attending to one token) shows as ``normalized_entropy`` near 0 and
    ``top_key_share`` near 1; uniform attention as ``normalized_entropy`` 1 and ``top_key_share`` ``1 / tokens``.
    """

    #: Number of heads.
    heads: int
    #: Number of key tokens.
    tokens: int
    #: Mean entropy of the attention rows in nats, over heads, queries and probe images.
    entropy: float
    #: ``entropy / log(tokens)``, in [0, 1]; ``None`` for a single token.
    normalized_entropy: float | None
    #: Mean entropy per head, nats.
    head_entropy: tuple[float, ...]
    #: Share of the attention that goes to the single most-attended token (mean over heads and probes).
    top_key_share: float


__all__ += ["AttentionStats"]

# ------------------------------------------------------------------------------------------------ training dynamics
# Published by :class:`~lightning_viz.callbacks.dynamics_monitor.DynamicsMonitor` (issue #16); read by the rules in
# :mod:`lightning_viz.diagnosis_rules`.
__all__ += ["BatchNormProbe", "BatchNormStats", "GradientStats", "LossStats", "SaturationStats", "UpdateStats"]


@dataclass(frozen=True)
class GradientStats(Record):
    """A layer's gradient norm over the sampled optimizer steps of one logged epoch (read after AMP unscaling, before
    gradient clipping). ``subject`` is the layer (a module that owns parameters)."""

    #: Position of the layer in module order (0 = nearest the input, as ``named_modules`` lists it).
    order: int
    #: Whether the layer has a weight matrix or kernel (a parameter with 2 or more dimensions: conv, linear).
    matrix: bool
    #: Median ``||grad||`` of the layer's parameters over the sampled steps; ``None`` when never finite.
    grad_norm: float | None
    #: Largest finite ``||grad||`` over the sampled steps.
    grad_norm_max: float | None
    #: Sampled steps where the norm was NaN/Inf (AMP skips those steps).
    nonfinite_steps: int
    #: Sampled optimizer steps behind the numbers.
    samples: int


@dataclass(frozen=True)
class UpdateStats(Record):
    """How much an optimizer step changes a layer, and which of its parameters never change."""

    #: Median ``||w_after - w_before|| / ||w_before||`` over the sampled steps (rule of thumb: about 1e-3).
    update_ratio: float | None
    #: ``||w||`` of the layer's trainable parameters now.
    weight_norm: float | None
    #: Trainable (``requires_grad=True``) parameters whose values have not changed since the start of the fit.
    unchanged: tuple[str, ...] = ()
    #: ... of which never had a gradient above rounding noise at a sampled step (the loss does not reach them: an
    #: unused branch, or a bias right before BatchNorm, which cancels it).
    without_grad: tuple[str, ...] = ()
    #: Elements in the unchanged parameters.
    unchanged_elements: int = 0
    #: Parameters with ``requires_grad=False`` (frozen on purpose; never a finding).
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchNormStats(Record):
    """A BatchNorm layer's running statistics against the statistics of its inputs on the validation batches."""

    #: Mean over channels of ``|mu_data - mu_running| / sqrt(var_running + eps)``.
    mean_shift: float
    #: Mean over channels of ``|ln(var_data / var_running)|`` (``eps`` added to both).
    var_log_ratio: float
    #: The layer's momentum (``None``: cumulative average).
    momentum: float | None
    #: Validation batches behind the data statistics.
    batches: int


@dataclass(frozen=True)
class BatchNormProbe(Record):
    """A few validation samples scored in eval mode and with BatchNorm batch statistics (``subject`` is ``""``)."""

    eval_loss: float
    batch_stat_loss: float
    eval_accuracy: float
    batch_stat_accuracy: float
    #: Number of probe samples and classes.
    samples: int
    classes: int


@dataclass(frozen=True)
class SaturationStats(Record):
    """Share of a bounded activation's outputs in its flat tails over the validation batches."""

    #: ``"Tanh"``, ``"Sigmoid"``, ``"Hardtanh"``, ...
    kind: str
    saturated_fraction: float


@dataclass(frozen=True)
class LossStats(Record):
    """The training loss as ``training_step`` returned it (``subject`` is ``""``)."""

    #: Mean training loss over the epoch's batches.
    train_loss: float | None
    #: Loss of the first training batch of the fit (before any optimizer step).
    initial_loss: float | None
    #: Number of classes (from the model's logits on validation samples), when the model is a classifier.
    classes: int | None
    #: ``ln(classes)``: the cross-entropy of a uniform prediction.
    chance_loss: float | None


# ---- rank collapse of the token representations (AttentionMonitor, issue #19) ----
__all__ += ["TokenRankStats"]


@dataclass(frozen=True)
class TokenRankStats(Record):
    """How far a transformer block's token representations are from rank 1 on the probe images (published by
    :class:`~lightning_viz.AttentionMonitor`; ``subject`` is the block's attention module, as in
    :class:`AttentionStats`).

    Rank collapse (Dong et al., 2021: pure attention drives all tokens to one vector) shows as ``relative_residual``
    near 0 and ``effective_rank`` near 1 in the deep blocks.
    """

    #: Position of the block among the attention layers (0 = nearest the input), and their number.
    order: int
    layers: int
    #: The module whose output was measured (the block), or the attention module itself (then its input tokens).
    site: str
    #: Number of tokens and the width of their representations.
    tokens: int
    dim: int
    #: ``||X - mean token||_F / ||X||_F``, mean over the probes: 0 when all tokens are the same vector.
    relative_residual: float | None
    #: ``exp`` of the entropy of the normalised singular values of ``X`` (1: rank one), mean over the probes.
    effective_rank: float | None


# ---- every optimizer step's total gradient norm (DynamicsMonitor, issue #16: growth between sampled steps) ----
__all__ += ["GradientTrace"]


@dataclass(frozen=True)
class GradientTrace(Record):
    """The total gradient norm (all followed parameters) at every optimizer step since the last logged epoch
    (``subject`` is ``""``), read after AMP unscaling and before clipping."""

    #: Optimizer steps behind the numbers.
    steps: int
    #: Median and largest finite norm over those steps; ``peak`` is the 3rd largest (a lone spike is not a growth).
    median: float | None
    peak: float | None
    largest: float | None
    #: Steps whose norm was NaN/Inf.
    nonfinite_steps: int
    #: Median of the first finite norms of the fit (the reference for a growth).
    initial: float | None
