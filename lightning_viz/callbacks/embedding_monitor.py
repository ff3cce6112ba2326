"""EmbeddingMonitor: the code a layer computes, over time: projector, 2-D map, nearest neighbours, k-NN quality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _budget, render
from lightning_viz import _validate as check
from lightning_viz._classes import class_name, find_class_names
from lightning_viz._data import split_batch
from lightning_viz._hooks import ValidationCodeCapture
from lightning_viz._layers import evenly_spaced, head_module, last_linear, resolve_layers
from lightning_viz._projection_worker import ProjectionClient, write_tensor_tsv
from lightning_viz.callbacks._embedding_maps import EmbeddingMaps
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import embedding as E
from lightning_viz.probes import ProbeSet
from lightning_viz.records import EmbeddingQuality

if TYPE_CHECKING:
    import lightning.pytorch as pl

Reducer = Literal["umap", "tsne", "pca"]
_DEFAULT_SUBSET = 1000
_RENAMED = {"projection": "reducer", "neighbours": "num_neighbours", "knn_k": "knn_neighbours"}  # until 0.3


class EmbeddingMonitor(EmbeddingMaps, VizCallback):
    """Features of a fixed validation subset, logged as TensorBoard projector data, a 2-D map and quality scalars.

    Each logged epoch, the chosen layer's codes are gathered for a fixed subset of the validation data: a seeded
    reservoir of ``subset_size`` samples over the first whole validation pass, kept on the CPU (the monitor never reads
    the dataset; the step-0 view is computed from the initial weights after that pass). With one process and an
    unshuffled loader the codes are captured in the Trainer's own validation pass, after checking that the pass has
    as many samples as before and each kept position holds the kept image; otherwise (DDP, a shuffled, resized or
    reloaded loader: the last two with a warning) the kept images go through the model. Then:

    - **Projector** (TensorBoard's "Projector" tab): one embedding per logged step, with metadata (true label,
      predicted label) and sprite thumbnails within the 8192x8192 sprite limit; every step is listed, also after a
      resumed run (:meth:`~lightning_viz.sinks.Sink.projector`).
    - **2-D map** (image ``embedding/map``): UMAP by default, coloured by class, computed in one child process per
      fit off the training path (``_projection_worker.py``) and written at its own step when ready (the end of
      ``fit`` waits); seeded and Procrustes-aligned to the previous map; ``embedding/map_filmstrip`` shows the last
      ``filmstrip_length`` maps; ``embedding/projection_seconds`` the projection's time.
    - **Nearest neighbours** (image ``embedding/neighbours``): for each probe, its ``num_neighbours`` nearest subset
      images in the code space (cosine distance), framed green when they share the probe's label, red otherwise.
    - **Quality**: ``embedding/knn_accuracy`` (leave-one-out, ``knn_neighbours`` neighbours, cosine) and
      ``embedding/silhouette`` (cosine) - "does the code get better" as a curve. W&B, MLflow and folder loggers
      get the codes as a table ``embedding/table`` (label, predicted, one column per dimension).

    Args:
        layer: the layer whose *output* is the code; default: the *input* of the head, the last ``nn.Linear`` reaching
            the output in a forward pass (a ViT's class token). Outputs with spatial dimensions are average-pooled.
        subset_size: number of validation samples (fixed, seeded); all of them (with a warning) if there are fewer.
        reducer: ``"umap"``, ``"tsne"`` or ``"pca"``: how the 2-D map is made (was ``projection``).
        projector: write TensorBoard projector data.
        sprite_size: maximum thumbnail side in the sprite (shrunk further to respect the 8192 limit).
        num_neighbours: neighbours shown per probe (was ``neighbours``); probes: the probe images (default: 6
            chosen from the validation data).
        knn_neighbours: neighbours that vote in the k-NN accuracy (was ``knn_k``).
        batch_size: samples per forward pass.
        filmstrip_length: maps in the filmstrip.
        class_names: names for the legend, neighbour strips and projector; default: found on the data or datamodule.
        **kwargs: ``every_n_epochs`` (default 3), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "embedding"
    publishes = (EmbeddingQuality,)
    default_every_n_epochs = 3
    budget_baseline = False  # reads `subset_size` samples: not before the budget knows what the run can afford
    budget_knobs = {"subset_size": 64, "num_neighbours": 4}
    budget_fixed_seconds = 0.05  # the neighbour strips, the sprite, the projector's files

    def __init__(
        self,
        *,
        layer: str | None = None,
        subset_size: int = _DEFAULT_SUBSET,
        reducer: Reducer = "umap",
        projector: bool = True,
        sprite_size: int = 32,
        num_neighbours: int = 8,
        probes: ProbeSet | None = None,
        knn_neighbours: int = 5,
        batch_size: int = 256,
        filmstrip_length: int = 6,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        moved = check.renamed("EmbeddingMonitor", kwargs, _RENAMED)
        reducer = moved.get("reducer", reducer)
        num_neighbours = moved.get("num_neighbours", num_neighbours)
        knn_neighbours = moved.get("knn_neighbours", knn_neighbours)
        super().__init__(**kwargs)
        check.layer_name("layer", layer)
        check.choice("reducer", reducer, get_args(Reducer))
        check.boolean("projector", projector)
        check.positive_ints(
            sprite_size=sprite_size,
            num_neighbours=num_neighbours,
            knn_neighbours=knn_neighbours,
            batch_size=batch_size,
            filmstrip_length=filmstrip_length,
        )
        check.at_least("subset_size", subset_size, 2)
        check.probe_set("probes", probes)
        self.layer = layer
        self.subset_size = self._asked = subset_size
        self.reducer = reducer
        self.projector = projector
        self.sprite_size = sprite_size
        self.num_neighbours = num_neighbours
        self.probes = probes if probes is not None else ProbeSet.auto(6, seed=self.seed)
        self.knn_neighbours = knn_neighbours
        self.batch_size = batch_size
        self.filmstrip_length = filmstrip_length
        self.class_names = self._class_names = check.class_names("class_names", class_names)  # or found on the data
        self._module: nn.Module | None = None
        self._use_input = False
        self._reference: np.ndarray | None = None
        self._maps = render.Filmstrip(filmstrip_length)
        self._projections = ProjectionClient(reducer, seed=self.seed)
        self._capture: ValidationCodeCapture | None = None
        self._captures: bool | None = None  #: whether the codes came from the Trainer's validation pass
        self._captured_at: int | None = None  #: the training step of the last captured validation pass

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layer": self.layer}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.layer is None:  # provisionally: the data flow decides on the first sample (`_gather`)
            self._module, self._use_input, self._flow_done = last_linear(pl_module), True, False
        else:
            self._module = resolve_layers(pl_module, [self.layer], (nn.Module,), argument="layer")[self.layer]
            self._use_input, self._flow_done = False, True
        self._capture = ValidationCodeCapture(self._module, self._use_input)
        self._captures, self._captured_at = None, None

    def _cheaper_hint(self) -> str:
        return "or lower `subset_size` "

    def _budget_units(self) -> float | None:
        # codes: a forward pass over the subset unless the Trainer's validation pass gave them (one process, an
        # unshuffled loader); thumbnails, k-NN quality and the map's input: about a tenth of a pass per sample
        kept = self._samples.count(complete=True) or self.subset_size
        n = min(self.subset_size, kept)
        trainer = self._fit_trainer() if self._fit_trainer is not None else None
        captures = self._captures if self._captures is not None else ValidationCodeCapture.can_capture(trainer)
        # (the step-0 view and the first epoch's call come before any captured pass: a forward pass)
        return (0.0 if captures and self._captured_at is not None else n / 3) + n / 10

    def _bank_capacity(self) -> int:
        return self.subset_size  # the probes are chosen among the subset

    def _has_data(self) -> bool:
        return self._samples.has_samples(complete=True)

    @property
    def _indices(self) -> list[int] | None:
        """The subset: its samples' positions in the validation pass (dataset indices for an unshuffled loader)."""
        return self._samples.samples(complete=True)[2] if self._has_data() else None

    # ------------------------------------------------------------------------------------------------ gather
    def _features(self, pl_module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(codes (N, D), logits-or-None) of ``images``, ``batch_size`` per forward pass, codes from the layer."""
        assert self._module is not None
        try:
            return E.layer_codes(pl_module, self._module, images, use_input=self._use_input, batch_size=self.batch_size)
        except TypeError as exc:
            raise TypeError(f"EmbeddingMonitor: {exc}") from None

    def _gather(self, trainer: Any, pl_module: nn.Module) -> tuple[Any, ...]:
        """Images, codes (N, D), labels, predictions of the subset: captured in validation, or computed."""
        images, labels, _, pass_size = self._samples.samples(complete=True)
        chosen = self._chosen(images)
        # the default code: the input of the head by data flow, found once on a sample (a new capture starts empty)
        head, self._flow_done = (None if self._flow_done else head_module(pl_module, images[:1])), True
        if head is not None and head is not self._module:
            self._module, self._capture = head, ValidationCodeCapture(head, True)
        assert self._capture is not None
        if len(images) < self._asked and self._asked != _DEFAULT_SUBSET:  # (a default is a ceiling)
            n, asked = len(images), self._asked
            self._warn_once(
                "subset", f"EmbeddingMonitor: `subset_size`={asked} but the data has {n} samples; using all of them."
            )
        # the last validation pass's codes serve while the weights are those it saw (not the step-0 view's)
        same = self._captured_at == trainer.global_step and self._deferred != "running"
        captured, problem = self._capture.collect(self._capture.epoch if same else -1, pass_size)
        if problem is not None:
            self._warn_once(
                "capture",
                f"EmbeddingMonitor: the validation data changed since the subset was taken ({problem}); the codes "
                "are computed from the kept images instead.",
            )
        self._captures = captured is not None
        if captured is not None:  # codes of the whole subset, free: the call keeps the chosen ones
            features, out = captured[0][chosen], captured[1][chosen] if captured[1] is not None else None
        else:
            features, out = self._features(pl_module, images[chosen])
        labels = labels[chosen] if labels is not None else None
        return images[chosen], features, labels, out.argmax(1) if out is not None else None

    def _chosen(self, images: torch.Tensor) -> torch.Tensor:
        """The samples of this call: ``subset_size`` of the kept ones, evenly spaced (a budget may ask for fewer
        than were kept), and the probes among them, so that their codes need no forward pass of their own."""
        chosen = set(evenly_spaced(len(images), self.subset_size))
        if self.probes.images is not None:
            chosen.update(i for i in E.matching_rows(images, self.probes.images) if i is not None)
        return torch.tensor(sorted(chosen), dtype=torch.long)

    def _thumb_size(self, count: int, image_side: int | None = None) -> int:
        """Thumbnail side: ``sprite_size``, never larger than the images, and within the projector's sprite limit."""
        wanted = min(self.sprite_size, image_side or self.sprite_size)
        return render.sprite_tile_side(count, wanted)

    # --------------------------------------------------------------------------------------------------- log
    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        projector = self.projector and sink.writes_images
        self._class_names = self.class_names or find_class_names(trainer, pl_module)
        images, features, labels, predicted = self._gather(trainer, pl_module)
        thumbs = render.thumbnails(images, self._thumb_size(len(images), max(images.shape[-2:]))) if projector else None
        if labels is None:
            self._warn_once("labels", "EmbeddingMonitor: the data has no labels: uncoloured map, no k-NN quality.")
        else:
            knn, sil, nonfinite = E.finite_quality(features, labels, self.knn_neighbours)
            if nonfinite:  # NaN/Inf codes (a diverged network) are missing values
                self._warn_once("nonfinite", f"EmbeddingMonitor: {nonfinite} NaN/Inf codes at step {step} left out.")
            self._publish(EmbeddingQuality(step, epochs_done, self.layer or "", knn_accuracy=knn, silhouette=sil))
            quality = (("embedding/knn_accuracy", knn), ("embedding/silhouette", sil))
            sink.scalars({k: v for k, v in quality if v is not None}, step)
        names = [
            None if c is None else [class_name(i, self._class_names) for i in c.tolist()] for c in (labels, predicted)
        ]
        tsv = self._guard("projector", sink.projector, features, *names, thumbs, step) if projector else None
        tsv = tsv if isinstance(tsv, str) else None
        if sink.writes_tables:  # W&B, MLflow, folder: the codes as a table (TensorBoard has the projector)
            self._guard("table", sink.embedding_table, "embedding/table", features.numpy(), *names, step)
        if sink.writes_images:
            self._guard("neighbours", self._log_neighbours, pl_module, features, images, labels, step)
        _budget.projection_within(self, pl_module, trainer)  # a budgeted run on the CPU may not afford UMAP
        submitted = sink.writes_images and self._guard("map", self._submit, features, labels, step, epochs_done, tsv)
        if tsv is not None and submitted is not True:  # no child to write the projector's tensor file
            write_tensor_tsv(tsv, features.numpy())

    def _log_neighbours(self, model: nn.Module, features: torch.Tensor, images: Any, labels: Any, step: int) -> None:
        assert self._sink is not None and self.probes.images is not None
        probe_images = self.probes.images
        rows = E.matching_rows(images, probe_images)  # the probes are kept samples: their codes are at hand
        missing = [i for i, row in enumerate(rows) if row is None]  # (probes given by the user)
        codes = features[[row or 0 for row in rows]]
        if missing:
            codes[missing] = self._features(model, probe_images[missing])[0]
        idx, _ = E.nearest_neighbours(codes, features, self.num_neighbours)
        strips = render.neighbours_of(probe_images, self.probes.labels, images, labels, idx, self._class_names)
        self._sink.image("embedding/neighbours", strips, step)

    # ------------------------------------------------------------------------------------------- lifecycle
    def _last_expected_epoch(self, trainer: Any) -> bool:
        """Whether this validation pass is the fit's last (its codes then serve the last word without a forward)."""
        expected = _budget.expected_epochs(trainer)
        last = expected is not None and trainer.current_epoch + 1 >= expected
        return self._budget_managed and last and not trainer.sanity_checking

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._active
            and self._capture is not None
            and getattr(trainer.state, "fn", None) == "fit"
            and (self._is_log_epoch(trainer) or self._last_expected_epoch(trainer))  # (not while sanity checking)
            and getattr(trainer, "is_global_zero", True)
            and ValidationCodeCapture.can_capture(trainer)
            and "embedding" not in self._disabled
            and self._samples.has_samples(complete=True)
        ):
            images, _, positions, _ = self._samples.samples(complete=True)
            self._capture.attach(positions, images)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._capture is not None and self._capture.attached and dataloader_idx == 0:
            self._capture.batch_end(split_batch(batch, self._samples.input_fn))  # (images, labels), our rule
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            if self._capture.attached:
                self._captured_at = trainer.global_step
            self._capture.detach(epoch=trainer.current_epoch)
        super().on_validation_epoch_end(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._log_maps()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._log_maps()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_maps(wait=True)

    def _release(self, pl_module: Any) -> None:
        if self._capture is not None:
            self._capture.detach()
        try:
            self._log_maps(wait=True)
        finally:
            self._projections.close()

    def _abort(self) -> None:
        self._projections.close(kill=True)  # the run is failing: don't wait for maps, stop the child

    def _extra_state(self) -> dict[str, Any]:
        reference = torch.from_numpy(self._reference) if self._reference is not None else None
        return {"reference": reference, "maps": self._maps.state_dict(), "probes": self.probes.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._reference = state["reference"].numpy() if state.get("reference") is not None else None
        self._maps.load_state_dict(state.get("maps", []))
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])
