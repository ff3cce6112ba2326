"""The records of :class:`~lightning_viz.SaliencyMonitor`'s table of methods: a new method is one ``Method`` entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Inputs:
    """What a method explains: each row's image ``xr`` and ``target`` class, the probes ``x`` and each row's probe
    ``index``; on the ``model`` itself or its frozen folded copy ``fast`` (the model when no method needs one)."""

    model: nn.Module
    fast: nn.Module
    xr: torch.Tensor
    target: torch.Tensor
    x: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class Column:
    """A column of the grid: its key in its method's result, its title, and how maps become tiles: ``draw(maps)``,
    or ``draw(maps, display_images)`` when drawn ``on_image``."""

    key: str
    title: str
    draw: Callable[..., torch.Tensor]
    on_image: bool = True


@dataclass(frozen=True)
class Method:
    """A saliency method: ``compute(monitor, inputs)`` returns maps by column key; ``runs_on_copy``: it may run on
    the frozen folded copy of the model (the monitor then builds one)."""

    name: str
    runs_on_copy: bool
    compute: Callable[[Any, Inputs], dict[str, torch.Tensor]]  # (the SaliencyMonitor, inputs)
    columns: tuple[Column, ...]
