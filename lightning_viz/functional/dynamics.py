"""Training dynamics, read-only: gradient and update norms per layer, BatchNorm running statistics against the data,
saturation of bounded activations, parameters that never change. Pure tensor code on plain ``nn.Module``s.

Nothing here writes to a parameter, a ``.grad`` or a buffer; the one function that runs BatchNorm with batch
statistics (:func:`batch_stat_forward`) puts the running statistics back exactly.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_viz._hooks import forward_hooks

#: Bounded activations whose flat tails stop gradients, and how a value counts as "in the tail".
SATURATING_KINDS: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
#: |tanh| above this, sigmoid outside [1 - this, this]: the flat tail (derivative at most 6 % / 12 % of its peak).
TAIL = 0.97


def trainable_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Modules that own parameters directly, with those parameters (``requires_grad`` or not), in module order.

    Returns:
        ``{layer name: [(parameter name, parameter), ...]}``; the root module's own parameters are under ``""``.
    """
    layers: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if params:
            layers[name] = params
    return layers


def saturating_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Bounded activation modules (sigmoid, tanh, hardtanh, hardsigmoid, softsign; not ReLU6, a ReLU), in order."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, SATURATING_KINDS) and not isinstance(module, nn.ReLU6)
    }


@torch.no_grad()
def layer_norms(layers: Mapping[str, Sequence[torch.Tensor | None]]) -> dict[str, float | None]:
    """L2 norm of each layer's tensors taken together (``None`` entries skipped; ``None`` for a layer with none).

    One host synchronisation for all layers. A non-finite norm is reported as ``inf``/``nan`` (the caller decides).

    Shape:
        any tensors; returns one float per layer.
    """
    names, tensors, owners = list(layers), [], []
    for i, name in enumerate(names):
        for t in layers[name]:
            if t is not None:
                tensors.append(t.detach())
                owners.append(i)
    out: dict[str, float | None] = dict.fromkeys(names)
    if not tensors:
        return out
    norms = torch.stack([n.float().to(tensors[0].device) for n in torch._foreach_norm(tensors)])
    squares = torch.zeros(len(names), dtype=torch.float64, device=norms.device)
    squares.index_add_(0, torch.tensor(owners, device=norms.device), norms.double() ** 2)
    values = squares.sqrt().cpu().tolist()
    seen = set(owners)
    for i, name in enumerate(names):
        if i in seen:
            out[name] = values[i]
    return out


@torch.no_grad()
def difference_norms(
    new: Mapping[str, Sequence[torch.Tensor]], old: Mapping[str, Sequence[torch.Tensor]]
) -> dict[str, float | None]:
    """``||new - old||`` per layer (the tensors of a layer taken together).

    Shape:
        ``new[layer][i]`` and ``old[layer][i]`` have the same shape.
    """
    names = [name for name in new if name in old and new[name]]
    a = [t.detach() for name in names for t in new[name]]
    b = [t for name in names for t in old[name]]
    if not a:
        return dict.fromkeys(new)
    diffs = iter(torch._foreach_sub(a, b))
    return layer_norms({name: [next(diffs) for _ in new[name]] for name in names})


def update_ratios(deltas: Mapping[str, float | None], norms: Mapping[str, float | None]) -> dict[str, float | None]:
    """``||Δw|| / ||w||`` per layer; ``None`` where a norm is missing, zero or not finite."""
    out: dict[str, float | None] = {}
    for name, delta in deltas.items():
        norm = norms.get(name)
        ok = delta is not None and norm is not None and math.isfinite(delta) and math.isfinite(norm) and norm > 0
        out[name] = delta / norm if ok else None
    return out


@torch.no_grad()
def fingerprint(tensor: torch.Tensor, points: int = 16) -> torch.Tensor:
    """A few numbers that change whenever an optimizer step changes ``tensor``: its sum (float64), its norm and
    ``points`` evenly spaced elements. Cheap (no copy of the tensor); used to tell parameters that never change.

    Shape:
        any tensor; returns (2 + min(points, numel),) float64 on the CPU.
    """
    flat = tensor.detach().reshape(-1)
    # float64: in float32 the last index of a tensor of more than 2**24 elements rounds up, past its end
    index = torch.linspace(0, flat.numel() - 1, min(points, flat.numel()), dtype=torch.float64).long().to(flat.device)
    head = torch.stack([flat.sum(dtype=torch.float64), flat.norm().double()])
    return torch.cat([head, flat[index].double()]).cpu()


