"""Find a model's layers by name and kind, with error messages that list what is available."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_viz import _validate as check


def layers_of_kind(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    """Named submodules of ``model`` that are instances of ``kinds``, in module order."""
    return {name: module for name, module in model.named_modules() if name and isinstance(module, kinds)}


def _kind_names(kinds: tuple[type[nn.Module], ...]) -> str:
    return " / ".join(f"nn.{k.__name__}" for k in kinds)


def _short_list(names: Sequence[str], limit: int = 40) -> str:
    shown = list(names)[:limit]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"


class NotApplicableError(ValueError):
    """A monitor's *default* target does not exist in this model (no ``nn.Conv2d`` for the filters of an MLP): the
    monitor steps aside with a warning. A layer the user named and that is missing stays a plain ``ValueError``."""


def resolve_layers(
    model: nn.Module,
    names: Sequence[str] | None,
    kinds: tuple[type[nn.Module], ...],
    *,
    argument: str = "layers",
    default: str = "first",
) -> dict[str, nn.Module]:
    """Resolve layer ``names`` (or a default) to modules of the right kind.

    Args:
        model: the model to search.
        names: layer names as in ``model.named_modules()``, or ``None`` for the default.
        kinds: allowed module classes.
        argument: the argument's name, for error messages.
        default: ``"first"``, ``"last"`` or ``"all"`` layers of the right kind when ``names`` is ``None``.

    Raises:
        TypeError: ``names`` is not a list of strings.
        ValueError: ``names`` is empty; the model has no layer of the right kind; a name is unknown (the message
            lists the candidates); a named layer is of another kind.
    """
    candidates = layers_of_kind(model, kinds)
    if names is None:
        if not candidates:
            raise NotApplicableError(f"`{argument}`: the model has no {_kind_names(kinds)} layer to monitor.")
        items = list(candidates.items())
        if default == "first":
            return dict(items[:1])
        if default == "last":
            return dict(items[-1:])
        return dict(items)
    check.layer_names(argument, names)
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules or not name:
            raise ValueError(
                f"`{argument}`: the model has no layer named {name!r}. "
                f"Its {_kind_names(kinds)} layers are: {_short_list(list(candidates))}."
            )
        module = modules[name]
        if not isinstance(module, kinds):
            raise ValueError(
                f"`{argument}`: layer {name!r} is a {type(module).__name__}, not a {_kind_names(kinds)}. "
                f"Layers of that kind: {_short_list(list(candidates))}."
            )
        resolved[name] = module
    return resolved


def model_device(model: nn.Module):
    """The device of a model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device

    return torch.device("cpu")


def detached_deepcopy(model: nn.Module, copier=None) -> nn.Module:
    """``copy.deepcopy`` of a model without what hangs off it: a LightningModule's Trainer (with its loaders, loggers
    and threads) is left out of the copy and kept on the original."""
    import contextlib
    import copy

    copier = copier or copy.deepcopy
    saved = []
    for module in model.modules():
        if getattr(module, "_trainer", None) is not None:
            saved.append((module, module.__dict__["_trainer"]))
            module.__dict__["_trainer"] = None
    try:
        return copier(model)
    finally:
        for module, trainer in saved:
            with contextlib.suppress(Exception):
                module.__dict__["_trainer"] = trainer


def evenly_spaced(count: int, limit: int) -> list[int]:
    """All of ``range(count)`` when it has at most ``limit`` items, else ``limit`` evenly spaced indices."""

    if count <= limit:
        return list(range(count))
    return torch.linspace(0, count - 1, limit).round().long().unique().tolist()


def check_channel_range(argument: str, indices: Sequence[int] | None, count: int | None, where: str) -> None:
    """Raise ``ValueError`` when one of ``indices`` (already checked by ``_validate.indices``) is not below ``count``.

    ``None`` for ``indices`` (the default choice) or ``count`` (not known yet) passes. ``where`` completes the message
    after "out of range", e.g. ``" for layer 'conv1', which has 8 channels (0..7)"``.
    """
    if indices is None or count is None or max(indices) < count:
        return
    raise ValueError(f"`{argument}`: index {max(indices)} is out of range{where}.")


# ------------------------------------------------------------------------------------------- data flow
# Default layers are chosen by what a forward pass does, not by registration order: the head is the last nn.Linear
# whose output reaches the model's output (an auxiliary head registered after it, or called on the side, is not),
# the "last conv" is the last one called on the way to the output, and a vision transformer's patch grid is read off
# its patch embedding's output.


