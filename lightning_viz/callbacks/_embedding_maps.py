"""The embedding's 2-D map: a projection made in process (PCA) or by a child off the training path (UMAP, t-SNE),
aligned to the previous map and logged with its filmstrip (a part of :class:`EmbeddingMonitor`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lightning_viz import render
from lightning_viz._projection_worker import Projection, ProjectionClient
from lightning_viz.functional import embedding as E


class EmbeddingMaps:
    """The map part of the embedding monitor (a mixin: it uses the monitor's sink, guard and class names)."""

    _projections: ProjectionClient
    _reference: np.ndarray | None
    _maps: render.Filmstrip
    _class_names: Any
    _sink: Any
    _guard: Any

    def _submit(self, features: torch.Tensor, labels: Any, step: int, epochs_done: int, tsv: str | None) -> bool:
        """Make the map of ``features`` (PCA at once; UMAP / t-SNE queued for the child); whether the child took it
        (and writes the projector's tensor file ``tsv``)."""
        if not bool(torch.isfinite(features).all()):
            return False  # NaN/Inf codes (a diverged network, said in `_log`): no map of them
        context = (step, epochs_done, labels.numpy() if labels is not None else None)
        client = self._projections
        if client.method == "pca" and not client.running:  # milliseconds here; a child's start costs a CPU second
            started = time.perf_counter()
            coords = E.pca_map(features)
            self._log_map(Projection(context, coords, time.perf_counter() - started))
            return False
        client.submit(features.numpy(), context, tensor_file=tsv)
        self._log_maps()
        return True

    def _log_maps(self, wait: bool = False) -> None:
        """Log the maps whose projection is done, in order; never blocks unless ``wait``."""
        if wait and self._projections.pending and self._sink is not None and self._sink.writes_images:
            count = self._projections.pending
            print(f"lightning_viz: waiting for {count} embedding map(s) ({self._projections.method})...", flush=True)
        for projection in self._projections.finished(wait=wait):
            self._guard("map", self._log_map, projection)

    def _log_map(self, projection: Projection) -> None:
        if projection.error is not None:
            raise RuntimeError(projection.error)
        step, epochs_done, labels = projection.context
        coords = projection.coords
        if self._reference is not None and self._reference.shape == coords.shape:
            coords = E.procrustes_align(coords, self._reference)
        self._reference = coords
        image, frame = render.embedding_map(
            coords, labels, reducer=self._projections.method, epochs_done=epochs_done, class_names=self._class_names
        )
        assert (sink := self._sink) is not None
        sink.image("embedding/map", image, step)
        sink.image("embedding/map_filmstrip", render.grid_filmstrip(self._maps.push("", frame).images()), step)
        sink.scalars({"embedding/projection_seconds": projection.seconds}, step)
        sink.flush()
