"""DiagnosisMonitor: says in words what the other monitors' numbers mean, with the evidence."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _validate as check
from lightning_viz import diagnosis as D
from lightning_viz._layers import layers_of_kind
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import filters as F
from lightning_viz.records import ActivationStats, EmbeddingQuality, FilterStats

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl

log = logging.getLogger("lightning_viz")


class DiagnosisMonitor(VizCallback):
    """Turn the suite's statistics into findings: dead filters, over-fitting, under-training, divergence.

    How the monitors share what they measured: each publishes typed records on the Trainer's record bus
    (:mod:`lightning_viz.records`: ``FilterStats`` per layer, ``ActivationStats`` per call site, ``EmbeddingQuality``);
    the diagnosis reads the latest ones there - it imports no other monitor and never runs a forward pass.
    Placed after them in ``callbacks`` (as ``default_suite`` does) it reads each epoch's numbers in the same hook;
    placed before them, it waits for the next hook at the same step. Without a FilterMonitor it computes the first
    conv layer's filter statistics itself (cheap: weights only); without an ActivationMonitor there is no dead-filter
    finding; losses come from ``trainer.callback_metrics``.

    Under-training is judged at the last epoch of the fit (a loss still falling steeply mid-run is just training).
    Each epoch it writes a Markdown panel ``diagnosis/findings`` (severity, since which epoch, the evidence, the
    TensorBoard tags to look at, usual remedies), scalars ``diagnosis/findings`` (count), ``diagnosis/dead_filters``
    (sites flagged), ``diagnosis/overfitting``, ``diagnosis/undertraining``, ``diagnosis/divergence`` (0/1), and a
    log line (logger ``lightning_viz``) when a finding first appears.

    Args:
        train_loss, val_loss: names of the logged losses in ``trainer.callback_metrics`` (``<name>_epoch`` is tried
            too). Without a validation loss the over-fitting finding is off (said once).
        dead_threshold: a site is flagged when at least this share of its channels is dead (default 0.2: a fifth of
            the filters doing nothing is a waste worth a look); ``dead_critical`` (default 0.5) makes it critical.
        overfit_patience: epochs the validation loss must stay above its best (default 2; shorter catches noise).
        overfit_tolerance: by more than this relative margin (default 0.02, i.e. 2 %).
        undertrain_slope: the training loss is "still falling steeply" when, over the last two epochs, it drops per
            epoch by more than this share of its first logged value (default 0.05: 5 % of the starting loss per
            epoch is still fast progress; a levelled-off loss moves by far less).
        noise_threshold: first-layer filters are "still noisy" above this noise score (default 0.8; 1 = random).
        distance_threshold: ... and "close to init" below this relative distance from the initial weights (0.1).
        explode_factor: weights are "exploding" beyond this multiple of their initial total norm (default 10).
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``seed``, ``max_overhead``.
    """

    monitor_name = "diagnosis"
    default_every_n_epochs = 1

    def __init__(
        self,
        *,
        train_loss: str = "train_loss",
        val_loss: str = "val_loss",
        dead_threshold: float = 0.2,
        dead_critical: float = 0.5,
        overfit_patience: int = 2,
        overfit_tolerance: float = 0.02,
        undertrain_slope: float = 0.05,
        noise_threshold: float = 0.8,
        distance_threshold: float = 0.1,
        explode_factor: float = 10.0,
        **kwargs: Any,
    ) -> None:
        kwargs["log_baseline"] = False
        super().__init__(**kwargs)
        check.metric_name("train_loss", train_loss)
        check.metric_name("val_loss", val_loss)
        check.fraction("dead_threshold", dead_threshold)
        check.fraction("dead_critical", dead_critical)
        if dead_critical < dead_threshold:
            raise ValueError(f"`dead_critical` ({dead_critical}) must be at least `dead_threshold` ({dead_threshold}).")
        check.positive_int("overfit_patience", overfit_patience)
        check.fraction("overfit_tolerance", overfit_tolerance, high=10.0)
        check.fraction("undertrain_slope", undertrain_slope)
        check.fraction("noise_threshold", noise_threshold, high=2.0)
        check.fraction("distance_threshold", distance_threshold, high=100.0)
        check.number("explode_factor", explode_factor, low=1.0, low_open=True)
        self.train_loss, self.val_loss = train_loss, val_loss
        self.dead_threshold, self.dead_critical = float(dead_threshold), float(dead_critical)
        self.overfit_patience, self.overfit_tolerance = overfit_patience, float(overfit_tolerance)
        self.undertrain_slope = float(undertrain_slope)
        self.noise_threshold, self.distance_threshold = float(noise_threshold), float(distance_threshold)
        self.explode_factor = float(explode_factor)
        self._history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": [], "knn": []}
        self._dead: dict[str, list[tuple[int, float]]] = {}
        self._dead_counts: dict[str, dict[int, int]] = {}
        self._initial_norm: float | None = None
        self._first_conv: str | None = None
        self._own_initial: torch.Tensor | None = None
        self._seen: dict[str, int] = {}
        self._defer = False
        self._pending: int | None = None
        #: The current findings.
        self.findings: list[D.Finding] = []

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        callbacks = trainer.callbacks
        # The diagnosis must read each epoch's numbers after the monitors made them. Placed after them in
        # `callbacks` (as in default_suite), it runs in on_train_epoch_end; placed before, it waits for the next
        # hook at the same step (the next epoch's start, or the end of fit). The list is not reordered: Lightning is
        # iterating over it when setup runs.
        position = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        self._defer = any(isinstance(cb, VizCallback) for cb in callbacks[position + 1 :])
        convs = layers_of_kind(pl_module, (nn.Conv2d,))
        self._first_conv = next(iter(convs), None)
        if self._first_conv is not None and self._own_initial is None:
            self._own_initial = convs[self._first_conv].weight.detach().cpu().clone()
        if self._initial_norm is None:
            self._initial_norm = D.weight_norm(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._is_log_epoch(trainer):
            return
        if self._defer:
            self._pending = trainer.current_epoch + 1
        else:
            self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def _run_pending(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            epochs_done, self._pending = self._pending, None
            self._run(trainer, pl_module, epochs_done=epochs_done)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_pending(trainer, pl_module)
        super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_pending(trainer, pl_module)

    def _metric(self, trainer: Any, name: str) -> float | None:
        metrics = trainer.callback_metrics
        for key in (name, f"{name}_epoch"):
            if key in metrics:
                return float(metrics[key])
        return None

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        train, dead_sites = self._gather_histories(trainer, epochs_done)
        findings = self._judge(trainer, pl_module, epochs_done, train, dead_sites)
        self._announce(trainer, findings, epochs_done)
        self._write(findings, epochs_done, step)

    def _gather_histories(self, trainer: Any, epoch: int) -> tuple[float | None, list[str]]:
        """Append this epoch's losses and the bus's latest records to the histories.

        Returns the training loss (``None`` when not logged) and the activation sites with a dead-channel count.
        """
        train = self._metric(trainer, self.train_loss)
        val = self._metric(trainer, self.val_loss)
        if train is not None:
            self._history["train_loss"].append((epoch, train))
        if val is not None:
            self._history["val_loss"].append((epoch, val))
        elif epoch >= 1:
            self._warn_once(
                "no val",
                f"DiagnosisMonitor: no `{self.val_loss}` among the logged metrics (no validation loop, or another "
                "name: pass `val_loss=...`), so over-fitting is not diagnosed.",
            )
        if train is None and epoch >= 1:
            self._warn_once(
                "no train",
                f"DiagnosisMonitor: no `{self.train_loss}` among the logged metrics; pass `train_loss=...` (log it "
                "with on_epoch=True) to diagnose over- and under-training.",
            )
        if not self._bus.produced(ActivationStats):
            self._warn_once(
                "no activations",
                "DiagnosisMonitor: no ActivationMonitor among the callbacks, so dead filters are not diagnosed. "
                "Add one (lightning_viz.default_suite() has it).",
            )
        dead_sites = []
        for site, stats in self._bus.latest(ActivationStats).items():
            if stats.dead_fraction is None or stats.dead_count is None:
                continue
            dead_sites.append(site)
            history = self._dead.setdefault(site, [])
            if not history or history[-1][0] != stats.epoch:
                history.append((stats.epoch, stats.dead_fraction))
                self._dead_counts.setdefault(site, {})[stats.epoch] = stats.dead_count
        for quality in self._bus.latest(EmbeddingQuality).values():
            if quality.knn_accuracy is None:
                continue
            if not self._history["knn"] or self._history["knn"][-1][0] != quality.epoch:
                self._history["knn"].append((quality.epoch, quality.knn_accuracy))
        return train, dead_sites

    def _judge(
        self, trainer: Any, pl_module: nn.Module, epoch: int, train: float | None, dead_sites: list[str]
    ) -> list[D.Finding]:
        """Apply the rules of :mod:`lightning_viz.diagnosis` to the histories and the model's weights."""
        findings = [
            D.dead_filters(
                site,
                self._dead[site],
                self._dead_counts[site],
                threshold=self.dead_threshold,
                critical=self.dead_critical,
            )
            for site in dead_sites
        ]
        findings.append(
            D.overfitting(
                self._history["train_loss"],
                self._history["val_loss"],
                patience=self.overfit_patience,
                tolerance=self.overfit_tolerance,
                knn=self._history["knn"],
            )
        )
        # Mid-run, a falling loss is simply training; "under-trained" is a verdict on where the run ended (in
        # on_fit_end the run is over whatever the reason).
        final = bool(trainer.should_stop) or (
            trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        )
        if final:
            noise, distance = self._filter_stats(pl_module)
            findings.append(
                D.undertraining(
                    self._history["train_loss"],
                    noise_score=noise,
                    distance=distance,
                    slope=self.undertrain_slope,
                    noise_threshold=self.noise_threshold,
                    distance_threshold=self.distance_threshold,
                    final=final,
                )
            )
        findings.append(
            D.divergence(
                epoch,
                loss_finite=train is None or math.isfinite(train),
                weights_finite=all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()),
                weight_norm=D.weight_norm(pl_module),
                initial_norm=self._initial_norm or 0.0,
                factor=self.explode_factor,
            )
        )
        return [f for f in findings if f is not None]

    def _announce(self, trainer: Any, findings: list[D.Finding], epoch: int) -> None:
        """Keep the epoch each finding was first seen, and say it once in the log."""
        for finding in findings:
            if finding.key not in self._seen:
                self._seen[finding.key] = epoch
                if trainer.is_global_zero:
                    log.warning("lightning_viz diagnosis (%s): %s", finding.severity, finding.summary)
        self.findings = findings

    def _write(self, findings: list[D.Finding], epoch: int, step: int) -> None:
        sink = self._sink
        assert sink is not None
        kinds = [f.kind for f in findings]
        sink.text("diagnosis/findings", D.to_markdown(findings, epoch, step), step)
        sink.scalars(
            {
                "diagnosis/findings": len(findings),
                "diagnosis/dead_filters": kinds.count("dead_filters"),
                "diagnosis/overfitting": float("overfitting" in kinds),
                "diagnosis/undertraining": float("undertraining" in kinds),
                "diagnosis/divergence": float("divergence" in kinds),
            },
            step,
        )

    def _filter_stats(self, pl_module: nn.Module) -> tuple[float | None, float | None]:
        published = self._bus.latest(FilterStats).get(self._first_conv or "")
        if published is not None:
            return published.noise_score, published.distance_from_init
        if self._first_conv is None or self._own_initial is None:
            return None, None
        weight = pl_module.get_submodule(self._first_conv).weight.detach().cpu()
        stats = F.filter_statistics(weight, self._own_initial)
        return float(stats["noise_score"].nanmean()), float(stats["distance_from_init"].mean())

    def _extra_state(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self._history.items()},
            "dead": {k: list(v) for k, v in self._dead.items()},
            "dead_counts": {k: dict(v) for k, v in self._dead_counts.items()},
            "initial_norm": self._initial_norm,
            "own_initial": self._own_initial,
            "seen": dict(self._seen),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._history.update({k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()})
        self._dead = {k: [tuple(p) for p in v] for k, v in state.get("dead", {}).items()}
        self._dead_counts = {k: {int(e): int(c) for e, c in v.items()} for k, v in state.get("dead_counts", {}).items()}
        self._initial_norm = state.get("initial_norm", self._initial_norm)
        if state.get("own_initial") is not None:
            self._own_initial = state["own_initial"]
        self._seen = dict(state.get("seen", {}))
