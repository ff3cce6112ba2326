"""Find a model's layers by name and kind, with error messages that list what is available."""

from __future__ import annotations

from collections.abc import Sequence

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
    import torch

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
    import torch

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