@dataclass(frozen=True)
class TokenGrid:
    """How a token sequence ``(N, T, D)`` lies over the image: ``prefix`` leading tokens (class, distillation,
    registers), then ``rows x cols`` patch tokens in row-major order.

    Found from the model (:func:`trace_data_flow`): the grid is the patch embedding's output size, the prefix what
    the token sequences have beyond it. Never guessed from a token count.
    """

    prefix: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        """Tokens of a sequence on this grid: the prefix and the patches."""
        return self.prefix + self.rows * self.cols

    def patch_box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The pixels of patch ``(row, col)`` in an ``height x width`` image: (top, left, bottom, right), exclusive."""
        return (
            row * height // self.rows,
            col * width // self.cols,
            (row + 1) * height // self.rows,
            (col + 1) * width // self.cols,
        )

    def window(self, height: int, width: int) -> int:
        """The side of a square window one patch large (the smaller of a patch's sides)."""
        return max(1, min(height // self.rows, width // self.cols))


def spatial_view(output: torch.Tensor, *, grid: TokenGrid | None = None, channels_last: bool = False) -> torch.Tensor:
    """A layer's output as a channels-first map: (N, C, H, W) as it is, a channels-last (N, H, W, C) permuted, and
    a token sequence (N, T, D) on ``grid`` without its prefix tokens, reshaped to (N, D, rows, cols). Differentiable.

    Raises:
        ValueError: the output is none of these.
    """
    if output.ndim == 3 and grid is not None and output.shape[1] == grid.tokens:
        patches = output[:, grid.prefix :]
        return patches.reshape(len(output), grid.rows, grid.cols, -1).permute(0, 3, 1, 2)
    if output.ndim == 4:
        return output.permute(0, 3, 1, 2) if channels_last else output
    expected = f"(N, {grid.tokens}, D) tokens, " if grid is not None else ""
    raise ValueError(f"the layer's output has shape {tuple(output.shape)}, not {expected}(N, C, H, W) or (N, H, W, C).")


@dataclass(frozen=True)
class Call:
    """One module call of a traced forward pass.

    Attributes:
        name, module: the module (its first name in ``named_modules``).
        shape: the shape of its output (the first tensor of a tuple).
        connected: its output reaches the model's output (autograd connects them).
        channels_last: a 4-D output with channels on the last axis (``nn.Linear`` / ``nn.LayerNorm`` on a map).
        started: how many calls had returned when this one started (the calls it made itself come after that).
    """

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    connected: bool
    channels_last: bool = False
    started: int = 0


@dataclass
class DataFlow:
    """What one forward pass of a probe showed (:func:`trace_data_flow`): module calls in the order they returned."""

    calls: list[Call]
    output_shape: tuple[int, ...]
    grid: TokenGrid | None = None
    patch_embedding: str | None = None
    attention: frozenset[str] = frozenset()  #: names of the attention modules called

    def _last(self, keep: Callable[[Call], bool]) -> Call | None:
        return next((c for c in reversed(self.calls) if c.connected and keep(c)), None)

    def head(self) -> str | None:
        """The last ``nn.Linear`` called whose output reaches the model's output: the layer that makes the logits
        (its input is the code that feeds the head)."""
        call = self._last(lambda c: isinstance(c.module, nn.Linear))
        return call.name if call is not None else None

    def first_of(self, kinds: tuple[type[nn.Module], ...]) -> str | None:
        """The first module of ``kinds`` called on the way to the output."""
        return next((c.name for c in self.calls if c.connected and isinstance(c.module, kinds)), None)

    def last_of(self, kinds: tuple[type[nn.Module], ...]) -> str | None:
        """The last module of ``kinds`` called on the way to the output."""
        call = self._last(lambda c: isinstance(c.module, kinds))
        return call.name if call is not None else None

    def is_token_output(self, call: Call) -> bool:
        """Whether ``call`` returned a token sequence on the model's patch grid."""
        g = self.grid
        return g is not None and len(call.shape) == 3 and call.shape[1] == g.tokens

    def spatial_layer(self) -> str | None:
        """The layer a class map (Grad-CAM) is best read from. On a vision transformer with a class token, the
        input of the last attention module (the last token layer of the model's width that returned before it
        started, e.g. the last block's ``norm1``): later, only the class token reaches the head. Without a class
        token, the last token layer on the grid. Else the last 2-D map larger than 1x1 on the way to the output: a
        ``Conv2d``, or a channels-last map (``nn.Linear`` / ``nn.LayerNorm`` on (N, H, W, C) in ConvNeXt blocks)."""
        if self.grid is not None:
            width = self.grid_width()
            before = len(self.calls)
            if self.grid.prefix > 0 and self.attention:
                before = max(c.started for c in self.calls if c.name in self.attention)
            tokens = [c for c in self.calls[:before] if self.is_token_output(c) and c.shape[-1] == width]
            call = next((c for c in reversed(tokens) if c.connected), None)
            if call is not None:
                return call.name

        def spatial(c: Call) -> bool:
            if len(c.shape) != 4:
                return False
            if c.channels_last:
                return c.shape[1] * c.shape[2] > 1
            return isinstance(c.module, nn.Conv2d) and c.shape[2] * c.shape[3] > 1

        call = self._last(spatial)
        return call.name if call is not None else None

    def grid_width(self) -> int | None:
        """The token width: the patch embedding's output channels."""
        call = next((c for c in self.calls if c.name == self.patch_embedding), None)
        return call.shape[1] if call is not None else None

    def hidden_layer(self, kinds: tuple[type[nn.Module], ...]) -> str | None:
        """On a vision transformer, the last activation module (of ``kinds``) called on token sequences: the hidden
        units of the last block's MLP; ``None`` on other models."""
        call = self._last(lambda c: isinstance(c.module, kinds) and self.is_token_output(c))
        return call.name if call is not None else None

    def call(self, name: str) -> Call | None:
        """The last call of the module ``name``."""
        return next((c for c in reversed(self.calls) if c.name == name), None)

    def view_of(self, name: str | None) -> tuple[TokenGrid | None, bool]:
        """How to read the output of layer ``name`` as a map (:func:`spatial_view`): its token grid (token
        outputs) and whether its channels are last."""
        call = self.call(name) if name is not None else None
        if call is None:
            return None, False
        return (self.grid if self.is_token_output(call) else None), call.channels_last


def map_layer(model: nn.Module, name: str | None, argument: str) -> tuple[str, nn.Module]:
    """A layer to read a class map from (Grad-CAM): the one named, an ``nn.Conv2d`` or, on a model with attention,
    a block or ``LayerNorm`` with token outputs; by default, provisionally, the last registered ``Conv2d`` (the
    data flow on a probe decides later, :meth:`DataFlow.spatial_layer`).

    Raises:
        NotApplicableError: no name and no ``Conv2d``.
        ValueError: an unknown name, or a layer of another kind (the message lists the ``Conv2d`` layers).
    """
    try:
        layers = resolve_layers(
            model, None if name is None else [name], (nn.Conv2d,), argument=argument, default="last"
        )
    except NotApplicableError:
        raise
    except ValueError:
        from lightning_viz.functional.attention import looks_like_attention

        module = dict(model.named_modules()).get(name or "")
        transformer = any(looks_like_attention(m) for m in model.modules())
        if module is None or not (transformer and (isinstance(module, nn.LayerNorm) or any(module.children()))):
            raise
        return str(name), module
    return next(iter(layers.items()))


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, dict):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _channels_last(module: nn.Module, output: torch.Tensor) -> bool:
    if output.ndim != 4:
        return False
    from lightning_viz.functional.activations import layer_layout

    layout = layer_layout(module)
    return layout is not None and layout.axis_for(output) in (-1, 3)


def _token_grid(calls: list[tuple[str, nn.Module, torch.Tensor]]) -> tuple[TokenGrid | None, str | None]:
    """The patch grid: the first ``Conv2d``'s output size, when token sequences of its width follow with at most 8
    prefix tokens (the longest such sequence gives the prefix)."""
    first = next(((n, m, t) for n, m, t in calls if isinstance(m, nn.Conv2d) and t.ndim == 4), None)
    if first is None:
        return None, None
    name, _, out = first
    width, rows, cols = out.shape[1:]
    lengths = [t.shape[1] for _, _, t in calls if t.ndim == 3 and t.shape[-1] == width]
    fitting = [n - rows * cols for n in lengths if 0 <= n - rows * cols <= 8]
    if not fitting:
        return None, name
    return TokenGrid(max(fitting), int(rows), int(cols)), name


_FLOWS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], DataFlow]] = weakref.WeakKeyDictionary()
#: Seconds spent tracing so far in this process: a monitor's call subtracts what it spent here from the cost the
#: budget expects of its later calls (a trace is made once per model and input shape, not at every call).
traced_seconds = [0.0]


