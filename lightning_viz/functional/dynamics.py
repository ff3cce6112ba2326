"""Training dynamics, read-only: gradient and update norms per layer, BatchNorm running statistics against the data,
saturation of bounded activations, parameters that never change. Pure tensor code on plain ``nn.Module``s.

Nothing here writes to a parameter, a ``.grad`` or a buffer; the one function that runs BatchNorm with batch
statistics (:func:`batch_stat_forward`) puts the running statistics back exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    index = torch.linspace(0, flat.numel() - 1, min(points, flat.numel()), device=flat.device).long()
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
        outputs are not (N, C) logits for the labels (not a classifier).

    Shape:
        images: (N, ...); labels: (N,) int64.
    """
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
