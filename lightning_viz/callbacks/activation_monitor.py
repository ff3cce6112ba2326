"""ActivationMonitor: per-channel firing rates, sparsity and dead units over a whole validation epoch, with history."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._data import resolve_probes, validation_expected
from lightning_viz._hooks import CallSiteRecorder
from lightning_viz._layers import layers_of_kind, model_device
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import activations as A
from lightning_viz.functional.activations import Site
from lightning_viz.probes import ProbeSet
from lightning_viz.records import ActivationStats

#: One image of every layer's firing-rate history ("dead_channels_..." sorts before the per-layer "dead_count/..."
#: charts, so TensorBoard's Time Series opens the group on this picture).
DEAD_HISTORY_TAG = "activations/dead_channels_by_layer"

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl


class ActivationMonitor(VizCallback):
    """Sparsity and dead-unit accounting per activation call site, and activation maps of a probe image.

    Statistics are streamed inside forward hooks over the validation batches the Trainer already runs on a logged
    epoch (at most ``max_batches``; no extra forward passes; charged to the budget) into per-channel counters, never
    keeping activations. Without a validation loop, the first ``max_batches`` training batches of a logged epoch are
    used. Under DDP the counters are summed over all ranks before anything is judged dead.

    A module applied several times per forward (torchvision's ResNet reuses ``relu`` in each block) is reported per
    call site: ``layer1.0.relu#1``, ``layer1.0.relu#2``. Call sites are counted per batch, so a model that runs
    several forward passes per validation step numbers the later passes' sites on from the first's.

    Channels follow the layer (:func:`~lightning_viz.functional.activations.channel_layouts`): a ViT's MLP GELU
    output (N, tokens, D) is counted per hidden unit D, never per token; GELU gets sparsity, not dead units.

    Logged per site: scalars ``activations/sparsity/<site>`` (share of values <= 0) and, for the ReLU family,
    ``activations/dead_fraction/<site>`` and ``activations/dead_count/<site>`` (the mean activation is in the
    :class:`~lightning_viz.records.ActivationStats` record only); histograms ``activations/firing_rate/<site>`` (per
    channel) and ``activations/values/<site>`` (a bounded sample); one image ``activations/dead_channels_by_layer`` for
    the whole model (per layer: rows = logged epochs, columns = channels by firing rate, dead ones red; a colour bar;
    it sorts before the per-layer charts); text ``activations/dead_channels`` (dead channel indices per site); image
    ``activations/maps/<site>`` for the map layers: the probe image, then each channel's map as a numbered tile on one
    scale per site and call (its colour bar states it; also ``activations/map_scale/<site>``), dead ones framed red.

    Args:
        layers: names of activation modules (``nn.ReLU``, ``nn.GELU``, ...); default: all of them.
        pre_activation_layers: for models that apply ``F.relu`` functionally: names of the layers whose outputs are
            fed to the ReLU; a value <= 0 counts as an inactive unit and these sites get dead counts.
        count_dead: ``None`` (default) counts dead units where they are defined (the ReLU family and
            ``pre_activation_layers``); ``True`` requires it and fails at setup for a site where it is not defined;
            ``False`` never counts them.
        max_batches: at most this many batches per logged epoch feed the statistics.
        map_layers: module names whose activation maps are drawn; default: the first and last monitored module the
            data passes with an (N, C, H, W) output (the validation batches' call order, not registration order).
        probes: the probe whose maps are drawn (its image ``map_probe``); default: chosen from the validation data.
        max_channels: at most this many channel tiles per map image.
        filmstrip_length: logged epochs kept in the dead-channel history image (was ``history_length``).
        histogram_samples: values sampled per site and epoch for the value histogram.
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``seed``, ``max_overhead``. No baseline
            (``log_baseline`` is ignored): statistics come from the Trainer's own batches, which start with epoch 1.
    """

    monitor_name = "activations"
    image_part = "maps"  # the statistics work on any input; only the maps need an image
    publishes = (ActivationStats,)
    default_every_n_epochs, diagnosis_evidence = 1, True  # the dead-unit counts are what the final verdict judges
    budget_fixed_seconds = 0.12  # histograms per site, the history image, the maps (33 sites: 0.06-0.12 s)

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        pre_activation_layers: Sequence[str] | None = None,
        count_dead: bool | None = None,
        max_batches: int = 20,
        map_layers: Sequence[str] | None = None,
        probes: ProbeSet | None = None,
        map_probe: int = 0,
        max_channels: int = 64,
        filmstrip_length: int = 64,
        histogram_samples: int = 4096,
        **kwargs: Any,
    ) -> None:
        filmstrip_length = check.renamed("ActivationMonitor", kwargs, {"history_length": "filmstrip_length"}).get(
            "filmstrip_length", filmstrip_length
        )
        kwargs["log_baseline"] = False
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        check.layer_names("pre_activation_layers", pre_activation_layers)
        check.layer_names("map_layers", map_layers)
        check.boolean("count_dead", count_dead, allow_none=True)
        check.positive_ints(
            max_batches=max_batches,
            max_channels=max_channels,
            filmstrip_length=filmstrip_length,
            histogram_samples=histogram_samples,
        )
        check.probe_set("probes", probes)
        check.non_negative_int("map_probe", map_probe)
        self.layers = list(layers) if layers is not None else None
        self.pre_activation_layers = list(pre_activation_layers) if pre_activation_layers is not None else None
        self.count_dead = count_dead
        self.max_batches = max_batches
        self.map_layers = list(map_layers) if map_layers is not None else None
        self.probes = probes if probes is not None else ProbeSet.auto(max(1, map_probe + 1), seed=self.seed)
        self.map_probe = map_probe
        self.max_channels = max_channels
        self.filmstrip_length = filmstrip_length
        self.histogram_samples = histogram_samples
        self._modules: dict[str, nn.Module] = {}
        self._dead_defined: dict[str, bool] = {}
        self._map_modules: list[str] = []
        self._recorder: CallSiteRecorder | None = None
        self._stats = A.SiteStats(histogram_samples, seed=self.seed)
        self._source = "val"
        self._collecting = False
        self._collected_epoch: int | None = None
        self._history = render.Filmstrips(filmstrip_length)  # per site: firing rates per logged epoch

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers, "pre_activation_layers": self.pre_activation_layers}

    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        configured = self.layers is not None or self.pre_activation_layers is not None
        if not configured and not layers_of_kind(pl_module, A.activation_kinds(pl_module)):
            # Nothing to hook (the model applies F.relu): say how to fix it, and stay out of the suite's way.
            candidates = list(layers_of_kind(pl_module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)))[:20]
            self._warn_once(
                "nothing to hook",
                "ActivationMonitor: the model has no activation modules (nn.ReLU, nn.GELU, ...) to hook; it "
                "probably applies F.relu functionally. Pass `pre_activation_layers=[...]` with the names of the "
                f"layers whose outputs are fed to the ReLU, e.g. from {candidates}. The monitor is off.",
            )
            self._active = False
            self._modules, self._recorder = {}, None
            return
        modules, dead = A.activation_layers(pl_module, self.layers, self.pre_activation_layers, self.count_dead)
        self._map_modules = A.map_layers(list(modules), self.map_layers)
        self._modules = modules
        self._dead_defined = dead
        self._stats.layouts = A.channel_layouts(pl_module, list(modules))
        self._release(pl_module)
        self._recorder = CallSiteRecorder(modules, self._record, root=pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._source = "val" if validation_expected(trainer, pl_module) else "train"

    def _record(self, name: str, index: int, output: Any) -> None:
        # Runs inside the user's forward pass: a failure here must never reach their training.
        failed = self._timed_inside(self._guard, self.monitor_name, self._stats.add, (name, index), output) is False
        if failed and self._recorder:
            self._recorder.detach()
            self._collecting = False

    def _start(self, trainer: Any) -> None:
        if not self._active or self._recorder is None or "activations" in self._disabled:
            return
        self._stats.clear()
        self._recorder.max_calls.clear()
        self._recorder.attach()
        self._collecting = True

    def _batch(self, batch_idx: int) -> None:
        if not self._collecting or self._recorder is None:
            return
        self._recorder.reset()
        if batch_idx >= self.max_batches:
            self._recorder.detach()

    def _finish(self, trainer: Any, pl_module: Any) -> None:
        if not self._collecting or self._recorder is None:
            return
        self._recorder.detach()
        self._collecting = False
        if not self._stats:
            return
        self._collected_epoch = trainer.current_epoch
        self._reduce(trainer)
        self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def _reduce(self, trainer: Any) -> None:
        """Sum counters over all processes (every rank runs this collective, in the same site order)."""
        if getattr(trainer, "world_size", 1) > 1:
            A.sum_counters(self._stats, lambda packed: trainer.strategy.reduce(packed, reduce_op="sum"))

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._source == "val" and trainer.state.fn == "fit" and self._is_log_epoch(trainer):
            self._start(trainer)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch(batch_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._source == "val":
            self._finish(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._source == "train" and self._is_log_epoch(trainer):
            self._start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if self._source == "train":
            self._batch(batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_budget_epoch(trainer)
        if self._source == "train":
            self._finish(trainer, pl_module)
            return
        val_every = getattr(trainer, "check_val_every_n_epoch", 1)
        if (
            self._active
            and val_every is not None  # validation every n steps (`val_check_interval`): an epoch may have none
            and self._is_log_epoch(trainer)
            and (trainer.current_epoch + 1) % val_every == 0
            and self._collected_epoch != trainer.current_epoch
        ):
            self._warn_once(
                "no validation",
                f"ActivationMonitor: no validation batch ran in epoch {trainer.current_epoch} (empty validation "
                f"loader?); from now on the statistics use up to `max_batches`={self.max_batches} training batches.",
            )
            self._source = "train"
            self._take_training_batches = True  # the probe too comes from the training batches now

    def _runs_after_train_epoch(self) -> bool:
        return False

    def _wants_last_word(self, trainer: Any) -> bool:  # the statistics come from an epoch's batches: the budget plans
        return False  # the last expected epoch for them; after an early stop there are no fresh ones to log

    def _release(self, pl_module: Any) -> None:
        self._collecting = False
        if self._recorder is not None:
            self._recorder.detach()

    def _budget_units(self) -> float | None:
        return 0.1 * self._samples.count(seen=True) or None  # streaming a sample: a tenth of a sample pass

    def _cheaper_hint(self) -> str:
        return "or lower `max_batches` / `max_channels` "

    def _sites(self) -> list[tuple[str, Site]]:
        assert self._recorder is not None
        order = {name: i for i, name in enumerate(self._modules)}
        keys = sorted(self._stats, key=lambda k: (order[k[0]], k[1]))
        return [(self._recorder.site_name(*key), key) for key in keys]

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sites = self._sites()
        dead = [self._guard(f"site {site}", self._log_site, site, key, step, epochs_done) for site, key in sites]
        dead_rows = [row for row in dead if isinstance(row, tuple)]
        if dead_rows and self._sink is not None:
            self._sink.text("activations/dead_channels", render.dead_channel_table(dead_rows, epochs_done, step), step)
        if dead_rows and self._sink is not None and self._sink.writes_images:  # one picture for the whole model
            layers = [(site, self._history[site].frames) for site, _, _ in dead_rows]
            self._sink.image(DEAD_HISTORY_TAG, render.dead_history_panel(layers, max_height=self.max_image_side), step)
        self._guard("maps", self._log_maps, trainer, pl_module, sites, step)

    def _log_site(self, site: str, key: Site, step: int, epochs_done: int) -> tuple[str, list[int], int] | None:
        """Write one call site's statistics; return its dead-channel row (site, indices, channels) where defined."""
        sink = self._sink
        assert sink is not None
        stats = self._stats[key]
        rate, channels = stats.firing_rate(), stats.num_channels
        sparsity, mean, missing = stats.sparsity(), stats.mean(), stats.missing_fraction()
        # NaN/Inf activations are missing values (DESIGN rule 14): never zeros, never "dead"; a statistic with no
        # finite value behind it is not logged at all.
        # one chart per quantity a reader compares across layers (the mean is in the record): few cards per layer
        scalars = {f"activations/sparsity/{site}": sparsity} if math.isfinite(sparsity) else {}
        if missing:
            scalars[f"activations/nonfinite_fraction/{site}"] = missing
            self._warn_once(
                "nonfinite",
                f"ActivationMonitor: {missing:.0%} of the activations at {site!r} are NaN/Inf at step {step}: missing "
                "values, not zeros (statistics cover the finite ones, none where none is). Has training diverged?",
            )
        record: dict[str, Any] = {}
        row = None
        if self._dead_defined.get(key[0], False) and stats.known_channels():
            indices = stats.dead_mask().nonzero().flatten().tolist()
            record.update(dead_fraction=len(indices) / stats.known_channels(), dead_count=len(indices))
            scalars[f"activations/dead_fraction/{site}"] = record["dead_fraction"]
            scalars[f"activations/dead_count/{site}"] = record["dead_count"]
            row = (site, indices, channels)
            self._history[site].push(render.epoch_label(epochs_done), rate)
            record["dead_channels"] = tuple(indices)
        sink.scalars(scalars, step)
        sink.histogram(f"activations/firing_rate/{site}", rate[torch.isfinite(rate)], step)
        sink.histogram(f"activations/values/{site}", stats.samples(), step)
        self._publish(ActivationStats(step, epochs_done, site, channels, sparsity, mean, **record))
        return row

    def _probe_image(self, trainer: Any) -> torch.Tensor:
        resolve_probes(self.probes, trainer, ("val_dataloaders",) if self._source == "val" else ("train_dataloader",))
        if self.map_probe >= len(images := self.probes.images):
            raise ValueError(f"`map_probe`={self.map_probe} but the probe set has {len(images)} image(s).")
        return images[self.map_probe : self.map_probe + 1]

    def _log_maps(self, trainer: Any, pl_module: nn.Module, sites: list[tuple[str, Site]], step: int) -> None:
        if not self._map_modules or self._sink is None or not self._sink.writes_images:
            return
        image, p = self._probe_image(trainer).to(model_device(pl_module)), self.map_probe
        shown = render.display_image(image[0])
        if self.map_layers is None:  # the first and last drawable (N, C, H, W) output the data passed through
            self._map_modules = A.map_layers([n for n in self._stats.spatial if n in self._modules] or self._modules)
        modules = {n: self._modules[n] for n in self._map_modules}
        captured = A.site_maps(pl_module, modules, image, self._stats.layouts)
        for site, key in sites:
            if key not in captured:
                continue
            maps = captured[key][: self.max_channels]
            scale = A.map_scale(maps)
            dead = self._stats[key].dead_mask()[: len(maps)] if self._dead_defined.get(key[0]) else None
            panel = render.activation_panel(shown, maps, scale, dead, range(len(maps)), title=f"{site}: probe {p}")
            self._sink.image(f"activations/maps/{site}", panel, step)
            self._sink.scalars({f"activations/map_scale/{site}": scale}, step)

    def _extra_state(self) -> dict[str, Any]:
        return {"history": self._history.state_dict(), "probes": self.probes.state_dict(), "source": self._source}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._history.load_state_dict(state.get("history", {}))
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])
        self._source = state.get("source", self._source)
