"""What the DiagnosisMonitor reads from the other monitors' records, and which of its checks are off for want of them.

Kept apart from the monitor so that it stays thin: the monitor schedules and writes; this module turns the
Trainer's :class:`~lightning_viz.records.RecordBus` into the histories the rules in :mod:`lightning_viz.diagnosis`
and :mod:`lightning_viz.diagnosis_rules` judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_viz import diagnosis as D
from lightning_viz.records import (
    ActivationStats,
    AttentionStats,
    BatchNormProbe,
    BatchNormStats,
    EmbeddingQuality,
    GradientStats,
    GradientTrace,
    LossStats,
    RecordBus,
    SaturationStats,
    TokenRankStats,
    UpdateStats,
)

#: Records a DynamicsMonitor publishes.
DYNAMICS = (GradientStats, UpdateStats, BatchNormStats, BatchNormProbe, SaturationStats, LossStats)


class RecordReader:
    """Dead-unit and k-NN histories gathered from the bus (one point per logged epoch), and the dynamics records."""

    def __init__(self) -> None:
        self.dead: dict[str, list[tuple[int, float, int, int]]] = {}
        self.units: dict[str, str] = {}
        self.knn: list[tuple[int, float]] = []

    def gather(self, bus: RecordBus, model: nn.Module) -> None:
        """Add the newest ActivationStats (dead units) and EmbeddingQuality (k-NN accuracy) records."""
        for site, stats in bus.latest(ActivationStats).items():
            if stats.dead_fraction is None or stats.dead_count is None:
                continue
            if site not in self.units:
                self.units[site] = D.unit_kind(model, site)
            history = self.dead.setdefault(site, [])
            if not history or history[-1][0] != stats.epoch:
                history.append((stats.epoch, stats.dead_fraction, stats.dead_count, stats.channels))
        for quality in bus.latest(EmbeddingQuality).values():
            if quality.knn_accuracy is not None and (not self.knn or self.knn[-1][0] != quality.epoch):
                self.knn.append((quality.epoch, quality.knn_accuracy))

    def dead_histories(self) -> dict[str, D.DeadHistory]:
        return {s: D.DeadHistory(self.units.get(s, "units"), tuple(h)) for s, h in self.dead.items()}

    @staticmethod
    def dynamics(bus: RecordBus) -> D.DynamicsEvidence | None:
        """The DynamicsMonitor's records (``None`` when no callback publishes them)."""
        if not any(bus.produced(kind) for kind in DYNAMICS):
            return None
        return D.DynamicsEvidence(
            gradients={s: bus.history(GradientStats, s) for s in bus.latest(GradientStats)},
            updates=list(bus.latest(UpdateStats).values()),
            bn_probe=bus.latest(BatchNormProbe).get(""),
            bn_layers=list(bus.latest(BatchNormStats).values()),
            saturation={s: bus.history(SaturationStats, s) for s in bus.latest(SaturationStats)},
            loss=bus.latest(LossStats).get(""),
            trace=bus.history(GradientTrace, ""),
            bn_probes=bus.history(BatchNormProbe, ""),
        )

    @staticmethod
    def attention(bus: RecordBus) -> dict[str, Any]:
        """The AttentionMonitor's records per layer, oldest first, as ``Evidence`` fields (empty when none)."""
        return {
            "attention": {s: bus.history(AttentionStats, s) for s in bus.latest(AttentionStats)},
            "token_rank": {s: bus.history(TokenRankStats, s) for s in bus.latest(TokenRankStats)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"dead": {k: list(v) for k, v in self.dead.items()}, "knn": list(self.knn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dead = {k: [tuple(p) for p in v] for k, v in state.get("dead", {}).items()}  # type: ignore[misc]
        self.knn = [tuple(p) for p in state.get("knn", state.get("history", {}).get("knn", []))]  # type: ignore[misc]


def disabled_checks(
    bus: RecordBus,
    reader: RecordReader,
    *,
    val_tag: str | None,
    val_name: str,
    train_name: str,
    val_expected: bool,
    has_train_loss: bool,
    epochs_done: int,
    chance_classes: int | None,
    warn: Callable[[str, str], None],
) -> list[str]:
    """The checks that are off, and why (each also warned once through ``warn(key, message)``).

    Args:
        val_expected: whether a validation run has happened or was due (so a missing loss is worth saying).
    """
    off = []
    if val_tag is None and val_expected:
        off.append(
            f"over-fitting: no validation loss among the logged metrics (looked for `{val_name}`, `val/loss`, "
            "`loss/val`, `valid_loss`, ...): log one in validation_step or pass `val_loss=...`"
        )
        warn("no val", f"DiagnosisMonitor: {off[-1]}; so over-fitting is not diagnosed.")
    if not has_train_loss and epochs_done >= 1:
        off.append(
            f"over-/under-training, not learning: `training_step` returned no loss and no `{train_name}` "
            "is logged: return the loss, or pass `train_loss=...`"
        )
        warn("no train", f"DiagnosisMonitor: {off[-1]}.")
    if not bus.produced(ActivationStats):
        off.append("dead filters/units: no ActivationMonitor among the callbacks (default_suite() has one)")
        warn("no activations", f"DiagnosisMonitor: {off[-1]}; so dead filters are not diagnosed.")
    elif not reader.dead and bus.latest(ActivationStats) and epochs_done >= 1:  # it reported, with no dead counts
        off.append(
            "dead filters/units: the ActivationMonitor reports no dead counts (no nn.ReLU-family modules: a model "
            "that applies `F.relu` needs `ActivationMonitor(pre_activation_layers=[...])`)"
        )
    if not bus.produced(EmbeddingQuality):
        off.append("k-NN accuracy as evidence of over-fitting: no EmbeddingMonitor among the callbacks")
    if not any(bus.produced(kind) for kind in DYNAMICS):
        off.append(
            "vanishing/exploding gradients, unchanged weights, BatchNorm mismatch, saturation, loss at "
            "initialisation: no DynamicsMonitor among the callbacks (default_suite() has one)"
        )
    if chance_classes is None:
        off.append("not learning (chance level): no classifier output width found; pass `num_classes=...`")
    return off
