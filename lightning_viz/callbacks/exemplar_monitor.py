"""ExemplarMonitor: the dataset images that most excite each channel, and what part of them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._classes import class_name, find_class_names
from lightning_viz._hooks import capture
from lightning_viz._layers import (
    TokenGrid,
    check_channel_range,
    evenly_spaced,
    model_device,
    resolve_layers,
    spatial_view,
    trace_data_flow,
)
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import exemplars as X
from lightning_viz.functional.activations import activation_kinds
from lightning_viz.records import ExemplarStats

ProjectionRule = Literal["guided", "deconvnet"]


class ExemplarMonitor(VizCallback):
    """Top-k dataset images per channel, the receptive-field crop under the strongest unit, and its projection.

    Every ``every_n_epochs`` (default 5), the monitor streams over up to ``max_samples`` validation samples (a seeded
    reservoir over the first whole validation pass, kept on the CPU: it represents the whole set even when the set is
    sorted by class; the first training epoch's batches when there is no validation), keeping per channel only the
    ``top_k`` highest spatial-maximum activations, their positions in the pass and locations. The monitor never reads
    the dataset itself; the step-0 view is computed from the initial weights once the pass ran. It then draws, per
    layer (tag ``exemplars/<layer>``), one row per
    channel with, for each exemplar: the image with the unit's receptive field outlined, the crop under the receptive
    field, and the guided-backprop (or deconvnet) projection of that single activation, cropped the same way (Zeiler &
    Fergus; Springenberg et al.). Receptive fields are computed on the model (exact, see
    :func:`lightning_viz.functional.exemplars.receptive_field_boxes`). A text panel ``exemplars/indices/<layer>``
    lists each channel's exemplars (their positions in the validation pass: dataset indices for an unshuffled loader)
    and scores.

    Args:
        layers: names of spatial layers (``nn.Conv2d`` or any module with (N, C, H, W) output, or token outputs on
            a vision transformer); default by data flow on a kept sample: on a vision transformer the hidden units
            of the last MLP (each exemplar boxed on its top patch), else the last ``Conv2d`` map larger than 1x1 called.
        channels: channel indices (the same for every layer); default up to ``max_channels`` evenly spaced ones.
        top_k: exemplars per channel (was ``k``).
        max_samples: at most this many samples are kept and scanned per call.
        projection_rule: ``"guided"`` (guided backprop) or ``"deconvnet"``: the ReLU rule of the single-unit
            projection (was ``projection``).
        show_full: also show the whole image with the receptive field outlined (off by default: it adds half
            again to the image's size on disk).
        tile_size: pixels per tile; batch_size: images per forward pass.
        **kwargs: ``every_n_epochs`` (default 5), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "exemplars"
    publishes = (ExemplarStats,)
    default_every_n_epochs = 5
    budget_knobs = {"max_samples": 32, "max_channels": 4, "top_k": 3}
    budget_fixed_seconds = 0.02  # one panel, one text table
    label = "exemplars"
    images_only = True

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        channels: Sequence[int] | None = None,
        max_channels: int = 16,
        top_k: int = 9,
        max_samples: int = 2000,
        projection_rule: ProjectionRule = "guided",
        show_full: bool = False,
        tile_size: int = 32,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        moved = check.renamed("ExemplarMonitor", kwargs, {"k": "top_k", "projection": "projection_rule"})
        top_k = moved.get("top_k", top_k)
        projection_rule = moved.get("projection_rule", projection_rule)
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.indices("channels", channels)
        check.positive_ints(
            top_k=top_k, max_channels=max_channels, max_samples=max_samples, tile_size=tile_size, batch_size=batch_size
        )
        check.choice("projection_rule", projection_rule, get_args(ProjectionRule))
        check.boolean("show_full", show_full)
        self.layers = list(layers) if layers is not None else None
        self.channels = list(channels) if channels is not None else None
        self.max_channels = max_channels
        self.top_k = top_k
        self.max_samples = max_samples
        self.projection_rule = projection_rule
        self.show_full = show_full
        self.tile_size = tile_size
        self.batch_size = batch_size
        self._modules: dict[str, nn.Module] = {}
        self._labels: torch.Tensor | None = None  # the scanned samples' labels, and the class names, of this call
        self._class_names: list[str] | None = None
        self._grids: dict[str, tuple[TokenGrid | None, bool]] = {}  # layer -> (token grid, channels last)
        self._flow_done = False
        #: receptive-field boxes by (layer, image shape) and unit position: they depend on the architecture only,
        #: so each is computed once (a model copy and a backward pass saved at every call)
        self._boxes: dict[tuple[int, tuple[int, ...]], dict[tuple[int, int], list[int]]] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers, "channels": self.channels}

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._flow_done, self._grids = False, {}
        if self.layers is None:
            self._modules = resolve_layers(pl_module, None, (nn.Conv2d,), argument="layers", default="last")
        else:
            self._modules = resolve_layers(pl_module, self.layers, (nn.Module,), argument="layers")
        for name, module in self._modules.items():
            if isinstance(module, (nn.Linear, nn.Flatten, nn.modules.conv._ConvNd)) and not isinstance(
                module, nn.Conv2d
            ):
                raise ValueError(
                    f"`layers`: layer {name!r} is a {type(module).__name__}, whose output has no 2-D spatial map; "
                    "choose a Conv2d (or another layer with (N, C, H, W) output)."
                )
            out_channels = getattr(module, "out_channels", None)
            check_channel_range("channels", self.channels, out_channels, _which_has(name, out_channels))

    def _cheaper_hint(self) -> str:
        return "or lower `max_samples` "

    def _budget_units(self) -> float | None:
        # a forward pass over the kept samples, then one forward and backward pass per exemplar's projection
        channels = len(self.channels) if self.channels is not None else self.max_channels
        return self.max_samples / 3 + channels * self.top_k * max(1, len(self._modules))

    def _bank_capacity(self) -> int:
        return self.max_samples

    def _has_data(self) -> bool:
        return self._samples.has_samples(complete=True)

    def _channels_for(self, name: str, count: int) -> list[int]:
        check_channel_range("channels", self.channels, count, _which_has(name, count))
        return list(self.channels) if self.channels is not None else evenly_spaced(count, self.max_channels)

    def _follow_data_flow(self, pl_module: nn.Module, kept: torch.Tensor) -> None:
        """Once per fit, a forward pass of a kept sample: the default layer by data flow, and how each layer's
        output reads as maps (a transformer's tokens on its patch grid, channels-last maps)."""
        if self._flow_done:
            return
        self._flow_done = True
        try:
            flow = trace_data_flow(pl_module, kept[:1].to(model_device(pl_module)))
        except Exception as exc:  # the registration-order default stays
            self._warn_once("data flow", f"ExemplarMonitor: the forward pass could not be traced ({exc}).")
            return
        if self.layers is None:
            name = flow.hidden_layer(activation_kinds(pl_module)) or flow.spatial_layer()
            self._modules = {name: pl_module.get_submodule(name)} if name is not None else self._modules
        self._grids = {name: flow.view_of(name) for name in self._modules}

    def _view(self, name: str) -> Any:
        grid, channels_last = self._grids.get(name, (None, False))
        return functools.partial(spatial_view, grid=grid, channels_last=channels_last)

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        kept, labels, indices, _ = self._samples.samples(complete=True)
        kept, indices = kept[: self.max_samples], indices[: self.max_samples]  # (a budget may scan fewer)
        labels = labels[: self.max_samples] if labels is not None else None
        self._labels, self._class_names = labels, find_class_names(trainer, pl_module)  # for the captions
        self._follow_data_flow(pl_module, kept)
        scan = self._scan(pl_module, kept, indices)
        for name in self._modules:
            self._guard(f"layer {name}", self._log_layer, pl_module, kept, indices, name, scan, step, epochs_done)

    def _scan(self, pl_module: nn.Module, kept: torch.Tensor, indices: list[int]) -> _Scan:
        """One pass over the kept images: per layer, the top-k of each chosen channel's spatial maximum."""
        device = model_device(pl_module)
        scan = _Scan()
        names = list(self._modules)
        starts = range(0, len(indices), self.batch_size)
        for batch_start in starts:
            images = kept[batch_start : batch_start + self.batch_size]
            scan.image_shape = tuple(images.shape[1:])
            with capture([self._modules[n] for n in names], keep="last") as captured:
                pl_module(images.to(device))
            ids = torch.arange(batch_start, batch_start + len(images))
            for name, outs in zip(names, captured):
                try:
                    acts = self._view(name)(outs[-1].detach())
                except ValueError as exc:
                    raise ValueError(f"layer {name!r}: {exc}") from None
                if name not in scan.tops:
                    scan.channels[name] = self._channels_for(name, acts.shape[1])
                    scan.tops[name] = X.StreamingTopK(len(scan.channels[name]), self.top_k)
                scores, locations = X.spatial_max(acts[:, scan.channels[name]])
                scan.tops[name].update(scores, ids, locations)
        return scan

    def _log_layer(
        self,
        pl_module: nn.Module,
        kept: torch.Tensor,
        indices: list[int],
        name: str,
        scan: _Scan,
        step: int,
        epoch: int,
    ) -> None:
        sink = self._sink
        assert sink is not None
        channels, top = scan.channels[name], scan.tops[name]
        images, boxes, projections = self._explain(pl_module, kept, indices, name, channels, top, scan.image_shape)
        found = torch.isfinite(top.scores)
        classes = None
        if self._labels is not None:
            ids = [[int(top.ids[ci, j]) for j in range(found.shape[1]) if found[ci, j]] for ci in range(len(channels))]
            classes = [[class_name(int(self._labels[i]), self._class_names) for i in row] for row in ids]
        grid = render.exemplar_panel(
            images, boxes, projections, found, channels, self.tile_size, show_full=self.show_full, classes=classes
        )
        if grid is not None:
            sink.image(f"exemplars/{name}", grid, step)  # the sink caps its size (`max_image_side`)
        sink.text(f"exemplars/indices/{name}", render.exemplar_table(channels, top.ids, top.scores, indices), step)
        self._publish(
            ExemplarStats(
                step=step,
                epoch=epoch,
                subject=name,
                channels=tuple(channels),
                ids=top.ids.clone(),
                scores=top.scores.clone(),
                boxes=boxes,
            )
        )

    def _explain(
        self,
        pl_module: nn.Module,
        kept: torch.Tensor,
        indices: list[int],
        name: str,
        channels: list[int],
        top: X.StreamingTopK,
        image_shape: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-read the exemplars; their receptive-field boxes and single-unit projections (channel-major)."""
        module = self._modules[name]
        k = top.ids.shape[1]
        flat_ids = top.ids.flatten()
        images = kept[flat_ids].float()
        channel_of = torch.tensor(channels).repeat_interleave(k)
        positions = top.locations.reshape(-1, 2)
        grid = self._grids.get(name, (None, False))[0]
        if grid is not None:  # a token's exemplar is its patch: attention lets every token see the whole image
            boxes = X.patch_boxes(grid, positions, *image_shape[-2:])
        else:
            boxes = self._receptive_fields(pl_module, module, image_shape, positions)
        projections = X.unit_projection(
            pl_module, module, images.to(model_device(pl_module)), channel_of, positions, self.projection_rule,
            view=self._view(name),
        ).cpu()  # fmt: skip
        return images, boxes, projections

    def _receptive_fields(
        self, pl_module: nn.Module, module: nn.Module, image_shape: tuple[int, ...], positions: torch.Tensor
    ) -> torch.Tensor:
        known = self._boxes.setdefault((id(module), tuple(image_shape)), {})
        wanted = [tuple(p) for p in positions.tolist()]
        missing = sorted(set(wanted) - set(known))
        if missing:
            found = X.receptive_field_boxes(pl_module, module, image_shape, torch.tensor(missing, dtype=torch.long))
            known.update(zip(missing, found.tolist()))
        return torch.tensor([known[p] for p in wanted], dtype=torch.long).view(-1, 4)


@dataclass
class _Scan:
    """What one pass over the data found, per layer: the channels watched and their streaming top-k."""

    channels: dict[str, list[int]] = field(default_factory=dict)
    tops: dict[str, X.StreamingTopK] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()


def _which_has(name: str, count: int | None) -> str:
    return f" for layer {name!r}, which has {count} channels (0..{(count or 0) - 1})"