def trace_data_flow(model: nn.Module, x: torch.Tensor) -> DataFlow:
    """Run ``model`` on a probe ``x`` (one image is enough) and record which modules it calls, in what order, what
    they return and whether that reaches the model's output.

    The monitors of a suite share one trace per model, module structure and input shape and type (the flow
    holds no tensors; the first monitor to ask pays for it, about a forward and backward pass).

    The caller puts the model in eval mode and isolates the pass (``_hooks.isolated``); here the parameters are
    frozen, the probe is a fresh copy, hooks are removed whatever happens and no ``.grad`` is written (the
    connections come from ``torch.autograd.grad``). The network sees a clone of each output, so in-place
    operations downstream leave the recorded tensors alone.

    Shape:
        x: the model's input, (N, C, H, W).
    """
    key = (tuple(x.shape[1:]), x.dtype, x.device, tuple(id(m) for m in model.modules()))
    try:
        flows = _FLOWS.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: traced at every call
        flows = {}
    if key not in flows:
        started = time.perf_counter()
        flows[key] = _trace(model, x)
        traced_seconds[0] += time.perf_counter() - started
    return flows[key]


def _trace(model: nn.Module, x: torch.Tensor) -> DataFlow:
    from lightning_viz._hooks import forward_hooks
    from lightning_viz.functional._autograd import gradient_context
    from lightning_viz.functional.attention import looks_like_attention

    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        if name and id(module) not in seen:
            seen[id(module)] = name
    modules = {name: module for name, module in model.named_modules() if name and seen[id(module)] == name}
    recorded: list[tuple[str, nn.Module, torch.Tensor]] = []
    started: dict[str, list[int]] = {}
    attention: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            start = started[name].pop() if started.get(name) else len(recorded)
            tensor = _first_tensor(output)
            if tensor is None or not tensor.is_floating_point() or not tensor.requires_grad:
                return None
            starts.append(start)
            recorded.append((name, module, tensor))
            if looks_like_attention(module):
                attention.add(name)
            if isinstance(output, torch.Tensor):
                return output.clone()
            return None

        return hook

    def pre_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            started.setdefault(name, []).append(len(recorded))

        return hook

    starts: list[int] = []
    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in modules.items()]
    try:
        with gradient_context(model), forward_hooks(modules, make_hook):
            leaf = x.detach().clone().float() if not x.is_floating_point() else x.detach().clone()
            leaf.requires_grad_(True)
            output = _first_tensor(model(leaf.clone()))
    finally:
        for handle in handles:
            handle.remove()
    if output is None or not output.requires_grad:
        raise ValueError("the model's output is not a tensor computed from its input; its layers cannot be traced.")
    grid, patch = _token_grid(recorded)
    tensors = [t for _, _, t in recorded]
    with gradient_context(model):
        grads = torch.autograd.grad(output.float().sum(), tensors, allow_unused=True) if tensors else ()
    calls = [
        Call(name, module, tuple(t.shape), g is not None, _channels_last(module, t), start)
        for (name, module, t), g, start in zip(recorded, grads, starts)
    ]
    return DataFlow(calls, tuple(output.shape), grid, patch, frozenset(attention))


def head_module(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The model's head by data flow (:meth:`DataFlow.head`), traced on probe ``x`` with the model isolated (eval
    mode, RNG and modes restored); ``None`` when the forward pass cannot be traced."""
    from lightning_viz._hooks import isolated

    try:
        with isolated(model, grad=True):
            name = trace_data_flow(model, x.to(model_device(model))).head()
    except Exception:
        return None
    return model.get_submodule(name) if name is not None else None


def last_linear(model: nn.Module) -> nn.Module:
    """The last registered ``nn.Linear``: a provisional head until :func:`head_module` has a probe to trace.

    Raises:
        NotApplicableError: the model has no ``nn.Linear``.
    """
    linears = layers_of_kind(model, (nn.Linear,))
    if not linears:
        raise NotApplicableError(
            "`layer`: the model has no nn.Linear, so there is no default code layer; name the layer whose "
            "output is the code, e.g. `layer='avgpool'`."
        )
    return list(linears.values())[-1]
