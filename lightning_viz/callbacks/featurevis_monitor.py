"""FeatureVisMonitor: what each channel looks for, by activation maximisation from the same noise every epoch."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._hooks import capture
from lightning_viz._layers import (
    check_channel_range,
    evenly_spaced,
    layers_of_kind,
    model_device,
    resolve_layers,
    spatial_view,
    trace_data_flow,
)
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import featurevis as FV
from lightning_viz.functional.activations import activation_kinds
from lightning_viz.records import FeatureVisStats

Objective = Literal["neuron", "channel", "deepdream", "class_logit", "class_probability"]
Parameterization = Literal["fft", "pixel"]

_CLASS_OBJECTIVES = ("class_logit", "class_probability")
#: Cropped back to the optimised size after each step: the model always sees its own input size.
_TRANSFORMS = FV.Transforms(crop=True)


class FeatureVisMonitor(VizCallback):
    """Activation-maximisation images per channel, from a fixed starting noise, so epochs are comparable.

    Every ``every_n_epochs`` (default 10) the images of all chosen channels of a layer are optimised together in one
    batch (``steps`` Adam steps on a decorrelated FFT parameterisation with jitter / scale / rotation robustness, see
    :mod:`lightning_viz.functional.featurevis`), starting from the same seeded noise each time: the difference
    between two epochs' images is the network's doing. Logged per layer: ``featurevis/<layer>`` (a row per seed, a
    column per channel) and ``featurevis/filmstrip/<layer>`` (a row per logged epoch, first seed: each column is one
    channel's filmstrip). The model's parameters are never updated nor given a ``.grad``; its modes are restored.

    Args:
        layers: layers whose channels are visualised; default by data flow (one forward pass of a sample): on a
            vision transformer the hidden units of the last MLP (its activation, tokens laid out on the patch grid),
            else the last ``nn.Conv2d`` map larger than 1x1 on the way to the output. Ignored for class objectives.
        channels: channel (or, for class objectives, class) indices; default up to ``max_channels`` evenly spaced.
        objective: ``"channel"`` (default), ``"neuron"``, ``"deepdream"``, ``"class_logit"`` or
            ``"class_probability"``.
        parameterization: ``"fft"`` (default) or ``"pixel"`` (was ``param``).
        steps, lr: optimisation steps and Adam learning rate.
        image_size: image side; default the data's (height, width), the model's input size: images are optimised
            at that size and cropped back to it after the transforms, so fixed-size models (a ViT, a ``Flatten``
            head) work (64 when unknown) (was ``size``).
        images_per_channel: number of starting noises per channel, one grid row each (was ``seeds``).
        l2, tv: L2 and total-variation penalty weights.
        input_mean, input_std: per-channel statistics of the model's input; default estimated once from up to 256
            validation samples taken from the Trainer's own batches (never read from the dataset; kept in the
            checkpoint). Without a sanity check the step-0 images wait for them (computed from the initial weights).
        **kwargs: ``every_n_epochs`` (default 10), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "featurevis"
    publishes = (FeatureVisStats,)
    default_every_n_epochs = 10
    budget_knobs = {"steps": 4, "max_channels": 4}
    budget_fixed_seconds = 0.02  # one panel and its filmstrip
    needs_grad = True
    label = "feature visualisation"
    images_only = True

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        channels: Sequence[int] | None = None,
        max_channels: int = 16,
        objective: Objective = "channel",
        parameterization: Parameterization = "fft",
        steps: int = 64,
        lr: float = 0.05,
        image_size: int | None = None,
        images_per_channel: int = 1,
        l2: float = 0.0,
        tv: float = 0.0,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        filmstrip_length: int = 8,
        tile_size: int = 64,
        **kwargs: Any,
    ) -> None:
        moved = check.renamed(
            "FeatureVisMonitor",
            kwargs,
            {"param": "parameterization", "size": "image_size", "seeds": "images_per_channel"},
        )
        parameterization = moved.get("parameterization", parameterization)
        image_size = moved.get("image_size", image_size)
        images_per_channel = moved.get("images_per_channel", images_per_channel)
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.choice("objective", objective, get_args(Objective))
        check.choice("parameterization", parameterization, get_args(Parameterization))
        check.indices("channels", channels)
        check.positive_ints(
            max_channels=max_channels,
            steps=steps,
            images_per_channel=images_per_channel,
            filmstrip_length=filmstrip_length,
            tile_size=tile_size,
        )
        if image_size is not None:
            check.at_least("image_size", image_size, FV.Transforms().min_size())
        check.number("lr", lr, low=0.0, low_open=True)
        check.number("l2", l2, low=0.0)
        check.number("tv", tv, low=0.0)
        self.layers = list(layers) if layers is not None else None
        self.channels = list(channels) if channels is not None else None
        self.max_channels = max_channels
        self.objective = objective
        self.parameterization = parameterization
        self.steps = steps
        self.lr = float(lr)
        self.image_size = image_size
        self.images_per_channel = images_per_channel
        self.l2, self.tv = float(l2), float(tv)
        self.input_mean = list(input_mean) if input_mean is not None else None
        self.input_std = list(input_std) if input_std is not None else None
        self.filmstrip_length = filmstrip_length
        self.tile_size = tile_size
        self._modules: dict[str, nn.Module] = {}
        self._in_channels = 3
        self._num_classes: int | None = None
        self._stats: tuple[list[float], list[float]] | None = None
        self._image_size: tuple[int, int] | None = None
        self._views: dict[str, Any] = {}  # layer -> how its output reads as channels-first maps (token layers)
        self._flow_done = False
        self._filmstrips = render.Filmstrips(filmstrip_length)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers, "objective": self.objective}

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._flow_done, self._views = False, {}
        convs = layers_of_kind(pl_module, (nn.Conv2d,))
        self._in_channels = next(iter(convs.values())).in_channels if convs else 3
        linears = layers_of_kind(pl_module, (nn.Linear,))
        self._num_classes = list(linears.values())[-1].out_features if linears else None
        if self.objective in _CLASS_OBJECTIVES:
            self._modules = {"logits": pl_module}
            limit = self._num_classes
            what = "classes (the last nn.Linear's outputs)"
        else:
            names = self.layers
            self._modules = resolve_layers(pl_module, names, (nn.Module,) if names else (nn.Conv2d,), default="last")
            known = [m.out_channels for m in self._modules.values() if hasattr(m, "out_channels")]
            limit = min(known, default=None)
            what = "channels"
        check_channel_range("channels", self.channels, limit, f"; the model has {limit} {what}")

    def _cheaper_hint(self) -> str:
        return "or lower `steps` / `max_channels` "

    def _budget_units(self) -> float | None:
        # every step is a forward and backward pass of all of a layer's images, through the parameterisation and
        # the robustness transforms (measured: about 4 training passes per image and step)
        images = len(self.channels) if self.channels is not None else self.max_channels
        return 4.0 * self.steps * images * self.images_per_channel * max(1, len(self._modules))

    def _bank_capacity(self) -> int:
        known = self.input_mean is not None and self.input_std is not None
        return 0 if (known and self.image_size is not None) or self._stats is not None else 256

    def _has_data(self) -> bool:
        return self._bank_capacity() == 0 or self._samples.has_samples()

    def _input_stats(self, trainer: Any) -> tuple[list[float], list[float]]:
        if self._stats is None and self._samples.has_samples():
            images = self._samples.samples()[0].float()
            self._image_size = (int(images.shape[-2]), int(images.shape[-1]))
            dims = (0, 2, 3)
            self._stats = (images.mean(dims).tolist(), images.std(dims).clamp_min(1e-6).tolist())
        if self.input_mean is not None and self.input_std is not None:
            return self.input_mean, self.input_std
        return self._stats or ([0.0] * self._in_channels, [1.0] * self._in_channels)

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        mean, std = self._input_stats(trainer)
        size = (self.image_size,) * 2 if self.image_size else self._image_size or (64, 64)
        size = (max(size[0], _TRANSFORMS.min_size()), max(size[1], _TRANSFORMS.min_size()))
        self._follow_data_flow(pl_module, size)
        for name, module in self._modules.items():
            self._guard(f"layer {name}", self._log_layer, pl_module, name, module, mean, std, size, step, epochs_done)

    def _follow_data_flow(self, pl_module: nn.Module, size: tuple[int, int]) -> None:
        """Once per fit, a forward pass of a sample (zeros when none is kept): the default layer by data flow, the
        number of classes (the model's outputs), and how a token layer's output lays out on the patch grid."""
        if self._flow_done:
            return
        self._flow_done = True
        kept = self._samples.samples()[0][:1] if self._samples.has_samples() else None
        x = kept if kept is not None else torch.zeros(1, self._in_channels, *size)
        try:
            flow = trace_data_flow(pl_module, x.to(model_device(pl_module)))
        except Exception as exc:  # the registration-order defaults stay
            self._warn_once("data flow", f"FeatureVisMonitor: the forward pass could not be traced ({exc}).")
            return
        self._in_channels, self._num_classes = int(x.shape[1]), int(flow.output_shape[-1])
        if self.layers is None and self.objective not in _CLASS_OBJECTIVES:
            name = flow.hidden_layer(activation_kinds(pl_module)) or flow.spatial_layer()
            self._modules = {name: pl_module.get_submodule(name)} if name is not None else self._modules
        for name in self._modules:
            grid, channels_last = flow.view_of(name)
            if grid is not None or channels_last:
                self._views[name] = functools.partial(spatial_view, grid=grid, channels_last=channels_last)

    def _objective(self, name: str, count: int, targets: list[int]) -> FV.Objective:
        if self.objective == "class_logit":
            return FV.class_logit(targets)
        if self.objective == "class_probability":
            return FV.class_probability(targets)
        if self.objective == "deepdream":
            return FV.deepdream(name)
        return (FV.neuron if self.objective == "neuron" else FV.channel)(name, targets)

    def _targets(self, pl_module: nn.Module, name: str, module: nn.Module, size: tuple[int, int]) -> list[int]:
        if self.objective in _CLASS_OBJECTIVES:
            count = self._num_classes or 1
        elif self.objective == "deepdream":
            return [0]
        else:
            count = getattr(module, "out_channels", None)
            if count is None:  # any module: look at its output once
                with capture([module], keep="last") as captured, torch.no_grad():
                    pl_module(torch.zeros(1, self._in_channels, *size, device=model_device(pl_module)))
                count = self._views.get(name, lambda t: t)(captured[0][-1]).shape[1]
        check_channel_range("channels", self.channels, count, f" for {name!r} ({count})")
        return list(self.channels) if self.channels is not None else evenly_spaced(count, self.max_channels)

    def _log_layer(
        self,
        pl_module: nn.Module,
        name: str,
        module: nn.Module,
        mean: list[float],
        std: list[float],
        size: tuple[int, int],
        step: int,
        epochs_done: int,
    ) -> None:
        sink = self._sink
        assert sink is not None
        targets = self._targets(pl_module, name, module, size)
        result = self._optimise(pl_module, name, module, targets, mean, std, size)
        tag = "logits" if module is pl_module else name
        self._publish(
            FeatureVisStats(
                step=step,
                epoch=epochs_done,
                subject=tag,
                channels=tuple(targets),
                initial_objective=result.initial_objective,
                final_objective=result.objective,
            )
        )
        labels = [f"{'class' if self.objective in _CLASS_OBJECTIVES else 'ch'} {t}" for t in targets]
        grid, first_seed = render.featurevis_panel(result.images, labels, self.tile_size)
        sink.image(f"featurevis/{tag}", grid, step)
        strip = self._filmstrips[tag].push(render.epoch_label(epochs_done), first_seed).images()
        sink.image(f"featurevis/filmstrip/{tag}", render.column_filmstrip(labels, strip, first_seed.shape[0] - 2), step)

    def _optimise(
        self,
        pl_module: nn.Module,
        name: str,
        module: nn.Module,
        targets: list[int],
        mean: list[float],
        std: list[float],
        size: tuple[int, int],
    ) -> FV.VisResult:
        """All of a layer's images in one batch, ``images_per_channel`` starting noises (seed-major) per target."""
        per_seed = len(targets)
        return FV.visualize(
            pl_module,
            self._objective(name, per_seed, targets * self.images_per_channel),
            n=per_seed * self.images_per_channel,
            size=size,
            channels=self._in_channels,
            param=self.parameterization,
            steps=self.steps,
            lr=self.lr,
            l2=self.l2,
            tv=self.tv,
            generator=self._generator(),  # the same starting noise and transforms at every logged epoch
            input_mean=torch.tensor(mean),
            input_std=torch.tensor(std),
            modules={name: module} if module is not pl_module else None,
            views=self._views,
            transforms=_TRANSFORMS,
        )

    def _extra_state(self) -> dict[str, Any]:
        return {
            "stats": [list(self._stats[0]), list(self._stats[1])] if self._stats else None,
            "image_size": list(self._image_size) if self._image_size else None,
            "filmstrips": self._filmstrips.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        stats = state.get("stats")
        self._stats = (list(stats[0]), list(stats[1])) if stats else None
        size = state.get("image_size")  # a side in checkpoints before 0.2
        self._image_size = (size, size) if isinstance(size, int) else tuple(size) if size else None  # type: ignore[assignment]
        self._filmstrips.load_state_dict(state.get("filmstrips", {}))
