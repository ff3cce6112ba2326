"""FilterMonitor: convolution filters as images, with the statistics that say noisy / barely moved / converged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _data, render
from lightning_viz import _validate as check
from lightning_viz._layers import layers_of_kind, model_device, resolve_layers, trace_data_flow
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import filters as F
from lightning_viz.records import FilterStats

if TYPE_CHECKING:
    import lightning.pytorch as pl

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
    against the weights the fit's first step starts from; kept in the checkpoint so a resumed run measures from the
    same W0; a run resumed from a checkpoint without this state logs ``filters/distance_from_resume/<layer>`` instead).

    Args:
        layers: names of ``nn.Conv2d`` layers; default: the first ``Conv2d`` the input reaches on its way to the
            output, found by one forward pass of a kept sample (not the first registered: an auxiliary or decoder
            conv defined before the stem is not it); in a vision transformer its patch embedding, e.g. timm's
            ``patch_embed.proj`` or torchvision's ``conv_proj``: RGB tiles of 16x16 kernels. Without any sample to
            trace (batches that hold no images) the first registered ``Conv2d``, said in one info line.
        max_filters: at most this many filters per grid.
        max_input_channels: at most this many input-channel slices per filter for layers with more than 3 input
            channels (was ``max_channels``).
        scale: ``"running_max"`` or a positive float (see above).
        filmstrip_length: number of logged epochs in the filmstrip.
        filmstrip_filters: number of filters per filmstrip row.
        min_tile_pixels: filters are upsampled (nearest) to at least this many pixels per side.
        **kwargs: ``every_n_epochs`` (default 1), ``max_image_side`` (default 1024), ``on_error``, ``log_baseline``,
            ``seed``, ``max_overhead``.
    """

    monitor_name = "filters"
    publishes = (FilterStats,)
    default_every_n_epochs = 1
    budget_fixed_seconds = 0.02  # one grid, a filmstrip, a few statistics (0.006-0.01 s on mobilenet_v3_small's stem)
    default_max_image_side = 1024

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        max_filters: int = 64,
        max_input_channels: int = 8,
        scale: Scale = "running_max",
        filmstrip_length: int = 12,
        filmstrip_filters: int = 16,
        min_tile_pixels: int = 32,
        **kwargs: Any,
    ) -> None:
        max_input_channels = check.renamed("FilterMonitor", kwargs, {"max_channels": "max_input_channels"}).get(
            "max_input_channels", max_input_channels
        )
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.positive_ints(
            max_filters=max_filters,
            max_input_channels=max_input_channels,
            filmstrip_length=filmstrip_length,
            filmstrip_filters=filmstrip_filters,
            min_tile_pixels=min_tile_pixels,
        )
        if scale != "running_max":
            bad = f"`scale` must be 'running_max' or a positive finite number, got {scale!r}."
            if isinstance(scale, bool) or not isinstance(scale, (str, int, float)):
                raise TypeError(bad)
            if isinstance(scale, str) or not (scale > 0 and math.isfinite(scale)):
                raise ValueError(bad)
        self.layers = list(layers) if layers is not None else None
        self.max_filters = max_filters
        self.max_input_channels = max_input_channels
        self.scale = scale
        self.filmstrip_length = filmstrip_length
        self.filmstrip_filters = filmstrip_filters
        self.min_tile_pixels = min_tile_pixels
        self._modules: dict[str, nn.Conv2d] = {}
        self._by_flow = False  # the default layer is still to be chosen by data flow, on the first kept sample
        self._provisional: dict[str, torch.Tensor] = {}  # W0 of each candidate until then
        self._step_at_start = 0
        self._initial: dict[str, torch.Tensor] = {}  # W0 per layer: the weights the fit's first step starts from
        self._resumed: dict[str, torch.Tensor] = {}  # weights at a resume, for layers whose W0 is unknown
        self._scales: dict[str, float] = {}
        self._filmstrips = render.Filmstrips(filmstrip_length)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._modules = resolve_layers(pl_module, self.layers, (nn.Conv2d,), argument="layers", default="first")
        self._by_flow = self.layers is None and len(layers_of_kind(pl_module, (nn.Conv2d,))) > 1
        self._provisional = {}

    @override
    def _bank_capacity(self) -> int:
        return 1 if self._by_flow else 0  # one sample, to trace which conv the input reaches first

    @override
    def _has_data(self) -> bool:
        return not self._by_flow or self._samples.has_samples() or self._no_images

    @override
    def _check_inputs(self, trainer: Any) -> None:
        # the filters need no images: batches without any only make the default layer fall back (said at first log)
        if self._samples.problem is not None and not self._samples.has_samples():
            self._no_images = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._by_flow:  # which layer is shown is known once a sample is: keep every candidate's W0 till then
            candidates = layers_of_kind(pl_module, (nn.Conv2d,))
            self._provisional = {n: m.weight.detach().cpu().clone() for n, m in candidates.items()}
        else:
            self._take_initial_weights(int(trainer.global_step))
        self._step_at_start = int(trainer.global_step)
        super().on_train_start(trainer, pl_module)

    def _follow_data_flow(self, trainer: Any, pl_module: nn.Module) -> None:
        """Once per fit, on the first kept sample: the default layer is the first ``Conv2d`` the input reaches
        (DataFlow.first_of), not the first registered one."""
        if not self._by_flow:
            return
        self._by_flow = False
        name = None
        if self._samples.has_samples():
            images = self._samples.samples()[0]
            try:
                name = trace_data_flow(pl_module, images[:1].to(model_device(pl_module))).first_of((nn.Conv2d,))
            except Exception as exc:  # the registration-order default stays
                reason = f"the forward pass could not be traced ({type(exc).__name__}: {exc})"
            else:
                reason = "no Conv2d reaches the model's output"
        else:
            reason = "no batch held an image to trace the forward pass with"
        if name is None:
            _data.tell_once(
                trainer,
                "filters by registration",
                f"lightning_viz: FilterMonitor shows the first registered Conv2d, {next(iter(self._modules))!r}: "
                f"{reason}. Name the layer with `FilterMonitor(layers=[...])`.",
                warn=False,
            )
        else:
            self._modules = {name: pl_module.get_submodule(name)}
        chosen = next(iter(self._modules))
        self._take_initial_weights(self._step_at_start, {chosen: self._provisional[chosen]})
        self._provisional = {}

    def _take_initial_weights(self, step: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        """W0 is what the first optimizer step starts from: taken here, after a checkpoint is restored and after the
        user's ``setup`` / ``on_fit_start`` (which may load weights), never at ``setup``. A run resumed from a
        checkpoint without our state cannot know it: ``distance_from_init`` is then not logged, and the distance from
        the weights at the resume is logged as ``filters/distance_from_resume/<layer>`` instead."""
        if weights is None:
            weights = {name: module.weight.detach().cpu().clone() for name, module in self._modules.items()}
        for name, weight in weights.items():
            if step == 0:
                self._initial[name] = weight
            elif name not in self._initial and name not in self._resumed:
                self._resumed[name] = weight
        if self._resumed:
            self._warn_once(
                "initial weights unknown",
                f"FilterMonitor: this run resumed at step {step} from a checkpoint without FilterMonitor's state, so "
                f"the weights at the start of training are unknown for {sorted(self._resumed)}: "
                "`filters/distance_from_init` is not logged for them; `filters/distance_from_resume/<layer>` measures "
                "from the weights at the resume instead.",
            )

    def _budget_units(self) -> float | None:
        # no forward pass: the call's cost is its fixed seconds, known before its first call (the first epoch's plan
        # comes before the step-0 view that waits for a sample to find the first conv)
        return 0.0

    def _cheaper_hint(self) -> str:
        return "or lower `max_filters` "

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        self._follow_data_flow(trainer, pl_module)
        for name, module in self._modules.items():
            self._guard(f"layer {name}", self._log_layer, name, module, step, epochs_done)

    def _layer_scale(self, name: str, weight: torch.Tensor) -> float:
        if self.scale != "running_max":
            return float(self.scale)
        scale = max(self._scales.get(name, 0.0), F.finite_abs_max(weight))
        if scale <= 0:
            scale = 1.0  # an all-zero (or all-NaN) layer: any scale shows it as mid-grey
        self._scales[name] = scale
        return scale

    def _log_layer(self, name: str, module: nn.Conv2d, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        weight = module.weight.detach().float().cpu()
        bad = F.nonfinite_filters(weight)
        if bad:
            self._warn_once(
                f"nonfinite {name}",
                f"FilterMonitor: layer {name!r} has NaN/Inf weights in {bad} filter(s) at step {step}; they are "
                "drawn in magenta. Training has likely diverged (lower the learning rate, clip gradients).",
            )
        scale = self._layer_scale(name, weight)
        stats = F.filter_statistics(weight, self._initial.get(name, self._resumed.get(name)))
        if name not in self._initial and "distance_from_init" in stats:
            stats["distance_from_resume"] = stats.pop("distance_from_init")
        means = F.finite_means(stats)

        if sink.writes_images:  # drawing that no logger can receive is not done
            grid = render.filter_grid(
                weight,
                scale,
                max_filters=self.max_filters,
                max_channels=self.max_input_channels,
                min_tile_pixels=self.min_tile_pixels,
            )
            # the filmstrip's row fits TensorBoard's card: whole-pixel enlargements of the kernel, as many as fit
            kernel = max(weight.shape[-2:])
            fit = render.fit_tile_side(min(self.filmstrip_filters, len(weight)), self.min_tile_pixels, left=36)
            row = render.filter_row(
                weight, scale, filters=self.filmstrip_filters, min_tile_pixels=fit // kernel * kernel
            )
            strip = self._filmstrips[name].push(render.epoch_label(epochs_done), row)
            sink.image(f"filters/{name}", grid, step)
            sink.image(f"filters/filmstrip/{name}", render.labelled_rows(strip.images()), step)
        for stat, values in stats.items():
            sink.histogram(f"filters/per_filter/{stat}/{name}", values, step)
        scalars = {f"filters/{stat}/{name}": mean for stat, mean in means.items() if mean is not None}
        sink.scalars({f"filters/scale/{name}": scale, **scalars}, step)
        self._publish(
            FilterStats(
                step=step,
                epoch=epochs_done,
                subject=name,
                weight_norm=means.get("weight_norm"),
                noise_score=means.get("noise_score"),
                distance_from_init=means.get("distance_from_init"),
                scale=scale,
                nonfinite=bad > 0,
            )
        )

    def _extra_state(self) -> dict[str, Any]:
        return {
            "initial": {k: v.clone() for k, v in self._initial.items()},
            "resumed": {k: v.clone() for k, v in self._resumed.items()},
            "scales": dict(self._scales),
            "filmstrips": self._filmstrips.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._initial = {k: v.clone() for k, v in state.get("initial", {}).items()}
        self._resumed = {k: v.clone() for k, v in state.get("resumed", {}).items()}
        self._scales = dict(state.get("scales", {}))
        self._filmstrips.load_state_dict(state.get("filmstrips", {}))
