"""How a batch becomes the model's input: one rule for every monitor, and one way to change it.

The monitors keep samples from the batches the Trainer produced (:mod:`lightning_viz._data`) and later call the
model on them. Both steps need to know which part of a batch is the model's input and which is the target. In
order of precedence:

1. ``input_fn=`` given to a monitor (or to ``default_suite``, for all of them): ``input_fn(batch) -> (inputs,
   target)``;
2. a method ``viz_input(self, batch) -> (inputs, target)`` on the LightningModule;
3. the default rule (:func:`default_input_fn`).

``inputs`` is a tensor ``(N, ...)``, or a tuple ``(image, *more)`` for a model called as ``model(image, *more)``;
``target`` is ``(N,)`` integer class labels or ``None``. The monitors that show or perturb images (saliency,
exemplars, embedding sprites, activation maps, feature visualisation) vary the first input; the other inputs follow
each row: a row gets those of the kept sample (or probe) it is, or was made from (a noisy copy, an occluded copy),
and only rows made from none of them (feature visualisation) get the first sample's (:func:`model_inputs`).

Every call of ours goes through :func:`model_inputs`: floating-point inputs are cast to the model's dtype and
device (``precision="bf16-true"`` / ``"16-true"``: probes are float32, weights bfloat16/float16, and gradients
with respect to the float32 input still flow), and floating-point outputs come back as float32.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_viz._layers import model_device

#: ``input_fn(batch) -> (inputs, target)``
InputFn = Callable[[Any], tuple[Any, Any]]

#: Dict keys the default rule reads, first match wins.
INPUT_KEYS = ("image", "images", "pixel_values", "img", "x", "input", "inputs")
TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")

FIX = (
    "Say how a batch becomes the model's input with `input_fn=lambda batch: (inputs, target)` (a monitor's or "
    "`default_suite`'s argument), or a method `viz_input(self, batch)` on your LightningModule returning the same."
)


class BatchNotUnderstood(TypeError):
    """The default rule cannot tell the model's input in a batch; the message names the cause and the fix."""


def default_input_fn(batch: Any) -> tuple[Any, Any]:
    """The default rule: ``(inputs, target)`` of a batch.

    - a tensor: it is the input; no target.
    - a dict (or other mapping): the input under the first of :data:`INPUT_KEYS` present, the target under the first
      of :data:`TARGET_KEYS` present.
    - a tuple or list, e.g. ``(x, y)`` or ``(path, image, label)``: the input is the first floating-point tensor with
      at least 2 dimensions ``(N, ...)`` (strings, paths, index tensors are skipped); the target is the one tensor of
      shape ``(N,)`` after it (none when there are several: which one is the label cannot be told).

    Raises:
        BatchNotUnderstood: no input can be found; the message names the batch's structure and the fix.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            raise BatchNotUnderstood(
                f"a dict batch with keys {sorted(map(str, batch))} has none of the input keys {list(INPUT_KEYS)}."
            )
        target = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        return batch[key], target
    if isinstance(batch, (tuple, list)):
        first = next((i for i, v in enumerate(batch) if _is_input(v)), None)
        if first is None:
            kinds = ", ".join(_describe(v) for v in batch)
            raise BatchNotUnderstood(f"a {type(batch).__name__} batch ({kinds}) has no floating-point tensor (N, ...).")
        n = len(batch[first])
        targets = [v for v in batch[first + 1 :] if isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == n]
        return batch[first], targets[0] if len(targets) == 1 else None
    raise BatchNotUnderstood(f"a batch of type {type(batch).__name__} is neither a tensor, a dict nor a tuple.")


def _is_input(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def resolve_input_fn(input_fn: InputFn | None, pl_module: Any) -> tuple[InputFn, str]:
    """The function that splits a batch, and how it was chosen (for messages)."""
    if input_fn is not None:
        return input_fn, "`input_fn`"
    method = getattr(pl_module, "viz_input", None)
    if callable(method):
        return method, f"{type(pl_module).__name__}.viz_input"
    return default_input_fn, "the default rule"


def split_inputs(inputs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """``(first input, the other inputs)`` of what an ``input_fn`` returned as the model's inputs."""
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise BatchNotUnderstood("`input_fn` returned no model input (an empty tuple).")
        return inputs[0], tuple(inputs[1:])
    return inputs, ()


def single_input_pair(batch: Any, input_fn: InputFn | None, pl_module: Any) -> tuple[torch.Tensor, Any] | None:
    """``(model input, target)`` of a batch for work that calls the model with one input (``input_fn``, else the
    module's ``viz_input``, else the default rule); ``None`` when the model takes other inputs too or it cannot tell."""
    try:
        inputs, target = resolve_input_fn(input_fn, pl_module)[0](batch)
        first, extra = split_inputs(inputs)
    except Exception:
        return None
    return (first, target) if isinstance(first, torch.Tensor) and not extra else None


def class_labels(target: Any, n: int) -> torch.Tensor | None:
    """``(n,)`` long class labels from a target, or ``None`` when it holds none (float scores, multi-label rows).

    Integer-valued float targets of shape ``(n,)`` or ``(n, 1)`` (a binary classifier's 0./1.) are class labels.
    """
    if target is None:
        return None
    try:
        target = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        return None
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 1 or len(target) != n or target.dtype == torch.bool:
        return None
    if target.is_floating_point():
        if not bool(torch.all(target == target.round())):
            return None
        return target.long()
    return target if target.dtype == torch.long else target.long()


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer); ``None`` for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # lazily: called on every forward pass
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _cast(value: Any, dtype: torch.dtype | None, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and dtype is not None and value.dtype != dtype:
            value = value.to(device=device, dtype=dtype)
        return value.to(device) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype, device) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype, device) for v in value]
    return value


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_as_float32(v) for v in value)
    if isinstance(value, list):
        return [_as_float32(v) for v in value]
    return value


