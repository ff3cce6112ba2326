"""The table of :class:`~lightning_viz.SaliencyMonitor`'s methods (what each computes and how its columns are drawn):
a new method is one ``Method`` entry in :data:`TABLE`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_viz import render
from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal


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
    shared: dict[str, Any] = field(default_factory=dict)  #: what several methods of one call compute together


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


#: The methods that are the input gradient under a ReLU backward rule: they share one forward pass per call.
RELU_RULES = {"gradient": "plain", "guided_backprop": "guided", "deconvnet": "deconvnet"}


def _relu_rules(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    """The input gradients of this call's ReLU-rule methods, computed once for all of them (one forward pass, a
    backward pass per rule)."""
    if "relu rules" not in i.shared:
        rules = [rule for name, rule in RELU_RULES.items() if name in m.methods]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no nn.ReLU to swap: said once at setup
            i.shared["relu rules"] = sal.relu_rule_gradients(i.fast, i.xr, i.target, rules, batch_size=m.batch_size)
    return i.shared["relu rules"]


def _gradient(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    return {"map": _relu_rules(m, i)["plain"].abs().amax(dim=1)}


def _smoothgrad(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    # a generator seeded alike at every call: the same noise at every epoch, so maps stay comparable
    options = {"n": m.smoothgrad_samples, "noise_level": m.noise_level, "generator": m._generator()}
    return {"map": sal.smoothgrad(i.fast, i.xr, i.target, **options, batch_size=m.batch_size)}


def _rule(rule: str) -> Callable[[Any, Inputs], dict[str, torch.Tensor]]:
    def compute(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
        return {"map": _relu_rules(m, i)[rule]}

    return compute


def _gradcam(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    assert m._gradcam_name is not None
    on = sal.calling_copy(i.fast, i.model, m._gradcam_name)
    layer, (grid, channels_last) = on.get_submodule(m._gradcam_name), m._gradcam_view
    options = {"batch_size": m.batch_size, "grid": grid, "channels_last": channels_last}
    return {"map": sal.grad_cam(on, i.xr, i.target, layer, **options)}


def _fullgrad(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    return {"map": sal.fullgrad(i.model, i.xr, i.target, batch_size=m.batch_size)}


def _occlusion(m: Any, i: Inputs) -> dict[str, torch.Tensor]:
    # every probe once (not once per row), then each row reads its class. The folded copy has no `occlusion_layer`
    # to hook, so a layer map runs on the model itself.
    on, x, bs = i.fast if m._occlusion_module is None else i.model, i.x, m.batch_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", occ.IncrementalMismatchWarning)
        result = occ.occlusion(
            on, x, window=m._window, stride=m._stride, baseline=m.occlusion_baseline,
            max_batch_bytes=bs * x[0].numel() * x.element_size(), layer=m._occlusion_module,
        )  # fmt: skip
    for w in caught:  # the fallback to full passes is said once per run, not at every call
        if issubclass(w.category, occ.IncrementalMismatchWarning):
            m._warn_once("occlusion incremental", f"SaliencyMonitor: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result.rows(i.index).upsampled(i.target, tuple(x.shape[-2:]), m.head)


#: The methods, in the order their columns appear: a new method is one entry here.
TABLE = (
    Method("gradient", True, _gradient, (Column("map", "gradient", render.heat_tiles),)),
    Method("smoothgrad", True, _smoothgrad, (Column("map", "smoothgrad", render.heat_tiles),)),
    Method("guided_backprop", True, _rule("guided"), (Column("map", "guided bp", render.signed_tiles, False),)),
    Method("deconvnet", True, _rule("deconvnet"), (Column("map", "deconvnet", render.signed_tiles, False),)),
    Method("gradcam", True, _gradcam, (Column("map", "Grad-CAM", render.heat_tiles),)),
    Method("fullgrad", False, _fullgrad, (Column("map", "FullGrad", render.heat_tiles),)),  # needs BatchNorm biases
    Method(
        "occlusion",
        True,
        _occlusion,
        (
            Column("probability", "occl. prob", render.probability_tiles),
            Column("top_class", "occl. top", render.class_map_tiles, False),
            Column("layer_total", "occl. act", render.heat_tiles),
        ),
    ),
)
#: The colour bar each column's title needs under the grid (heat maps, occlusion probabilities).
BARS = {"gradient": "saliency", "smoothgrad": "saliency", "Grad-CAM": "saliency", "FullGrad": "saliency",
         "occl. act": "saliency", "occl. prob": "occlusion"}  # fmt: skip
BY_NAME = {method.name: method for method in TABLE}
#: Available methods, in the order their columns appear.
METHODS = tuple(BY_NAME)
