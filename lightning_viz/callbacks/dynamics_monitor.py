"""DynamicsMonitor: gradient flow, update ratios, unchanged weights, BatchNorm health, saturation, loss vs chance."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._layers import evenly_spaced, model_device
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import dynamics as D
from lightning_viz.records import (
    BatchNormProbe,
    BatchNormStats,
    GradientStats,
    LossStats,
    SaturationStats,
    UpdateStats,
)

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class DynamicsMonitor(VizCallback):
    """How the network trains, read without touching it: gradient flow, update ratios, weights that never change,
    BatchNorm running statistics against the data, saturated activations, and the loss against chance level.

    - **Gradients** are read in ``on_before_optimizer_step`` (after AMP unscaling, before clipping; ``.grad`` is only
      read) every ``every_n_steps``-th optimizer step. Scalars ``dynamics/grad_norm/<layer>`` (median over the
      epoch's sampled steps) and one image per logged epoch, ``dynamics/gradient_flow``: layers (rows, input at the
      top) x sampled steps, on a log10 colour scale with its colour bar (the scale only ever widens, so epochs compare).
    - **Update ratio** ``||w_after - w_before|| / ||w_before||`` per layer at the sampled steps (the parameters are
      copied for the one step, then dropped): ``dynamics/update_ratio/<layer>`` (rule of thumb: about 1e-3).
    - **Unchanged weights**: parameters with ``requires_grad=True`` whose values have not changed since the start of
      the fit (left out of the optimizer, lr 0, or no gradient reaches them), told from frozen ones
      (``requires_grad=False``, never a finding). Scalar ``dynamics/unchanged_parameters``.
    - **BatchNorm health**, during the validation pass the Trainer already runs (forward hooks, removed at its end):
      the distance of each layer's running statistics from the statistics of its inputs,
      ``dynamics/bn_mean_shift/<layer>`` (in running standard deviations) and ``dynamics/bn_var_log_ratio/<layer>``;
      and a probe of up to ``probe_samples`` validation samples (kept from the validation batches, fixed for the run)
      scored in eval mode and with batch statistics: ``dynamics/bn_probe/{eval,batch_stat}_{loss,accuracy}``. The
      running statistics are restored exactly afterwards.
    - **Saturation** of sigmoid / tanh / hardtanh / hardsigmoid / softsign modules: share of outputs in the flat
      tails (e.g. ``|tanh| > 0.97``) on the validation batches, ``dynamics/saturation/<module>``.
    - **Loss**: the first training batch's loss against ``ln(C)`` for a C-class classifier
      (``dynamics/initial_loss``, ``dynamics/chance_loss``), and the epoch's mean training loss
      (``dynamics/train_loss``), as ``training_step`` returned it.

    Everything is published as records (:mod:`lightning_viz.records`: ``GradientStats``, ``UpdateStats``,
    ``BatchNormStats``, ``BatchNormProbe``, ``SaturationStats``, ``LossStats``) for the rules in
    :mod:`lightning_viz.diagnosis_rules`.

    Args:
        layers: names of modules that own parameters to follow; default: all of them.
        every_n_steps: sample gradients and updates every n-th optimizer step; default: about ``samples_per_epoch``
            samples per epoch.
        samples_per_epoch: target number of sampled steps per epoch when ``every_n_steps`` is ``None``.
        update_ratio: measure update ratios (needs a copy of the parameters for one step at each sample).
        max_batches: at most this many validation batches feed the BatchNorm and saturation statistics.
        probe_samples: validation samples kept for the eval-vs-batch-statistics probe (0: no probe).
        num_classes: number of classes for the chance level; default: from the model's logits on the probe.
        max_layers: at most this many layers (evenly spaced) as rows of the gradient-flow image.
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``seed``, ``max_overhead``, ``max_image_side``.
    """

    monitor_name = "dynamics"
    publishes = (GradientStats, UpdateStats, BatchNormStats, BatchNormProbe, SaturationStats, LossStats)
    default_every_n_epochs = 1

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = None,
        samples_per_epoch: int = 16,
        update_ratio: bool = True,
        max_batches: int = 8,
        probe_samples: int = 64,
        num_classes: int | None = None,
        max_layers: int = 64,
        **kwargs: Any,
    ) -> None:
        kwargs["log_baseline"] = False  # everything here is measured while training runs
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.positive_int("every_n_steps", every_n_steps, allow_none=True)
        for name, value in (("samples_per_epoch", samples_per_epoch), ("max_batches", max_batches)):
            check.positive_int(name, value)
        check.positive_int("max_layers", max_layers)
        check.boolean("update_ratio", update_ratio)
        check.non_negative_int("probe_samples", probe_samples)
        if num_classes is not None:
            check.at_least("num_classes", num_classes, 2)
        self.layers = list(layers) if layers is not None else None
        self.every_n_steps, self.samples_per_epoch = every_n_steps, samples_per_epoch
        self.update_ratio, self.max_batches, self.probe_samples = update_ratio, max_batches, probe_samples
        self.num_classes, self.max_layers = num_classes, max_layers
        self._layers: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._every = 1
        self._opt_calls = 0
        self._grads: list[tuple[int, dict[str, float | None]]] = []  # (step, norm per layer) since the last log
        self._updates: list[dict[str, float | None]] = []
        self._snapshot: dict[str, list[torch.Tensor]] | None = None
        self._buffer: dict[str, list[torch.Tensor]] | None = None
        self._had_grad: set[str] = set()
        self._initial: dict[str, torch.Tensor] = {}  # parameter -> fingerprint at the start of the fit
        self._changed: set[str] = set()
        self._handles: list[Any] = []
        self._moments: dict[str, D.MomentStats] = {}
        self._saturation = D.SaturationCounter()
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_batches = 0
        self._initial_loss: float | None = None
        self._first_batch = False
        self._scale: tuple[float | None, float | None] = (None, None)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        owners = D.trainable_layers(pl_module)
        if self.layers is not None:
            unknown = [n for n in self.layers if n not in owners]
            if unknown:
                raise ValueError(
                    f"`layers`: {unknown} own no parameters (or do not exist); layers with parameters: "
                    f"{list(owners)[:40]}."
                )
            owners = {n: owners[n] for n in self.layers}
        self._layers = owners
        self._release(pl_module)
        # one fit, one history: a checkpoint restored after setup brings back what a resumed run needs
        self._initial, self._changed, self._had_grad = {}, set(), set()
        self._grads, self._updates, self._snapshot, self._opt_calls = [], [], None, 0
        self._probe, self._initial_loss, self._loss_sum, self._loss_batches = None, None, None, 0

    def _params(self, trainable: bool = True) -> dict[str, list[nn.Parameter]]:
        return {n: [p for _, p in ps if p.requires_grad == trainable] for n, ps in self._layers.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        steps = max(1, int(trainer.num_training_batches) // max(1, int(trainer.accumulate_grad_batches)))
        self._every = self.every_n_steps or max(1, steps // self.samples_per_epoch)
        self._first_batch = trainer.global_step == 0 and self._initial_loss is None
        if not self._initial:  # a resumed run keeps the fingerprints it saved
            self._initial = {
                f"{n}.{pn}" if n else pn: D.fingerprint(p) for n, ps in self._layers.items() for pn, p in ps
            }

    # ------------------------------------------------------------------------------------------- training side
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active or trainer.sanity_checking or self.monitor_name in self._disabled:
            return
        self._opt_calls += 1
        if (self._opt_calls - 1) % self._every == 0:
            self._guard(self.monitor_name, self._sample, int(trainer.global_step))

    def _sample(self, step: int) -> None:
        names = {
            n: [(f"{n}.{pn}" if n else pn, p) for pn, p in ps if p.requires_grad] for n, ps in self._layers.items()
        }
        per_param = D.layer_norms({full: [p.grad] for params in names.values() for full, p in params})
        layers: dict[str, float | None] = {}
        for n, params in names.items():
            norms = [per_param[full] for full, _ in params if per_param.get(full) is not None]
            layers[n] = math.sqrt(sum(v * v for v in norms)) if norms else None  # type: ignore[operator]
        # a gradient is "there" when it is more than rounding noise (a bias right before BatchNorm gets ~1e-8 of it)
        pending = {full: [p] for params in names.values() for full, p in params if full not in self._had_grad}
        for full, weight_norm in D.layer_norms(pending).items():
            grad_norm = per_param.get(full)
            if grad_norm is not None and not grad_norm <= 1e-6 * max(weight_norm or 0.0, 1e-6):
                self._had_grad.add(full)
        self._grads.append((step, layers))
        if self.update_ratio:
            # one copy of the parameters, reused through the epoch (fresh allocations each step cost more than the
            # copy) and dropped when the epoch is logged
            params = self._params()
            if self._buffer is None:
                self._buffer = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
            else:
                torch._foreach_copy_(
                    [b for n in params for b in self._buffer[n]], [p.detach() for ps in params.values() for p in ps]
                )
            self._snapshot = self._buffer

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or trainer.sanity_checking:
            return
        if self._snapshot is not None:  # the sampled step has been taken: measure how far it moved the weights
            old, self._snapshot = self._snapshot, None
            new = self._params()
            ratios = D.update_ratios(D.difference_norms(new, old), D.layer_norms(old))
            self._updates.append(ratios)
        loss = _loss_of(outputs)
        if loss is None:
            return
        if pl_module.automatic_optimization:  # Lightning divides the returned loss by the accumulation
            loss = loss * trainer.accumulate_grad_batches
        if self._first_batch:  # the loss of the untrained model (it was computed before the first step)
            self._first_batch = False
            self._initial_loss = float(loss)
        self._loss_sum = loss.float() if self._loss_sum is None else self._loss_sum + loss.float()
        self._loss_batches += 1

    # ----------------------------------------------------------------------------------------- validation side
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and not trainer.sanity_checking and trainer.state.fn == "fit" and self._is_log_epoch(trainer):
            self._guard(self.monitor_name, self._attach, pl_module)

    def _attach(self, pl_module: nn.Module) -> None:
        self._release(pl_module)
        self._moments.clear()
        self._saturation.clear()
        try:
            for name, bn in D.batchnorm_layers(pl_module).items():
                self._handles.append(bn.register_forward_hook(self._bn_hook(name)))
            for name, module in D.saturating_layers(pl_module).items():
                self._handles.append(module.register_forward_hook(self._tail_hook(name)))
        except BaseException:
            self._release(pl_module)
            raise

    def _bn_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._moments.setdefault(name, D.MomentStats()).update(inputs[0])

        return hook

    def _tail_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._saturation.add(name, module, output)

        return hook

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._handles:
            return
        if batch_idx >= self.max_batches or dataloader_idx > 0:
            self._release(pl_module)
            return
        self._keep_probe(batch)

    def _keep_probe(self, batch: Any) -> None:
        """Keep a few samples of each of the first validation batches (the Trainer's own; never drawn by us)."""
        have = 0 if self._probe is None else len(self._probe[1])
        if have >= self.probe_samples or not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return
        x, y = batch[0], batch[1]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or y.ndim != 1 or y.is_floating_point():
            return
        take = min(len(y), max(1, self.probe_samples // self.max_batches), self.probe_samples - have)
        x, y = x[:take].detach().cpu().clone(), y[:take].detach().cpu().clone()
        self._probe = (
            (x, y) if self._probe is None else (torch.cat([self._probe[0], x]), torch.cat([self._probe[1], y]))
        )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)

    def _release(self, pl_module: Any) -> None:
        self._buffer = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _cheaper_hint(self) -> str:
        return "or raise `every_n_steps` / lower `max_batches` / `probe_samples` "

    # ---------------------------------------------------------------------------------------------- logging
    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        classes = None
        if self._moments or self._saturation.total:
            self._guard("batchnorm", self._log_batchnorm, pl_module, step, epochs_done)
            self._guard("saturation", self._log_saturation, pl_module, step, epochs_done)
        if self._probe is not None and self.probe_samples:
            classes = self._guard("probe", self._log_probe, pl_module, step, epochs_done)
        self._guard("gradients", self._log_gradients, step, epochs_done)
        self._guard("updates", self._log_updates, step, epochs_done)
        self._guard("loss", self._log_loss, step, epochs_done, classes if isinstance(classes, int) else None)
        self._moments.clear()
        self._saturation.clear()
        self._buffer = None

    def _log_gradients(self, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        samples, self._grads = self._grads, []
        if not samples:
            return
        names = list(self._layers)
        matrix = {n: any(p.ndim >= 2 for _, p in self._layers[n]) for n in names}
        scalars = {}
        for order, name in enumerate(names):
            values = [norms.get(name) for _, norms in samples]
            finite = [v for v in values if v is not None and math.isfinite(v)]
            median = _median(values)
            if median is not None:
                scalars[f"dynamics/grad_norm/{name}"] = median
            self._publish(
                GradientStats(
                    step=step,
                    epoch=epochs_done,
                    subject=name,
                    order=order,
                    matrix=matrix[name],
                    grad_norm=median,
                    grad_norm_max=max(finite) if finite else None,
                    nonfinite_steps=sum(1 for v in values if v is not None and not math.isfinite(v)),
                    samples=len(values),
                )
            )
        sink.scalars(scalars, step)
        if sink.writes_images:
            rows = evenly_spaced(len(names), self.max_layers)
            grid = torch.tensor(
                [
                    [norms.get(names[r]) if norms.get(names[r]) is not None else float("nan") for _, norms in samples]
                    for r in rows
                ],
                dtype=torch.float64,
            )
            low, high = D.log_range(grid.flatten().tolist(), *self._scale)
            self._scale = (low, high)
            title = f"gradient norm per layer (log10 colour), epoch {epochs_done}, sampled steps"
            image = render.log_heatmap(
                grid, [names[r] or "<root>" for r in rows], [s for s, _ in samples], low=low, high=high, title=title
            )
            sink.image("dynamics/gradient_flow", image, step)

    def _log_updates(self, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        updates, self._updates = self._updates, []
        norms = D.layer_norms(self._params())
        unchanged_total = 0
        scalars: dict[str, float] = {}
        for name, params in self._layers.items():
            frozen, unchanged, no_grad, elements = [], [], [], 0
            for pname, p in params:
                full = f"{name}.{pname}" if name else pname
                if not p.requires_grad:
                    frozen.append(full)
                    continue
                if full not in self._changed and full in self._initial:
                    if not torch.equal(D.fingerprint(p), self._initial[full]):
                        self._changed.add(full)
                    elif epochs_done > 0:
                        unchanged.append(full)
                        elements += p.numel()
                        if full not in self._had_grad:
                            no_grad.append(full)
            ratio = _median([u.get(name) for u in updates])
            if ratio is not None:
                scalars[f"dynamics/update_ratio/{name}"] = ratio
            unchanged_total += len(unchanged)
            self._publish(
                UpdateStats(
                    step=step,
                    epoch=epochs_done,
                    subject=name,
                    update_ratio=ratio,
                    weight_norm=norms.get(name),
                    unchanged=tuple(unchanged),
                    without_grad=tuple(no_grad),
                    unchanged_elements=elements,
                    frozen=tuple(frozen),
                )
            )
        sink.scalars({**scalars, "dynamics/unchanged_parameters": unchanged_total}, step)

    def _log_batchnorm(self, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        layers = D.batchnorm_layers(pl_module)
        scalars = {}
        for name, moments in self._moments.items():
            bn = layers[name]
            mean, var = moments.mean_var()
            shift, ratio = D.running_stat_distance(mean, var, bn.running_mean, bn.running_var, bn.eps)
            scalars[f"dynamics/bn_mean_shift/{name}"] = shift
            scalars[f"dynamics/bn_var_log_ratio/{name}"] = ratio
            self._publish(
                BatchNormStats(
                    step=step,
                    epoch=epochs_done,
                    subject=name,
                    mean_shift=shift,
                    var_log_ratio=ratio,
                    momentum=bn.momentum,
                    batches=moments.batches,
                )
            )
        sink.scalars(scalars, step)

    def _log_probe(self, pl_module: nn.Module, step: int, epochs_done: int) -> int | None:
        assert self._probe is not None and self._sink is not None
        device = model_device(pl_module)
        images, labels = self._probe[0].to(device), self._probe[1].to(device)
        result = D.eval_vs_batch_stats(pl_module, pl_module, images, labels)
        if result is None:
            return None
        classes = int(result["classes"])
        if D.batchnorm_layers(pl_module) and len(labels) > 1:
            self._sink.scalars({f"dynamics/bn_probe/{k}": v for k, v in result.items() if k != "classes"}, step)
            self._publish(
                BatchNormProbe(step=step, epoch=epochs_done, subject="", samples=len(labels), **result)  # type: ignore[arg-type]
            )
        return classes

    def _log_saturation(self, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        assert self._sink is not None
        modules = D.saturating_layers(pl_module)
        fractions = self._saturation.fractions()
        self._sink.scalars({f"dynamics/saturation/{n}": f for n, f in fractions.items()}, step)
        for name, fraction in fractions.items():
            kind = type(modules[name]).__name__
            self._publish(
                SaturationStats(step=step, epoch=epochs_done, subject=name, kind=kind, saturated_fraction=fraction)
            )

    def _log_loss(self, step: int, epochs_done: int, classes: int | None) -> None:
        assert self._sink is not None
        classes = self.num_classes or classes
        mean = float(self._loss_sum) / self._loss_batches if self._loss_sum is not None and self._loss_batches else None
        self._loss_sum, self._loss_batches = None, 0
        chance = math.log(classes) if classes else None
        scalars = {
            "dynamics/train_loss": mean,
            "dynamics/initial_loss": self._initial_loss,
            "dynamics/chance_loss": chance,
        }
        self._sink.scalars({k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}, step)
        self._publish(
            LossStats(
                step=step,
                epoch=epochs_done,
                subject="",
                train_loss=mean,
                initial_loss=self._initial_loss,
                classes=classes,
                chance_loss=chance,
            )
        )

    # ------------------------------------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "initial": {k: v.clone() for k, v in self._initial.items()},
            "changed": sorted(self._changed),
            "had_grad": sorted(self._had_grad),
            "initial_loss": self._initial_loss,
            "probe": None if self._probe is None else (self._probe[0].clone(), self._probe[1].clone()),
            "scale": self._scale,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._initial = {k: v.clone() for k, v in state.get("initial", {}).items()}
        self._changed = set(state.get("changed", ()))
        self._had_grad = set(state.get("had_grad", ()))
        self._initial_loss = state.get("initial_loss")
        self._probe = state.get("probe")
        self._scale = tuple(state.get("scale", (None, None)))  # type: ignore[assignment]