class RowSources:
    """Which of the kept ``rows`` each row of a batch is, or was made from (:meth:`of`); the rows' coarse views
    and gaps are computed once, on first use, for all the calls of one :func:`model_inputs` body.

    Row ``j`` is the source when it is the nearest (squared distance, images average-pooled to at most 32x32) by a
    clear margin: the second nearest is farther by at least half the squared distance from ``j`` to its own nearest
    other row. Exact for the row itself; a noisy copy (SmoothGrad's noise adds about the same to every distance) or
    a partly occluded copy keeps its source. Rows made from none of them (e.g. feature visualisation's images) get
    0, the first sample's, unless one row stands out.
    """

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self._coarse: torch.Tensor | None = None
        self._gap: torch.Tensor | None = None

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (N, ...) with the rows' trailing shape; returns (N,) long on ``x``'s device."""
        if len(self.rows) <= 1 or tuple(x.shape[1:]) != tuple(self.rows.shape[1:]):
            return torch.zeros(len(x), dtype=torch.long, device=x.device)
        with torch.no_grad():
            if self._coarse is None or self._coarse.device != x.device:
                self._coarse = _coarse(self.rows.to(x.device))
                gap = torch.cdist(self._coarse, self._coarse).square()
                gap.fill_diagonal_(float("inf"))
                self._gap = gap.min(dim=1).values
            assert self._gap is not None
            two = torch.cdist(_coarse(x), self._coarse).square().topk(2, dim=1, largest=False)
            index = two.indices[:, 0]
            clear = two.values[:, 1] - two.values[:, 0] >= self._gap[index] / 2
        return torch.where(clear, index, torch.zeros_like(index))


def source_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each row of ``x``, the index of the row of ``rows`` it is, or was made from; 0 where none stands out
    (:class:`RowSources`).

    Shape:
        x: (N, ...); rows: (K, ...) with the same trailing shape; returns (N,) long on ``x``'s device.
    """
    return RowSources(rows).of(x)


def _coarse(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float()
    if t.ndim == 4:
        t = torch.nn.functional.adaptive_avg_pool2d(t, (min(32, t.shape[-2]), min(32, t.shape[-1])))
    return t.flatten(1)


def extra_for_rows(
    x: torch.Tensor, extra: tuple[torch.Tensor, ...], rows: torch.Tensor | RowSources | None = None
) -> tuple[torch.Tensor, ...]:
    """The model's other inputs for each row of ``x``: row ``i`` gets ``e[source_rows(x, rows)[i]]`` of each
    ``e`` in ``extra`` (``(K, ...)``, one per row of ``rows``); without ``rows``, ``extra`` (each ``(1, ...)``)
    expanded to the batch."""
    sources = RowSources(rows) if isinstance(rows, torch.Tensor) else rows
    if sources is None or len(sources.rows) <= 1 or any(len(e) != len(sources.rows) for e in extra):
        return tuple(e[:1].expand(len(x), *e.shape[1:]) for e in extra)
    index = sources.of(x)
    return tuple(e.to(index.device)[index] for e in extra)


@contextlib.contextmanager
def model_inputs(
    model: nn.Module, extra: tuple[torch.Tensor, ...] = (), rows: torch.Tensor | None = None
) -> Iterator[None]:
    """Within the body, the model takes our inputs as they are (float32 images on the CPU).

    A forward pre-hook casts floating-point inputs to the model's dtype and device and, when the model has more
    inputs than the image, appends them (:func:`extra_for_rows`: with ``rows``, the kept samples whose other inputs
    ``extra`` holds, ``(K, ...)`` each, every row gets those of the sample it was made from; without, ``extra``'s
    ``(1, ...)`` values for all rows); a forward hook hands floating-point outputs back as float32 (bfloat16 has no
    NumPy type, and softmax in bfloat16 is coarse). The casts are differentiable, so a gradient with respect to a
    float32 input is float32. Both hooks are removed on exit.
    """

    sources = RowSources(rows) if rows is not None else None

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if extra and len(args) == 1 and isinstance(args[0], torch.Tensor):
            args = (args[0], *extra_for_rows(args[0], extra, sources))
        return _cast(args, model_dtype(module), model_device(module))

    def after(module: nn.Module, args: Any, output: Any) -> Any:
        return _as_float32(output) if model_dtype(module) not in (None, torch.float32) else output

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_hint(exc: BaseException) -> str | None:
    """The cause, in words, when ``exc`` says the model could not take the inputs we gave it; else ``None``."""
    text = str(exc)
    if isinstance(exc, TypeError) and "forward()" in text and ("positional argument" in text or "missing" in text):
        return "the monitors cannot call your model with the image alone (it seems to take more inputs)."
    mismatch = ("should be the same", "expected scalar type", "Expected all tensors to be on the same device")
    if isinstance(exc, RuntimeError) and any(m in text for m in mismatch):
        return "the monitors' inputs do not match the model's dtype or device, and could not be cast."
    return None
