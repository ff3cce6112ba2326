"""DynamicsMonitor: gradient flow, update ratios, unchanged weights, BatchNorm health, saturation, loss vs chance."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._budget import PACE, deferred_collection
from lightning_viz._inputs import single_input_pair
from lightning_viz._layers import model_device
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import dynamics as D
from lightning_viz.records import (
    BatchNormProbe,
    BatchNormStats,
    GradientStats,
    GradientTrace,
    LossStats,
    Record,
    SaturationStats,
    UpdateStats,
)

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl


class DynamicsMonitor(VizCallback):
    """How the network trains, read without touching it: gradient flow, update ratios, weights that never change,
    BatchNorm running statistics against the data, saturated activations, and the loss against chance level.

    - **Gradients** are read in ``on_before_optimizer_step`` (after AMP unscaling, before clipping; ``.grad`` is only
      read) every ``every_n_steps``-th optimizer step. Scalars ``dynamics/grad_norm/<layer>`` (median over the
      epoch's sampled steps) and one image per logged epoch, ``dynamics/gradient_flow``: layers (rows, input at the
      top) x sampled steps, on a log10 colour scale with its colour bar (the scale only ever widens, so epochs compare).
      The total norm of every step (one ``torch._foreach_norm``, kept on the device, read once per logged epoch; in
      a suite's budget every few steps where it costs more than its share, the fit's first 8 always) catches a growth
      between sampled steps: ``dynamics/grad_norm_total/{median,peak}``.
    - **Update ratio** ``||w_after - w_before|| / ||w_before||`` per layer at the sampled steps (one copy of the
      parameters, held through a training epoch): ``dynamics/update_ratio/<layer>`` (rule of thumb: about 1e-3).
    - **Unchanged weights**: ``requires_grad=True`` parameters unchanged since the fit started (left out of the
      optimizer, lr 0, no gradient), not frozen ones (``requires_grad=False``): ``dynamics/unchanged_parameters``.
    - **BatchNorm health**, in the validation pass the Trainer runs anyway (hooks removed at its end): each layer's
      running statistics against its inputs', ``dynamics/bn_{mean_shift,var_log_ratio}/<layer>`` (mean shift in
      running std); up to ``probe_samples`` validation samples (fixed for the run) scored in eval mode and with batch
      statistics, ``dynamics/bn_probe/{eval,batch_stat}_{loss,accuracy}`` (running statistics restored exactly).
    - **Saturation** of sigmoid / tanh / hardtanh / hardsigmoid / softsign modules: share of outputs in the flat
      tails (e.g. ``|tanh| > 0.97``) on the validation batches, ``dynamics/saturation/<module>``.
    - **Loss** as ``training_step`` returned it: the first batch's against ``ln(C)`` for a C-class classifier
      (``dynamics/initial_loss``, ``dynamics/chance_loss``) and the epoch's mean (``dynamics/train_loss``).

    Everything is published as records (:attr:`publishes`) for the rules in :mod:`lightning_viz.diagnosis_rules`.

    Args:
        layers: names of modules that own parameters to follow; default: all of them.
        every_n_steps: sample gradients and updates every n-th optimizer step of an epoch (its first included);
            default: about ``samples_per_epoch`` per epoch, fewer where a sample would cost over 0.5 % of the training
            time (half of :attr:`sample_budget`; in a suite's budget the samples and the total-norm trace 0.125 % each,
            counted in its account; the intervals only ever grow).
        samples_per_epoch: target number of sampled steps per epoch when ``every_n_steps`` is ``None``.
        update_ratio: measure update ratios (``False`` saves the copy of the parameters).
        max_batches: at most this many validation batches feed the BatchNorm and saturation statistics.
        probe_samples: validation samples kept for the eval-vs-batch-statistics probe (0: no probe).
        num_classes: number of classes for the chance level; default: from the model's logits on the probe.
        max_layers: at most this many layers (evenly spaced) as rows of the gradient-flow image.
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``seed``, ``max_overhead``, ``max_image_side``.
    """

    monitor_name = "dynamics"
    #: With ``every_n_steps=None``, sampling thins out until a sample costs at most this share of the training time.
    sample_budget: ClassVar[float] = 0.01
    publishes = (GradientStats, GradientTrace, UpdateStats, BatchNormStats, BatchNormProbe, SaturationStats, LossStats)
    default_every_n_epochs, diagnosis_evidence = 1, True  # its records are what the final verdict judges
    # under a budget: BatchNorm taps on fewer validation batches, a smaller probe scored, fewer gradient-flow rows
    budget_knobs = {"max_batches": 1, "probe_samples": 16, "max_layers": 16}
    budget_fixed_seconds = 0.02  # scalars, records, one small image

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = None,
        samples_per_epoch: int = 16,
        update_ratio: bool = True,
        max_batches: int = 4,
        probe_samples: int = 64,
        num_classes: int | None = None,
        max_layers: int = 64,
        **kwargs: Any,
    ) -> None:
        kwargs["log_baseline"] = False  # everything here is measured while training runs
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.positive_int("every_n_steps", every_n_steps, allow_none=True)
        check.positive_ints(samples_per_epoch=samples_per_epoch, max_batches=max_batches, max_layers=max_layers)
        check.boolean("update_ratio", update_ratio)
        check.non_negative_int("probe_samples", probe_samples)
        if num_classes is not None:
            check.at_least("num_classes", num_classes, 2)
        self.layers = list(layers) if layers is not None else None
        self.every_n_steps, self.samples_per_epoch = every_n_steps, samples_per_epoch
        self.update_ratio, self.max_batches, self.probe_samples = update_ratio, max_batches, probe_samples
        self.num_classes, self.max_layers = num_classes, max_layers
        self._layers: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._watch, self._taps = D.LayerWatch({}), D.ValidationTaps()
        self._loss, self._steps = D.LossTracker(), D.StepNorms([])
        self._sampling, self._tracing, self._opt_calls, self._tap_batches = D.Thinning(), D.Thinning(), 0, max_batches
        self._last_call: float | None = None
        self._step_seconds: float | None = None  # wall time of one optimizer step, smoothed
        self._grads: list[tuple[int, dict[str, float | None]]] = []  # (step, norm per layer) since the last log
        self._updates: list[dict[str, float | None]] = []
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probe_fixed = self._collect = False  # the same probe samples for the rest of the run once kept
        self._scale: tuple[float | None, float | None] = (None, None)
        self._at = (0, 0)  # (step, epochs done) of the records being published

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        owners = D.trainable_layers(pl_module)
        if self.layers is not None:
            if unknown := [n for n in self.layers if n not in owners]:
                raise ValueError(
                    f"`layers`: {unknown} own no parameters (or do not exist); layers with parameters: "
                    f"{list(owners)[:40]}."
                )
            owners = {n: owners[n] for n in self.layers}
        self._release(pl_module)
        # one fit, one history: a checkpoint restored after setup brings back what a resumed run needs
        self._layers, self._watch, self._loss = owners, D.LayerWatch(owners), D.LossTracker()
        self._steps = D.StepNorms([p for ps in owners.values() for _, p in ps])
        self._grads, self._updates, self._probe, self._probe_fixed = [], [], None, False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        steps = max(1, int(trainer.num_training_batches) // max(1, int(trainer.accumulate_grad_batches)))
        self._sampling = D.Thinning(self.every_n_steps or max(1, steps // self.samples_per_epoch))
        self._loss.expect_initial = trainer.global_step == 0 and self._loss.initial is None
        if not self._watch.initial:  # a resumed run keeps the fingerprints it saved
            self._watch.start()

    # ------------------------------------------------------------------------------------------- training side
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._opt_calls, self._last_call = 0, None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active or trainer.sanity_checking or self.monitor_name in self._disabled:
            return
        now = time.perf_counter()
        if self._last_call is not None:
            step = now - self._last_call
            self._step_seconds = step if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * step
        self._opt_calls += 1
        with deferred_collection():  # the process's garbage is not the sampling's cost
            if self._tracing.due(self._opt_calls) or self._steps.warming:  # the growth between sampled steps
                self._guard("trace", self._steps.add)
                self._tracing.seconds += time.perf_counter() - now
            if self._sampling.due(self._opt_calls):  # the epoch's first step is always sampled
                started = time.perf_counter()
                self._guard(self.monitor_name, self._sample, int(trainer.global_step))
                self._sampling.seconds += time.perf_counter() - started
            self._last_call = time.perf_counter()

    def _sample(self, step: int) -> None:
        self._grads.append((step, self._watch.gradients()))  # after AMP unscaling, before clipping; read only
        if self.update_ratio:
            self._watch.snapshot()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or trainer.sanity_checking:
            return
        if self._watch.pending:  # the sampled step has been taken: how far did it move the weights?
            with deferred_collection():
                started = time.perf_counter()
                self._guard(self.monitor_name, lambda: self._updates.append(self._watch.update_ratios()))
                self._sampling.seconds += time.perf_counter() - started
        # sampling and trace: at most half of `sample_budget` each (in a budget, a quarter of its pace; the budget
        # counts them with every hook's seconds)
        share = min(self.sample_budget, self._budget.share * PACE / 4) if self._budget else self.sample_budget
        self._sampling.adapt(share / 2, self._step_seconds, grow=self.every_n_steps is None)
        self._tracing.adapt(share / 2, self._step_seconds, grow=self._budget is not None)
        loss = D.returned_loss(outputs)
        if loss is not None:  # Lightning divides the returned loss by the accumulation
            self._loss.add(loss * trainer.accumulate_grad_batches if pl_module.automatic_optimization else loss)

    # ----------------------------------------------------------------------------------------- validation side
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and not trainer.sanity_checking and trainer.state.fn == "fit" and self._is_log_epoch(trainer):
            self._taps.clear()
            with self._scaled(self._call_scale(trainer.current_epoch + 1)):  # this epoch's call, under a budget
                self._tap_batches = self.max_batches
            self._collect = not self._probe_fixed and self.probe_samples > 0
            self._guard(self.monitor_name, self._taps.attach, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx >= self._tap_batches or dataloader_idx > 0:
            self._taps.detach()
        if self._collect and dataloader_idx == 0 and batch_idx < self.max_batches:
            # a few samples of each of the first validation batches (never drawn by us); a smaller call scores fewer
            take = max(1, self.probe_samples // self.max_batches)
            pair = single_input_pair(batch, self.input_fn, pl_module)  # dicts, (path, image, label), input_fn
            self._probe = D.extend_probe(self._probe, pair, take=take, limit=self.probe_samples)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._taps.detach()
        self._probe_fixed, self._collect = self._probe is not None, False

    def _release(self, pl_module: Any) -> None:
        self._watch.release()
        self._taps.detach()

    def _budget_units(self) -> float | None:  # the probe's two forward passes; the taps, a forward pass of 64 a batch
        return (2 * self.probe_samples + 64 * self.max_batches) / 3 + self.max_layers / 4  # rows: the image

    def _cheaper_hint(self) -> str:
        return "or raise `every_n_steps` / lower `max_batches` / `probe_samples` "

    def _emit(self, record_type: type[Record], subject: str = "", /, **fields: Any) -> None:
        self._publish(record_type(step=self._at[0], epoch=self._at[1], subject=subject, **fields))

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        assert self._sink is not None
        self._at = (step, epochs_done)
        if self._taps:
            self._guard("batchnorm", self._log_batchnorm, pl_module, step)
            self._guard("saturation", self._log_saturation, pl_module, step)
        classes = self._guard("probe", self._log_probe, pl_module, step) if self._probe is not None else None
        self._guard("gradients", self._log_gradients, step, epochs_done)
        self._guard("updates", self._log_updates, step, epochs_done)
        self._guard("loss", self._log_loss, step, classes if isinstance(classes, int) else None)
        self._taps.clear()
        self._watch.release()

    def _log_gradients(self, step: int, epochs_done: int) -> None:
        if (trace := self._steps.summary()) is not None:  # every step's total norm since the last log
            totals = {f"dynamics/grad_norm_total/{k}": trace[k] for k in ("median", "peak")}
            self._sink.scalars({k: v for k, v in totals.items() if v is not None}, step)
            self._emit(GradientTrace, **trace)
        samples, self._grads = self._grads, []
        if not samples:
            return
        names, scalars = list(self._layers), {}
        for order, name in enumerate(names):
            values = [norms.get(name) for _, norms in samples]
            finite = [v for v in values if v is not None and math.isfinite(v)]
            if (median := D.finite_median(values)) is not None:
                scalars[f"dynamics/grad_norm/{name}"] = median
            fields = {"order": order, "grad_norm": median, "grad_norm_max": max(finite) if finite else None}
            nonfinite = len(values) - len(finite) - values.count(None)
            matrix = any(p.ndim >= 2 for _, p in self._layers[name])
            self._emit(GradientStats, name, **fields, matrix=matrix, nonfinite_steps=nonfinite, samples=len(values))
        self._sink.scalars(scalars, step)
        if self._sink.writes_images:
            grid, rows = D.gradient_grid(samples, names, self.max_layers)
            low, high = self._scale = D.log_range(grid.flatten().tolist(), *self._scale)
            labels = [r or "<root>" for r in rows]
            image = render.gradient_flow(grid, labels, [s for s, _ in samples], low, high, epochs_done)
            self._sink.image("dynamics/gradient_flow", image, step)

    def _log_updates(self, step: int, epochs_done: int) -> None:
        updates, self._updates = self._updates, []
        norms = D.layer_norms(self._watch.trainable())
        scalars: dict[str, float] = {"dynamics/unchanged_parameters": 0}
        for name in self._layers:
            unchanged, no_grad, elements, frozen = self._watch.status(name, judge=epochs_done > 0)
            if (ratio := D.finite_median([u.get(name) for u in updates])) is not None:
                scalars[f"dynamics/update_ratio/{name}"] = ratio
            scalars["dynamics/unchanged_parameters"] += len(unchanged)
            kept = {"unchanged": tuple(unchanged), "without_grad": tuple(no_grad), "frozen": tuple(frozen)}
            norm = norms.get(name)
            self._emit(UpdateStats, name, update_ratio=ratio, weight_norm=norm, unchanged_elements=elements, **kept)
        self._sink.scalars(scalars, step)

    def _log_batchnorm(self, pl_module: nn.Module, step: int) -> None:
        layers, scalars = D.batchnorm_layers(pl_module), {}
        for name, moments in self._taps.moments.items():
            bn = layers[name]
            shift, ratio = D.running_stat_distance(*moments.mean_var(), bn.running_mean, bn.running_var, bn.eps)
            scalars[f"dynamics/bn_mean_shift/{name}"], scalars[f"dynamics/bn_var_log_ratio/{name}"] = shift, ratio
            momentum, batches = bn.momentum, moments.batches
            self._emit(BatchNormStats, name, mean_shift=shift, var_log_ratio=ratio, momentum=momentum, batches=batches)
        self._sink.scalars(scalars, step)

    def _log_probe(self, pl_module: nn.Module, step: int) -> int | None:
        assert self._probe is not None and self._sink is not None
        device, n = model_device(pl_module), self.probe_samples  # fewer under a budget: the first ones
        images, labels = self._probe[0][:n].to(device), self._probe[1][:n].to(device)
        result = D.eval_vs_batch_stats(pl_module, pl_module, images, labels) if self.probe_samples else None
        if result is None:
            return None
        if D.batchnorm_layers(pl_module) and len(labels) > 1:
            self._sink.scalars({f"dynamics/bn_probe/{k}": v for k, v in result.items() if k != "classes"}, step)
            self._emit(BatchNormProbe, samples=len(labels), **result)
        return int(result["classes"])

    def _log_saturation(self, pl_module: nn.Module, step: int) -> None:
        modules, fractions = D.saturating_layers(pl_module), self._taps.saturation.fractions()
        self._sink.scalars({f"dynamics/saturation/{n}": f for n, f in fractions.items()}, step)
        for name, fraction in fractions.items():
            self._emit(SaturationStats, name, kind=type(modules[name]).__name__, saturated_fraction=fraction)

    def _log_loss(self, step: int, classes: int | None) -> None:
        classes = self.num_classes or classes
        mean, initial, chance = self._loss.epoch_mean(), self._loss.initial, math.log(classes) if classes else None
        scalars = {"dynamics/train_loss": mean, "dynamics/initial_loss": initial, "dynamics/chance_loss": chance}
        self._sink.scalars({k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}, step)
        self._emit(LossStats, train_loss=mean, initial_loss=initial, classes=classes, chance_loss=chance)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "watch": self._watch.state_dict(),
            "initial_loss": self._loss.initial,
            "initial_grad_norms": list(self._steps.initial),
            "probe": None if self._probe is None else (self._probe[0].clone(), self._probe[1].clone()),
            "scale": self._scale,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._watch.load_state_dict(state.get("watch", {}))
        self._loss.initial = state.get("initial_loss")
        self._steps.initial = list(state.get("initial_grad_norms", []))
        self._probe = state.get("probe")
        self._probe_fixed = self._probe is not None
        self._scale = tuple(state.get("scale", (None, None)))  # type: ignore[assignment]