class MomentStats:
    """Streaming per-channel mean and variance of a BatchNorm layer's *inputs* (float64 sums; nothing is kept).

    Channels are along dimension 1: (N, C), (N, C, L), (N, C, H, W), ...
    """

    def __init__(self) -> None:
        self.count = 0
        self.batches = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one batch of inputs. Shape: (N, C, ...)."""
        dims = [0, *range(2, x.ndim)]
        n = x.numel() // x.shape[1]
        # one fused pass per batch (no squared copy of the activation); the sums are kept in float64
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
        mean = mean.double()
        total, squares = mean * n, (var.double() + mean.square()) * n
        if self.total is None or self.squares is None:
            self.total, self.squares = total, squares
        else:
            self.total, self.squares = self.total + total, self.squares + squares
        self.count += n
        self.batches += 1

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and (biased) variance over everything seen. Shape: (C,), (C,) float64."""
        if self.total is None or self.squares is None or self.count == 0:
            raise ValueError("no batch was added.")
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean.square()).clamp_min(0.0)


@torch.no_grad()
def running_stat_distance(
    data_mean: torch.Tensor, data_var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> tuple[float, float]:
    """How far a BatchNorm layer's running statistics are from the statistics of the data it normalises.

    Args:
        data_mean, data_var: per-channel mean and variance of the layer's inputs on the data.
        running_mean, running_var: the layer's running statistics.
        eps: the layer's ``eps``.

    Returns:
        ``(mean_shift, var_log_ratio)``: the mean over channels of ``|mu_data - mu_run| / sqrt(var_run + eps)`` (the
        shift in units of the running standard deviation: about 1 means eval-mode outputs are off by one standard
        deviation), and the mean over channels of ``|ln((var_data + eps) / (var_run + eps))|`` (ln 4 = 1.39: a
        factor four in variance).

    Shape:
        all (C,).
    """
    rm, rv = running_mean.detach().double().cpu(), running_var.detach().double().cpu()
    dm, dv = data_mean.detach().double().cpu(), data_var.detach().double().cpu()
    shift = ((dm - rm).abs() / (rv + eps).sqrt()).mean().item()
    ratio = ((dv + eps) / (rv + eps)).log().abs().mean().item()
    return shift, ratio


def tail_mask(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Where a bounded activation's output ``y`` sits in its flat tails (derivative near zero).

    tanh / softsign: ``|y| > 0.97``; sigmoid: ``y < 0.03`` or ``y > 0.97``; hardtanh: at ``min_val`` or ``max_val``;
    hardsigmoid: at 0 or 1 (their derivative there is exactly zero).
    """
    if isinstance(module, nn.Hardtanh):
        return (y <= module.min_val) | (y >= module.max_val)
    if isinstance(module, nn.Hardsigmoid):
        return (y <= 0) | (y >= 1)
    if isinstance(module, nn.Sigmoid):
        return (y < 1 - TAIL) | (y > TAIL)
    return y.abs() > TAIL


class SaturationCounter:
    """Streaming share of values in the flat tails, per bounded activation module."""

    def __init__(self) -> None:
        self.tail: dict[str, int] = {}
        self.total: dict[str, int] = {}

    @torch.no_grad()
    def add(self, name: str, module: nn.Module, y: torch.Tensor) -> None:
        self.tail[name] = self.tail.get(name, 0) + int(tail_mask(module, y.detach()).sum())
        self.total[name] = self.total.get(name, 0) + y.numel()

    def fractions(self) -> dict[str, float]:
        return {name: self.tail[name] / total for name, total in self.total.items() if total}

    def clear(self) -> None:
        self.tail.clear()
        self.total.clear()


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics, in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer normalises with the batch's own statistics (train-mode BN) while the rest of the
    model keeps its mode; on exit the running statistics, ``num_batches_tracked`` and the modes are restored exactly.
    """
    layers = batchnorm_layers(model)
    saved = {name: (m.training, [b.detach().clone() for b in m.buffers(recurse=False)]) for name, m in layers.items()}
    try:
        for m in layers.values():
            m.training = True
        yield
    finally:
        with torch.no_grad():
            for name, m in layers.items():
                training, buffers = saved[name]
                m.training = training
                for buffer, value in zip(m.buffers(recurse=False), buffers):
                    buffer.copy_(value)


def _classification(logits: Any, labels: torch.Tensor) -> bool:
    return (
        isinstance(logits, torch.Tensor)
        and logits.ndim == 2
        and labels.ndim == 1
        and not labels.is_floating_point()
        and len(labels) == len(logits)
        and bool((labels >= 0).all())
        and bool((labels < logits.shape[1]).all())
    )


@torch.no_grad()
def eval_vs_batch_stats(
    forward: Callable[[torch.Tensor], Any], model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float | int] | None:
    """Cross-entropy loss and accuracy of one batch in eval mode and with BatchNorm batch statistics.

    The model is put in eval mode for both passes (dropout off); the second pass switches only the BatchNorm layers
    to batch statistics (:func:`batch_statistics`) and restores them exactly. The caller restores ``model``'s modes.

    Args:
        forward: the call that maps images to logits (e.g. the LightningModule).
        model: the module that owns the BatchNorm layers.
        images: a batch of inputs, on the model's device.
        labels: class indices.

    Returns:
        ``eval_loss``, ``batch_stat_loss``, ``eval_accuracy``, ``batch_stat_accuracy``, ``classes``; ``None`` when the
        outputs are not (N, C) logits for the labels (not a classifier), or for SyncBatchNorm in a distributed run.

    Shape:
        images: (N, ...); labels: (N,) int64.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return None  # with batch statistics, SyncBatchNorm would wait for the other processes
    model.eval()
    logits = forward(images)
    if not _classification(logits, labels):
        return None
    with batch_statistics(model):
        batch_logits = forward(images)
    return {
        "eval_loss": F.cross_entropy(logits.float(), labels).item(),
        "batch_stat_loss": F.cross_entropy(batch_logits.float(), labels).item(),
        "eval_accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "batch_stat_accuracy": (batch_logits.argmax(1) == labels).float().mean().item(),
        "classes": int(logits.shape[1]),
    }


def log_range(
    values: Sequence[float | None], low: float | None = None, high: float | None = None
) -> tuple[float, float]:
    """Decades ``(floor(log10 min), ceil(log10 max))`` of the positive finite ``values``, widened to include an
    earlier ``(low, high)``: a colour scale that only ever grows, so images of different epochs compare."""
    logs = [math.log10(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    if not logs:
        return (low, high) if low is not None and high is not None else (-8.0, 0.0)
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    if low is not None and high is not None:
        lo, hi = min(lo, low), max(hi, high)
    return float(lo), float(max(hi, lo + 1))


class LayerWatch:
    """Gradient norms, update ratios and never-changing parameters of a model's layers, read-only.

    Args:
        layers: ``{layer: [(parameter name, parameter), ...]}`` as :func:`trainable_layers` returns it.

    Call :meth:`start` once with the initial weights, :meth:`gradients` where the gradients are complete (before the
    optimizer step), :meth:`snapshot` before and :meth:`update_ratios` after a step, :meth:`status` to list the
    parameters that never changed. Nothing is written to a parameter or its ``.grad``.
    """

    def __init__(self, layers: Mapping[str, Sequence[tuple[str, nn.Parameter]]]) -> None:
        self.layers = {n: [(f"{n}.{pn}" if n else pn, p) for pn, p in ps] for n, ps in layers.items()}
        #: Parameter -> fingerprint at the start of the fit.
        self.initial: dict[str, torch.Tensor] = {}
        #: Parameters seen to change / to get a gradient above rounding noise.
        self.changed: set[str] = set()
        self.had_grad: set[str] = set()
        self._buffer: dict[str, list[torch.Tensor]] | None = None
        self._snapshot = False

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        return {n: [p for _, p in ps if p.requires_grad] for n, ps in self.layers.items()}

    def start(self) -> None:
        self.initial = {full: fingerprint(p) for ps in self.layers.values() for full, p in ps}

    def gradients(self) -> dict[str, float | None]:
        """``||grad||`` per layer (its trainable parameters together); ``None`` where no parameter has a gradient."""
        trainable = {n: [(full, p) for full, p in ps if p.requires_grad] for n, ps in self.layers.items()}
        per_param = layer_norms({full: [p.grad] for ps in trainable.values() for full, p in ps})
        out: dict[str, float | None] = {}
        for n, ps in trainable.items():
            norms = [v for full, _ in ps if (v := per_param.get(full)) is not None]
            out[n] = math.sqrt(sum(v * v for v in norms)) if norms else None
        # a gradient is "there" when it is more than rounding noise (a bias right before BatchNorm gets ~1e-8 of it)
        pending = {full: [p] for ps in trainable.values() for full, p in ps if full not in self.had_grad}
        for full, weight_norm in layer_norms(pending).items():
            grad_norm = per_param.get(full)
            if grad_norm is not None and not grad_norm <= 1e-6 * max(weight_norm or 0.0, 1e-6):
                self.had_grad.add(full)
        return out

    def snapshot(self) -> None:
        """Copy the trainable parameters (into one buffer, reused until :meth:`release`)."""
        params = self.trainable()
        if self._buffer is None:
            self._buffer = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
        else:
            torch._foreach_copy_(
                [b for n in params for b in self._buffer[n]], [p.detach() for ps in params.values() for p in ps]
            )
        self._snapshot = True

    @property
    def pending(self) -> bool:
        """Whether a snapshot waits for :meth:`update_ratios`."""
        return self._snapshot

    def update_ratios(self) -> dict[str, float | None]:
        """``||w - w_snapshot|| / ||w_snapshot||`` per layer."""
        if not self._snapshot or self._buffer is None:
            raise RuntimeError("update_ratios() needs a snapshot() first.")
        self._snapshot = False
        return update_ratios(difference_norms(self.trainable(), self._buffer), layer_norms(self._buffer))

    def release(self) -> None:
        """Drop the copy of the parameters."""
        self._buffer, self._snapshot = None, False

    def status(self, layer: str, judge: bool) -> tuple[list[str], list[str], int, list[str]]:
        """``(unchanged, without gradient, unchanged elements, frozen)`` parameters of ``layer``.

        Args:
            layer: the layer's name.
            judge: list unchanged parameters (after training has run); otherwise only record which changed.
        """
        unchanged, no_grad, elements, frozen = [], [], 0, []
        for full, p in self.layers[layer]:
            if not p.requires_grad:
                frozen.append(full)
            elif full not in self.changed and full in self.initial:
                if not torch.equal(fingerprint(p), self.initial[full]):
                    self.changed.add(full)
                elif judge:
                    unchanged.append(full)
                    elements += p.numel()
                    if full not in self.had_grad:
                        no_grad.append(full)
        return unchanged, no_grad, elements, frozen

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": {k: v.clone() for k, v in self.initial.items()},
            "changed": sorted(self.changed),
            "had_grad": sorted(self.had_grad),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial = {k: v.clone() for k, v in state.get("initial", {}).items()}
        self.changed = set(state.get("changed", ()))
        self.had_grad = set(state.get("had_grad", ()))


class ValidationTaps:
    """Forward hooks that stream BatchNorm input moments and bounded-activation saturation over some batches.

    Hooks live between :meth:`attach` and :meth:`detach` (safe to call twice); the statistics stay until
    :meth:`clear`.
    """

    def __init__(self) -> None:
        self.moments: dict[str, MomentStats] = {}
        self.saturation = SaturationCounter()
        self._hooks: contextlib.ExitStack | None = None

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def __bool__(self) -> bool:
        return bool(self.moments or self.saturation.total)

    def attach(self, model: nn.Module) -> None:
        self.detach()
        with contextlib.ExitStack() as stack:  # a failure on the way removes what was registered
            stack.enter_context(forward_hooks(batchnorm_layers(model), self._moment_hook))
            stack.enter_context(forward_hooks(saturating_layers(model), self._tail_hook))
            self._hooks = stack.pop_all()

    def detach(self) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.close()

    def clear(self) -> None:
        self.moments.clear()
        self.saturation.clear()

    def _moment_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.moments.setdefault(name, MomentStats()).update(inputs[0])

        return hook

    def _tail_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.saturation.add(name, module, output)

        return hook


def extend_probe(
    probe: tuple[torch.Tensor, torch.Tensor] | None, batch: Any, *, take: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``probe`` with up to ``take`` more samples of an ``(inputs, class labels)`` batch, at most ``limit`` in all.

    Other batch structures (dicts, float targets) leave ``probe`` as it is. The samples are copied to the CPU.

    Shape:
        batch: ``(x (N, ...), y (N,) int)``; returns ``(x (M, ...), y (M,))``.
    """
    have = 0 if probe is None else len(probe[1])
    if have >= limit or not isinstance(batch, (list, tuple)) or len(batch) < 2:
        return probe
    x, y = batch[0], batch[1]
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or y.ndim != 1 or y.is_floating_point():
        return probe
    n = min(len(y), take, limit - have)
    x, y = x[:n].detach().cpu().clone(), y[:n].detach().cpu().clone()
    return (x, y) if probe is None else (torch.cat([probe[0], x]), torch.cat([probe[1], y]))


class LossTracker:
    """The training loss as ``training_step`` returned it: the first batch's, and a mean per epoch.

    The sum stays on the loss's device (no host synchronisation per batch) until :meth:`epoch_mean`.
    """

    def __init__(self) -> None:
        self.initial: float | None = None
        self.expect_initial = False
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, loss: torch.Tensor) -> None:
        if self.expect_initial:  # the untrained model's loss (computed before the first optimizer step)
            self.expect_initial = False
            self.initial = float(loss)
        self._sum = loss.detach().float() if self._sum is None else self._sum + loss.detach().float()
        self._count += 1

    def epoch_mean(self) -> float | None:
        """Mean since the last call (``None`` without batches); starts a new epoch."""
        mean = float(self._sum) / self._count if self._sum is not None and self._count else None
        self._sum, self._count = None, 0
        return mean


def gradient_grid(
    samples: Sequence[tuple[int, Mapping[str, float | None]]], names: Sequence[str], max_rows: int
) -> tuple[torch.Tensor, list[str]]:
    """Layers (rows, at most ``max_rows`` evenly spaced) x sampled steps of gradient norms; NaN where missing.

    Returns:
        the grid, shape (rows, len(samples)) float64, and the row names.
    """
    count = len(names)
    rows = list(range(count)) if count <= max_rows else torch.linspace(0, count - 1, max_rows).round().long().tolist()
    nan = float("nan")
    grid = [[nan if (v := norms.get(names[r])) is None else v for _, norms in samples] for r in rows]
    return torch.tensor(grid, dtype=torch.float64).reshape(len(rows), len(samples)), [names[r] for r in rows]


def finite_median(values: Sequence[float | None]) -> float | None:
    """Median of the finite values; ``None`` when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def returned_loss(outputs: Any) -> torch.Tensor | None:
    """The scalar loss in what ``training_step`` returned (a tensor, or a dict with ``"loss"``), detached."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class StepNorms:
    """The total gradient norm of ``params`` at every optimizer step: one ``torch._foreach_norm`` over the gradients
    already there (only read), kept on their device (no host synchronisation per step) until :meth:`summary`.

    Sampled per-layer norms miss a growth that happens between two sampled steps; this does not.

    Args:
        params: the parameters whose gradients count.
        initial_steps: the first finite norms of the fit that make its reference ("the norm at the start").
    """

    def __init__(self, params: Sequence[torch.Tensor], initial_steps: int = 8) -> None:
        self.params, self.initial_steps = list(params), initial_steps
        self.initial: list[float] = []
        self._pending: list[torch.Tensor] = []

    def add(self) -> None:
        """Read the gradients now present (call in ``on_before_optimizer_step``)."""
        grads = [p.grad for p in self.params if p.grad is not None and not p.grad.is_sparse]
        if grads:
            norms = torch._foreach_norm(grads)
            try:  # one device (the usual case): one stack, no conversion per tensor
                total = torch.linalg.vector_norm(torch.stack(norms).float())
            except RuntimeError:  # parameters spread over devices
                device = norms[0].device
                total = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
            self._pending.append(total)

    @property
    def warming(self) -> bool:
        """Whether the reference at the start of the fit still lacks steps (trace every step until it has them)."""
        return len(self.initial) + len(self._pending) < self.initial_steps

    def summary(self, top: int = 3) -> dict[str, Any] | None:
        """The steps since the last call: their number, median, ``top``-th largest finite norm (``peak``: a growth
        lasts several steps, a single spike does not count), largest, non-finite steps, and the reference at the start
        of the fit (median of its first ``initial_steps`` finite norms). ``None`` without steps."""
        if not self._pending:
            return None
        values, self._pending = torch.stack(self._pending).tolist(), []
        finite = [v for v in values if math.isfinite(v)]
        self.initial += finite[: max(0, self.initial_steps - len(self.initial))]
        ordered = sorted(finite)
        return {
            "steps": len(values),
            "median": statistics.median(finite) if finite else None,
            "peak": ordered[-min(top, len(ordered))] if ordered else None,
            "largest": ordered[-1] if ordered else None,
            "nonfinite_steps": len(values) - len(finite),
            "initial": statistics.median(self.initial) if self.initial else None,
        }


class Thinning:
    """How often a per-step measurement runs so that it costs at most ``share`` of the training step's time: the
    interval only ever grows (never below ``every``), and the epoch's first step is always measured.

    Args:
        every: the smallest interval, in optimizer steps.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.seconds = 0.0  #: what the measurements cost since :meth:`adapt` was last called

    def due(self, call: int) -> bool:
        """Whether the ``call``-th optimizer step of the epoch (1-based) is measured."""
        return (call - 1) % self.every == 0

    def adapt(self, share: float, step_seconds: float | None, grow: bool = True) -> None:
        """Widen the interval so that the cost measured last keeps to ``share`` of ``step_seconds``, and start a new
        one (a suite's budget counts the cost itself, with the hook it was spent in)."""
        seconds, self.seconds = self.seconds, 0.0
        if grow and seconds and step_seconds:
            self.every = max(self.every, math.ceil(seconds / (share * step_seconds)))
