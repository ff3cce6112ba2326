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
from lightning_viz._diagnosis_records import RecordReader, disabled_checks
from lightning_viz.callbacks.base import VizCallback

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl

log = logging.getLogger("lightning_viz")

_VAL, _LOSS, _ACC = {"val", "valid", "validation"}, {"loss"}, {"acc", "accuracy"}


class DiagnosisMonitor(VizCallback):
    """Turn the suite's statistics into findings: divergence, dead filters/units, not learning, over-fitting,
    under-training (the rules and how they judge are in :mod:`lightning_viz.diagnosis`); with a DynamicsMonitor in the
    callbacks also vanishing and exploding gradients, unchanged trainable weights, a BatchNorm train/eval mismatch,
    saturated activations and a loss at initialisation off its chance level; and an oscillating training loss
    (:mod:`lightning_viz.diagnosis_rules`). One cause, one finding: consequences fold into their cause
    (:data:`lightning_viz.diagnosis.EXPLAINS`).

    What it reads: the training loss from what ``training_step`` returns (averaged per epoch, so it does not depend
    on how you log); the validation loss (and accuracy, if logged) from the metrics after each validation run that
    actually ran; dead units from the ``ActivationStats`` records an ActivationMonitor publishes; k-NN accuracy from an
    EmbeddingMonitor's ``EmbeddingQuality``; gradients, updates, BatchNorm and saturation records from a
    DynamicsMonitor. It imports no other monitor and never runs a forward pass.

    When: every ``every_n_epochs`` it judges the epoch and writes the panel at that epoch's step, once every monitor
    has published (at the next epoch's start, whatever the order of ``callbacks``). At the end of training - whatever
    ended it: ``max_epochs``, ``max_steps``, ``EarlyStopping`` - it gives the end-of-run verdict (under-training, not
    learning) at the final global step. Written: a Markdown panel ``diagnosis/findings`` (findings, evidence, the
    real tags to look at, remedies, the checks that are switched off and why), scalars ``diagnosis/findings`` (count),
    ``diagnosis/<kind>`` (0/1 per kind), ``diagnosis/train_loss``, ``diagnosis/weight_norm``; a log line when a finding
    appears and when it is resolved.

    Args:
        train_loss: a logged training-loss metric, used only when ``training_step`` returns no loss.
        val_loss: the logged validation loss (default ``val_loss``; other names such as ``val/loss``, ``loss/val``,
            ``valid_loss`` are found too). Without one the over-fitting finding is off (said once, and on the panel).
        num_classes: classes of the classifier (default: the output width of the model's last Linear layer); the
            chance-level loss is ``ln(num_classes)``. ``0`` switches the chance-level check off.
        dead_threshold: layers whose dead share rose at least this much above where they started are flagged
            (default 0.2); ``dead_critical`` (default 0.5) makes it critical.
        overfit_patience, overfit_tolerance: epochs the validation loss must stay above its best (default 3), and by
            at least this share of the best loss (default 0.05), besides 3 times its noise.
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
        num_classes: int | None = None,
        dead_threshold: float = 0.2,
        dead_critical: float = 0.5,
        overfit_patience: int = 3,
        overfit_tolerance: float = 0.05,
        explode_factor: float = 10.0,
        **kwargs: Any,
    ) -> None:
        kwargs.update(log_baseline=False, budget=None)  # every epoch's verdict, whatever the suite's budget (cheap)
        super().__init__(**kwargs)
        check.metric_name("train_loss", train_loss)
        check.metric_name("val_loss", val_loss)
        if num_classes is not None:
            check.integer("num_classes", num_classes)
            if num_classes < 0 or num_classes == 1:
                raise ValueError(f"`num_classes` must be 0 (off) or at least 2, got {num_classes}.")
        check.fraction("dead_threshold", dead_threshold)
        check.fraction("dead_critical", dead_critical)
        if dead_critical < dead_threshold:
            raise ValueError(f"`dead_critical` ({dead_critical}) must be at least `dead_threshold` ({dead_threshold}).")
        check.positive_int("overfit_patience", overfit_patience)
        check.fraction("overfit_tolerance", overfit_tolerance, high=10.0)
        check.number("explode_factor", explode_factor, low=1.0, low_open=True)
        self.train_loss, self.val_loss, self.num_classes = train_loss, val_loss, num_classes
        self.dead_threshold, self.dead_critical = float(dead_threshold), float(dead_critical)
        self.overfit_patience, self.overfit_tolerance = overfit_patience, float(overfit_tolerance)
        self.explode_factor = float(explode_factor)
        self._reset()
        #: The current findings.
        self.findings: list[D.Finding] = []

    def _reset(self) -> None:
        self._history: dict[str, list[tuple[int, float]]] = {
            k: [] for k in ("train_loss", "val_loss", "val_acc", "weight_norm")
        }
        self._records = RecordReader()
        self._lr: list[tuple[int, float, float, float]] = []  # (epoch, first, highest, last learning rate)
        self._lr_epoch: list[float] = []
        self._initial_loss: float | None = None
        self._initial_norm: float | None = None
        self._nonfinite: int | None = None
        self._batch_sum: Any = 0.0  # a tensor on the loss's device once a batch ended
        self._batch_sq: Any = 0.0
        self._batch_count = 0
        self._sem = 0.0
        self._tags: dict[str, str | None] = {"val": None, "acc": None}
        self._active_keys: dict[str, int] = {}
        self._resolved: list[str] = []
        self._pending: int | None = None
        self._final = False
        self._chance_classes: int | None = None
        self._early_stopping = False
        self._constant: tuple[str, ...] = ()
        self._val_runs, self._val_every = 0, 1

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._reset()
        self.findings = []
        linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        width = linears[-1].out_features if linears else None
        self._chance_classes = self.num_classes if self.num_classes is not None else width
        if not self._chance_classes or self._chance_classes < 2:
            self._chance_classes = None
        self._val_every = int(getattr(trainer, "check_val_every_n_epoch", 1) or 1)
        self._early_stopping = any("EarlyStopping" in type(cb).__name__ for cb in trainer.callbacks)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The weights the first optimizer step starts from: taken here, after a checkpoint restore and after weights
        # loaded in the user's `setup` / `on_fit_start`, never at setup. A resumed run keeps what its state saved.
        if self._active and int(trainer.global_step) == 0:
            self._initial_norm = D.weight_norm(pl_module)
            self._constant = tuple(
                name
                for name, m in pl_module.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and m.weight.numel() > 1
                and bool((m.weight.detach() == m.weight.detach().flatten()[0]).all())
            )
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the learning rate this batch's step uses (schedulers step after the batch), so a restart is no oscillation
        if self._active and (lr := D.learning_rate(trainer)) is not None:
            first, peak = self._lr_epoch[:2] if self._lr_epoch else (lr, lr)
            self._lr_epoch = [first, max(peak, lr), lr]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # summed on the loss's device: no synchronisation per step; read once per epoch
        value = loss.detach().float().reshape(())
        if self._initial_loss is None and not self._history["train_loss"] and self._batch_count == 0:
            self._initial_loss = float(value)  # computed before the first update: the loss at initialisation
        self._batch_sum = self._batch_sum + value
        self._batch_sq = self._batch_sq + value * value
        self._batch_count += 1

    def _close_epoch(self, trainer: Any, pl_module: nn.Module, epoch: int) -> None:
        """The epoch's mean training loss (from the batches' outputs, else the logged metric) and the weights."""
        n = self._batch_count
        if n:
            mean = float(self._batch_sum) / n
            if n > 1 and math.isfinite(mean):
                self._sem = math.sqrt(max(float(self._batch_sq) / n - mean * mean, 0.0) / (n - 1))
        else:
            key = D.find_metric(trainer.callback_metrics, self.train_loss, {"train", "training"}, _LOSS)
            mean = float(trainer.callback_metrics[key]) if key else None
        self._batch_sum, self._batch_sq, self._batch_count = 0.0, 0.0, 0
        norm = D.weight_norm(pl_module)
        if mean is not None:
            history = self._history["train_loss"]
            history[:] = [p for p in history if p[0] != epoch] + [(epoch, mean)]
        if self._nonfinite is None and ((mean is not None and not math.isfinite(mean)) or not math.isfinite(norm)):
            self._nonfinite = epoch
        self._history["weight_norm"].append((epoch, norm))
        if self._lr_epoch:
            self._lr = [p for p in self._lr if p[0] != epoch] + [(epoch, *self._lr_epoch)]  # type: ignore[list-item]
        self._lr_epoch = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._active:
            return
        epoch = trainer.current_epoch + 1
        self._val_runs += 1
        metrics = trainer.callback_metrics
        self._tags["val"] = D.find_metric(metrics, self.val_loss, _VAL, _LOSS) or self._tags["val"]
        self._tags["acc"] = D.find_metric(metrics, None, _VAL, _ACC) or self._tags["acc"]
        for name, key in (("val_loss", self._tags["val"]), ("val_acc", self._tags["acc"])):
            if key is not None and key in metrics:
                history = self._history[name]
                history[:] = [p for p in history if p[0] != epoch] + [(epoch, float(metrics[key]))]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._active:
            return
        self._close_epoch(trainer, pl_module, trainer.current_epoch + 1)
        if self._is_log_epoch(trainer):
            # judged once every monitor has published: at the next epoch's start (same step) or at the end of fit
            self._pending = trainer.current_epoch + 1

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            epochs_done, self._pending = self._pending, None
            self._run(trainer, pl_module, epochs_done=epochs_done)
        super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        done = max((e for e, _ in self._history["train_loss"]), default=int(trainer.current_epoch))
        if self._batch_count:  # a fit stopped inside an epoch (max_steps)
            done += 1
            self._close_epoch(trainer, pl_module, done)
        self._pending, self._final = None, True
        try:
            self._run(trainer, pl_module, epochs_done=done)
        finally:
            self._final = False

    def evidence(self, epochs_done: int, final: bool = False) -> D.Evidence:
        """What the rules see now (public, so a user's or another engineer's rule can be tried on a run)."""
        classes = self._chance_classes
        return D.Evidence(
            epoch=epochs_done,
            final=final,
            train_loss=list(self._history["train_loss"]),
            initial_loss=self._initial_loss,
            train_loss_sem=self._sem,
            val_loss=list(self._history["val_loss"]),
            val_acc=list(self._history["val_acc"]),
            num_classes=classes,
            chance_loss=math.log(classes) if classes else None,
            nonfinite_epoch=self._nonfinite,
            weight_norm=list(self._history["weight_norm"]),
            learning_rate=list(self._lr),
            initial_norm=self._initial_norm,
            constant_init=self._constant,
            dead=self._records.dead_histories(),
            knn=list(self._records.knn),
            dynamics=RecordReader.dynamics(self._bus),
            **RecordReader.attention(self._bus),
            val_tag=self._tags["val"],
            early_stopping=self._early_stopping,
            dead_threshold=self.dead_threshold,
            dead_critical=self.dead_critical,
            overfit_patience=self.overfit_patience,
            overfit_min_rise=self.overfit_tolerance,
            explode_factor=self.explode_factor,
        )

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        self._records.gather(self._bus, pl_module)
        disabled = disabled_checks(
            self._bus,
            self._records,
            val_tag=self._tags["val"],
            val_name=self.val_loss,
            train_name=self.train_loss,
            val_expected=bool(self._val_runs or epochs_done >= self._val_every or self._final),
            has_train_loss=bool(self._history["train_loss"]),
            epochs_done=epochs_done,
            chance_classes=self._chance_classes,
            warn=self._warn_once,
        )
        findings = D.diagnose(self.evidence(epochs_done, final=self._final))
        self._announce(trainer, findings, epochs_done)
        sink = self._sink
        assert sink is not None
        panel = D.to_markdown(
            findings, epochs_done, step, final=self._final, resolved=self._resolved, disabled=disabled
        )
        sink.text("diagnosis/findings", panel, step)
        kinds = [f.kind for f in findings]
        scalars = {"diagnosis/findings": float(len(findings))}
        scalars.update({f"diagnosis/{k}": float(k in kinds) for k in D.CAUSE_ORDER})
        if self._history["train_loss"] and self._history["train_loss"][-1][0] == epochs_done:
            scalars["diagnosis/train_loss"] = self._history["train_loss"][-1][1]
        if self._history["weight_norm"]:
            scalars["diagnosis/weight_norm"] = self._history["weight_norm"][-1][1]
        sink.scalars(scalars, step)

    def _announce(self, trainer: Any, findings: list[D.Finding], epoch: int) -> None:
        """Say in the log when a finding appears and when one is resolved."""
        now, name = {f.key: f for f in findings}, D.epoch_name(epoch)
        loud = getattr(trainer, "is_global_zero", True)
        for key, finding in now.items():
            if key not in self._active_keys:
                self._active_keys[key] = epoch
                if loud:
                    log.warning("lightning_viz diagnosis, %s (%s): %s", name, finding.severity, finding.summary)
        for key in [k for k in self._active_keys if k not in now]:
            since, kind = D.epoch_name(self._active_keys.pop(key)), key.split(":")[0].replace("_", " ")
            if self._final and kind in ("undertraining", "not learning"):
                continue
            self._resolved.append(f"{kind} (seen from {since}, gone at {name})")
            if loud:
                log.warning("lightning_viz diagnosis, %s: %s is resolved (seen since %s)", name, kind, since)
        self.findings = findings

    def _extra_state(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self._history.items()},
            **self._records.state_dict(),
            "initial_norm": self._initial_norm,
            "initial_loss": self._initial_loss,
            "nonfinite": self._nonfinite,
            "constant": list(self._constant),
            "seen": dict(self._active_keys),
            "resolved": list(self._resolved),
            "tags": dict(self._tags),  # the metric names found: a resumed fit may start between validations
            "val_runs": self._val_runs,
            "learning_rate": list(self._lr),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._history.update({k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()})
        self._records.load_state_dict(state)
        self._initial_norm = state.get("initial_norm", self._initial_norm)
        self._initial_loss = state.get("initial_loss", self._initial_loss)
        self._nonfinite = state.get("nonfinite")
        self._constant = tuple(state.get("constant", self._constant))
        self._active_keys = dict(state.get("seen", {}))
        self._resolved = list(state.get("resolved", []))
        self._tags.update(state.get("tags", {}))
        self._val_runs = int(state.get("val_runs", self._val_runs))
        self._lr = [tuple(p) for p in state.get("learning_rate", [])]  # type: ignore[misc]
