"""FilterMonitor: convolution filters as images, with the statistics that say noisy / barely moved / converged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

from lightning_viz import render
from lightning_viz._layers import resolve_layers
from lightning_viz.callbacks.base import VizCallback, check_names, check_positive_int
from lightning_viz.functional import filters as F

Scale = Union[Literal["running_max"], float]


class FilterMonitor(VizCallback):
    """Log convolution filters as image grids, per-filter statistics and a filmstrip across epochs.

    Images (tags ``filters/<layer>`` and ``filters/filmstrip/<layer>``): a filter with 3 input channels is one RGB
    tile, with 1 a grayscale tile; deeper layers show one grayscale tile per input-channel slice (a row per filter).
    Zero is mid-grey and the colour scale is symmetric. **The scale is comparable across epochs**: with
    ``scale="running_max"`` (default) it is the largest ``|w|`` seen in that layer so far during the run - it only
    ever grows, never re-stretches to each epoch - and is logged as ``filters/scale/<layer>``; a float fixes it.
    The filmstrip shows the first ``filmstrip_filters`` filters (input channel 0 for deep layers) at each of the last
    ``filmstrip_length`` logged epochs, one row per epoch.

    Scalars per layer (means over filters; histograms of the per-filter values under ``filters/per_filter/...``):
    ``filters/weight_norm/<layer>``, ``filters/noise_score/<layer>`` (about 1 = as rough as random noise, see
    :mod:`lightning_viz.functional.filters`), and ``filters/distance_from_init/<layer>`` (``||W - W0|| / ||W0||``
    against the weights at the start of the fit; kept in the checkpoint so a resumed run measures from the same W0).

    Args:
        layers: names of ``nn.Conv2d`` layers; default: the model's first ``Conv2d``.
        max_filters: at most this many filters per grid.
        max_channels: at most this many input-channel slices per filter for layers with more than 3 input channels.
        scale: ``"running_max"`` or a positive float (see above).
        filmstrip_length: number of logged epochs in the filmstrip.
        filmstrip_filters: number of filters per filmstrip row.
        min_tile_pixels: filters are upsampled (nearest) to at least this many pixels per side.
        max_image_side: images are downsized to at most this many pixels per side.
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "filters"
    default_every_n_epochs = 1

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        max_filters: int = 64,
        max_channels: int = 8,
        scale: Scale = "running_max",
        filmstrip_length: int = 12,
        filmstrip_filters: int = 16,
        min_tile_pixels: int = 32,
        max_image_side: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_names("layers", layers)
        for name, value in (
            ("max_filters", max_filters),
            ("max_channels", max_channels),
            ("filmstrip_length", filmstrip_length),
            ("filmstrip_filters", filmstrip_filters),
            ("min_tile_pixels", min_tile_pixels),
            ("max_image_side", max_image_side),
        ):
            check_positive_int(name, value)
        if scale != "running_max" and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale))
        ):
            raise ValueError(f"`scale` must be 'running_max' or a positive finite number, got {scale!r}.")
        self.layers = list(layers) if layers is not None else None
        self.max_filters = max_filters
        self.max_channels = max_channels
        self.scale = scale
        self.filmstrip_length = filmstrip_length
        self.filmstrip_filters = filmstrip_filters
        self.min_tile_pixels = min_tile_pixels
        self.max_image_side = max_image_side
        self._modules: dict[str, nn.Conv2d] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._scales: dict[str, float] = {}
        self._filmstrips: dict[str, list[tuple[str, torch.Tensor]]] = {}
        #: The latest statistics per layer, for other monitors (e.g. the diagnosis) to read without recomputing.
        self.latest: dict[str, dict[str, float]] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers, "every_n_epochs": self.every_n_epochs}

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._modules = resolve_layers(pl_module, self.layers, (nn.Conv2d,), argument="layers", default="first")
        for name, module in self._modules.items():
            # The weights at setup are the fit's starting point; a resumed run replaces them from the checkpoint.
            if name not in self._initial:
                self._initial[name] = module.weight.detach().cpu().clone()

    def _cheaper_hint(self) -> str:
        return "or lower `max_filters` "

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        for name, module in self._modules.items():
            self._guard(f"layer {name}", self._log_layer, name, module, step, epochs_done)

    def _layer_scale(self, name: str, weight: torch.Tensor) -> float:
        if self.scale != "running_max":
            return float(self.scale)
        finite = weight[torch.isfinite(weight)]
        current = float(finite.abs().max()) if finite.numel() else 0.0
        scale = max(self._scales.get(name, 0.0), current)
        if scale <= 0:
            scale = 1.0  # an all-zero (or all-NaN) layer: any scale shows it as mid-grey
        self._scales[name] = scale
        return scale

    def _log_layer(self, name: str, module: nn.Conv2d, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        weight = module.weight.detach().float().cpu()
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).flatten(1).any(dim=1).sum())
            self._warn_once(
                f"nonfinite {name}",
                f"FilterMonitor: layer {name!r} has NaN/Inf weights in {bad} filter(s) at step {step}; they are "
                "drawn in magenta. Training has likely diverged (lower the learning rate, clip gradients).",
            )
        scale = self._layer_scale(name, weight)
        grid = F.filter_grid(
            weight,
            scale,
            max_filters=self.max_filters,
            max_channels=self.max_channels,
            min_tile_pixels=self.min_tile_pixels,
        )
        sink.image(f"filters/{name}", render.downsize(grid, self.max_image_side), step)

        row = F.filter_grid(
            weight[: self.filmstrip_filters, :1] if weight.shape[1] > 3 else weight[: self.filmstrip_filters],
            scale,
            max_filters=self.filmstrip_filters,
            max_channels=1,
            min_tile_pixels=self.min_tile_pixels,
            ncol=self.filmstrip_filters,
        )
        strip = self._filmstrips.setdefault(name, [])
        image = render.push_filmstrip(strip, f"ep {epochs_done}", row, self.filmstrip_length)
        sink.image(f"filters/filmstrip/{name}", render.downsize(image, self.max_image_side), step)

        stats = F.filter_statistics(weight, self._initial.get(name))
        scalars = {f"filters/scale/{name}": scale}
        latest: dict[str, float] = {"scale": scale, "nonfinite": float(not torch.isfinite(weight).all())}
        for stat, values in stats.items():
            mean = float(values.nanmean()) if torch.isfinite(values).any() else float("nan")
            latest[stat] = mean
            if not np.isnan(mean):
                scalars[f"filters/{stat}/{name}"] = mean
            sink.histogram(f"filters/per_filter/{stat}/{name}", values, step)
        sink.scalars(scalars, step)
        self.latest[name] = latest

    def _extra_state(self) -> dict[str, Any]:
        return {
            "initial": {k: v.clone() for k, v in self._initial.items()},
            "scales": dict(self._scales),
            "filmstrips": {k: [(label, img.clone()) for label, img in v] for k, v in self._filmstrips.items()},
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._initial = {k: v.clone() for k, v in state.get("initial", {}).items()}
        self._scales = dict(state.get("scales", {}))
        self._filmstrips = {k: [(label, img) for label, img in v] for k, v in state.get("filmstrips", {}).items()}
