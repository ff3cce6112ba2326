"""EmbeddingMonitor: the code a layer computes, over time: projector, 2-D map, nearest neighbours, k-NN quality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import nn

from lightning_viz import _projection_worker, render
from lightning_viz import _validate as check
from lightning_viz._data import read_batches, trainer_dataset
from lightning_viz._layers import layers_of_kind, model_device, resolve_layers
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import embedding as E
from lightning_viz.probes import ProbeSet
from lightning_viz.records import EmbeddingQuality

Reducer = Literal["umap", "tsne", "pca"]

_SPRITE_LIMIT = 8192  # TensorBoard's projector accepts sprites up to 8192x8192 pixels


@dataclass
class _Job:
    step: int
    epochs_done: int
    workdir: str
    labels: np.ndarray | None
    tsv: str = "-"  #: the projector tensor file the child writes, or "-"
    sent: bool = False

    @property
    def output(self) -> str:
        return os.path.join(self.workdir, "coords.npy")


class EmbeddingMonitor(VizCallback):
    """Features of a fixed validation subset, logged as TensorBoard projector data, a 2-D map and quality scalars.

    Each logged epoch, the features of the chosen layer are gathered for a fixed, seeded subset of the validation data
    (``subset_size`` samples). With one process and an unshuffled validation loader they are captured by a forward
    hook during the validation pass the Trainer runs anyway (a running count gives each sample's dataset index), so
    no forward pass is added; otherwise (DDP, a shuffled or custom sampler, and the baseline before any validation)
    the samples are read from the dataset by index and passed through the model in batches. Then:

    - **Projector** (TensorBoard's "Projector" tab): one embedding per logged step, with metadata (true label,
      predicted label) and sprite thumbnails kept within the projector's 8192x8192 sprite limit. We write
      ``projector_config.pbtxt`` ourselves, merging with what is on disk, so it lists every step also after a
      resumed run (``SummaryWriter.add_embedding`` rewrites it with only the current process's steps).
    - **2-D map** (image ``embedding/map``): UMAP by default (``reducer="tsne"`` or ``"pca"``), coloured by class
      with a legend. It is computed in one child process per fit (``lightning_viz/_projection_worker.py``), off the
      training path; the image is written at the step it belongs to when it is ready, and the end of ``fit`` waits
      for outstanding maps. Seeded; each map is Procrustes-aligned to the previous one so the cloud does not flip or
      spin between epochs; ``embedding/map_filmstrip`` shows the last ``filmstrip_length`` maps side by side.
      The projection's own time is logged as ``embedding/projection_seconds``.
    - **Nearest neighbours** (image ``embedding/neighbours``): for each probe, its ``num_neighbours`` nearest subset
      images in the code space (cosine distance), framed green when they share the probe's label, red otherwise.
    - **Quality**: ``embedding/knn_accuracy`` (leave-one-out, ``knn_neighbours`` neighbours, cosine) and
      ``embedding/silhouette`` (cosine) - "does the code get better" as a curve.

    Args:
        layer: name of the layer whose *output* is the code; default: the *input* of the model's last ``nn.Linear``
            (the penultimate code). Outputs with spatial dimensions are average-pooled to (N, C).
        subset_size: number of validation samples (fixed, seeded); all of them (with a warning) if there are fewer.
        reducer: ``"umap"``, ``"tsne"`` or ``"pca"``: how the 2-D map is made (was ``projection``).
        projector: write TensorBoard projector data.
        sprite_size: maximum thumbnail side in the sprite (shrunk further to respect the 8192 limit).
        num_neighbours: neighbours shown per probe (was ``neighbours``); probes: the probe images (default: 6
            chosen from the validation data).
        knn_neighbours: neighbours that vote in the k-NN accuracy (was ``knn_k``).
        batch_size: samples per forward pass.
        filmstrip_length: maps in the filmstrip.
        class_names: optional names for the legend and metadata.
        **kwargs: ``every_n_epochs`` (default 3), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "embedding"
    publishes = (EmbeddingQuality,)
    default_every_n_epochs = 3
    budget_baseline = False  # reads `subset_size` samples: not before the budget knows what the run can afford

    def __init__(
        self,
        *,
        layer: str | None = None,
        subset_size: int = 1000,
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
        moved = check.renamed(
            "EmbeddingMonitor",
            kwargs,
            {"projection": "reducer", "neighbours": "num_neighbours", "knn_k": "knn_neighbours"},
        )
        reducer = moved.get("reducer", reducer)
        num_neighbours = moved.get("num_neighbours", num_neighbours)
        knn_neighbours = moved.get("knn_neighbours", knn_neighbours)
        super().__init__(**kwargs)
        check.layer_name("layer", layer)
        check.choice("reducer", reducer, get_args(Reducer))
        check.boolean("projector", projector)
        for arg, value in (
            ("sprite_size", sprite_size),
            ("num_neighbours", num_neighbours),
            ("knn_neighbours", knn_neighbours),
            ("batch_size", batch_size),
            ("filmstrip_length", filmstrip_length),
        ):
            check.positive_int(arg, value)
        check.at_least("subset_size", subset_size, 2)
        check.probe_set("probes", probes)
        self.layer = layer
        self.subset_size = subset_size
        self.reducer = reducer
        self.projector = projector
        self.sprite_size = sprite_size
        self.num_neighbours = num_neighbours
        self.probes = probes if probes is not None else ProbeSet.auto(6, seed=self.seed)
        self.knn_neighbours = knn_neighbours
        self.batch_size = batch_size
        self.filmstrip_length = filmstrip_length
        self.class_names = check.class_names("class_names", class_names)
        self._module: nn.Module | None = None
        self._use_input = False
        self._indices: list[int] | None = None
        self._reference: np.ndarray | None = None
        self._maps: list[tuple[str, torch.Tensor]] = []
        self._jobs: list[_Job] = []
        self._tmp: str | None = None
        self._worker: subprocess.Popen | None = None
        self._worker_log: Any = None
        self._image_side: int | None = None
        self._capture_handles: list[Any] = []
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._captured_epoch: int | None = None
        self._wanted: set[int] = set()
        self._seen = 0
        self._batch_out: list[Any] = []

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layer": self.layer}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.layer is None:
            linears = layers_of_kind(pl_module, (nn.Linear,))
            if not linears:
                raise ValueError(
                    "`layer`: the model has no nn.Linear, so there is no default code layer; name the layer whose "
                    "output is the code, e.g. `layer='avgpool'`."
                )
            self._module, self._use_input = list(linears.values())[-1], True
        else:
            self._module = resolve_layers(pl_module, [self.layer], (nn.Module,), argument="layer")[self.layer]
            self._use_input = False

    def _cheaper_hint(self) -> str:
        return "or lower `subset_size` "

    # ------------------------------------------------------------------------------------ feature extraction
    def _features(self, pl_module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (N, D), logits-or-None) of a batch, codes from the hooked layer."""
        assert self._module is not None
        captured: list[Any] = []

        def hook(module, inputs, output=None):
            captured.append(inputs[0] if self._use_input else output)

        handle = (
            self._module.register_forward_pre_hook(hook)
            if self._use_input
            else self._module.register_forward_hook(hook)
        )
        try:
            out = pl_module(images.to(model_device(pl_module)))
        finally:
            handle.remove()
        if not captured or not isinstance(captured[-1], torch.Tensor):
            kind = type(captured[-1]).__name__ if captured else "nothing (the layer was not called)"
            raise TypeError(f"EmbeddingMonitor: the feature layer's output must be a tensor, got {kind}.")
        code = captured[-1].detach().float()
        if code.ndim > 2:
            code = code.flatten(2).mean(-1)
        return code.cpu(), out.detach().float().cpu() if isinstance(out, torch.Tensor) and out.ndim == 2 else None

    def _subset(self, trainer: Any) -> Any:
        dataset = trainer_dataset(trainer, "val")
        if dataset is None:
            raise ValueError("EmbeddingMonitor needs an indexable validation (or training) dataset.")
        if self._indices is None:
            if len(dataset) < self.subset_size:
                self._warn_once(
                    "subset",
                    f"EmbeddingMonitor: `subset_size`={self.subset_size} but the data has {len(dataset)} samples; "
                    "using all of them.",
                )
            self._indices = E.subset_indices(len(dataset), self.subset_size, self.seed)
        return dataset

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        dataset = self._subset(trainer)
        assert self._indices is not None
        reuse = self._captured_epoch == trainer.current_epoch and all(i in self._captured for i in self._indices)
        codes, logits, labels, thumbs = [], [], [], []
        for start, (images, batch_labels) in zip(
            range(0, len(self._indices), self.batch_size), read_batches(dataset, self._indices, self.batch_size)
        ):
            if reuse:  # the codes of this validation epoch, captured as the Trainer ran it: no forward pass here
                rows = [self._captured[i] for i in self._indices[start : start + len(images)]]
                codes.append(torch.stack([code for code, _ in rows]))
                logits.append(torch.stack([out for _, out in rows]) if all(o is not None for _, o in rows) else None)
            else:
                code, out = self._features(pl_module, images)
                codes.append(code)
                logits.append(out)
            labels.extend(batch_labels)
            if self.projector and sink.writes_images:
                self._image_side = max(images.shape[-2:])
                thumbs.append(_thumbnails(images, self._thumb_size()))
        self._captured = {}
        features = torch.cat(codes)
        label_tensor = E.labels_or_none(labels)
        predicted = torch.cat(logits).argmax(1) if all(lg is not None for lg in logits) else None
        if label_tensor is None:
            self._warn_once(
                "labels", "EmbeddingMonitor: the data has no labels: the map is uncoloured and k-NN quality skipped."
            )
        else:
            knn = E.knn_accuracy(features, label_tensor, self.knn_neighbours)
            sil = E.silhouette(features, label_tensor)
            self._publish(
                EmbeddingQuality(
                    step=step, epoch=epochs_done, subject=self.layer or "", knn_accuracy=knn, silhouette=sil
                )
            )
            sink.scalars({"embedding/knn_accuracy": knn, "embedding/silhouette": sil}, step)
        tsv = None
        if self.projector and sink.writes_images and sink.log_dir:
            tsv = self._guard(
                "projector", self._write_projector, sink.log_dir, features, label_tensor, predicted, thumbs, step
            )
            tsv = tsv if isinstance(tsv, str) else None
        self._guard("neighbours", self._log_neighbours, trainer, pl_module, features, dataset, label_tensor, step)
        submitted = sink.writes_images and self._guard(
            "map", self._submit, features, label_tensor, step, epochs_done, tsv
        )
        if tsv is not None and submitted is not True:  # no child to write the projector's tensor file
            np.savetxt(tsv, features.numpy(), delimiter="\t", fmt="%.5g")

    # --------------------------------------------------- codes captured during the Trainer's own validation
    def _can_capture(self, trainer: Any) -> bool:
        """Capture only where a running count gives each sample's dataset index: one process, a sequential
        validation loader (the usual, unshuffled one)."""
        from torch.utils.data import SequentialSampler

        from lightning_viz._data import first_loader

        loader = first_loader(getattr(trainer, "val_dataloaders", None))
        sampler = getattr(loader, "sampler", None)
        return (
            getattr(trainer, "world_size", 1) == 1
            and isinstance(sampler, SequentialSampler)
            and getattr(loader, "batch_sampler", None) is not None
            and type(loader.batch_sampler).__name__ == "BatchSampler"
        )

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if (
            not self._active
            or self._module is None
            or trainer.sanity_checking
            or getattr(trainer.state, "fn", None) != "fit"
            or not self._is_log_epoch(trainer)
            or not getattr(trainer, "is_global_zero", True)
            or not self._can_capture(trainer)
            or "embedding" in self._disabled
        ):
            return
        self._subset(trainer)
        self._wanted = set(self._indices or [])
        self._captured, self._seen, self._batch_out = {}, 0, []

        def keep(module, inputs, output=None):
            if not self._batch_out:  # the first call per batch: the model's own forward pass
                code = inputs[0] if self._use_input else output
                logits = output if self._use_input else None
                self._batch_out.append((code, logits))

        hook = self._module.register_forward_hook(lambda m, i, o: keep(m, i, o))
        self._capture_handles = [hook]

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._capture_handles or dataloader_idx != 0:
            return
        try:
            if self._batch_out:
                code, logits = self._batch_out[0]
                if isinstance(code, torch.Tensor):
                    code = code.detach().float()
                    code = code.flatten(2).mean(-1) if code.ndim > 2 else code
                    usable = isinstance(logits, torch.Tensor) and logits.ndim == 2
                    for row in range(len(code)):
                        index = self._seen + row
                        if index in self._wanted:
                            out = logits[row].detach().float().cpu() if usable else None
                            self._captured[index] = (code[row].cpu(), out)
                    self._seen += len(code)
        finally:
            self._batch_out = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._capture_handles:
            self._remove_capture_hooks()
            self._captured_epoch = trainer.current_epoch

    def _remove_capture_hooks(self) -> None:
        for handle in self._capture_handles:
            handle.remove()
        self._capture_handles = []
        self._batch_out = []

    # ----------------------------------------------------------------------------------------- projector
    def _thumb_size(self, image_side: int | None = None) -> int:
        """Thumbnail side: ``sprite_size``, never larger than the images, and within the projector's sprite limit."""
        assert self._indices is not None
        per_side = int(np.ceil(np.sqrt(len(self._indices))))
        side = min(self.sprite_size, image_side or self._image_side or self.sprite_size)
        return max(1, min(side, _SPRITE_LIMIT // per_side))

    def _write_projector(self, log_dir, features, labels, predicted, thumbs, step) -> str:
        from google.protobuf import text_format
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        subdir = os.path.join("embedding", f"{step:08d}")
        path = os.path.join(log_dir, subdir)
        os.makedirs(path, exist_ok=True)
        rows = ["label\tpredicted"]
        for i in range(len(features)):
            true = self._name(int(labels[i])) if labels is not None else "?"
            pred = self._name(int(predicted[i])) if predicted is not None else "?"
            rows.append(f"{true}\t{pred}")
        with open(os.path.join(path, "metadata.tsv"), "w") as f:
            f.write("\n".join(rows) + "\n")
        if thumbs:
            sprite = _sprite(torch.cat(thumbs))
            Image.fromarray(sprite).save(os.path.join(path, "sprite.png"))
        config_path = os.path.join(log_dir, "projector_config.pbtxt")
        config = ProjectorConfig()
        if os.path.exists(config_path):
            with open(config_path) as f:
                text_format.Merge(f.read(), config)
        kept = [e for e in config.embeddings if e.tensor_path != os.path.join(subdir, "tensors.tsv")]
        del config.embeddings[:]
        config.embeddings.extend(kept)
        info = config.embeddings.add()
        info.tensor_name = f"embedding:{step:08d}"
        info.tensor_path = os.path.join(subdir, "tensors.tsv")
        info.metadata_path = os.path.join(subdir, "metadata.tsv")
        if thumbs:
            info.sprite.image_path = os.path.join(subdir, "sprite.png")
            side = self._thumb_size()
            info.sprite.single_image_dim.extend([side, side])
        tmp = config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text_format.MessageToString(config))
        os.replace(tmp, config_path)
        return os.path.join(path, "tensors.tsv")  # written by the child process with the map, or by the caller

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names is not None and c < len(self.class_names) else str(c)

    # ---------------------------------------------------------------------------------------- neighbours
    def _log_neighbours(self, trainer, pl_module, features, dataset, labels, step) -> None:
        sink = self._sink
        assert sink is not None and self._indices is not None
        if not sink.writes_images:
            return
        if not self.probes.is_resolved:
            self.probes.resolve(dataset)
        probe_images = self.probes.images
        probe_codes, _ = self._features(pl_module, probe_images)
        idx, _ = E.nearest_neighbours(probe_codes, features, self.num_neighbours)
        rows = []
        for p in range(len(probe_images)):
            neighbour_images, _ = next(read_batches(dataset, [self._indices[int(j)] for j in idx[p]], len(idx[p])))
            tiles = torch.stack(
                [render.display_image(im) for im in torch.cat([probe_images[p : p + 1], neighbour_images])]
            )
            tiles = render.resize_tiles(tiles, 40)
            colours = torch.full((len(tiles), 3), 0.5)
            colours[0] = torch.tensor([0.0, 0.0, 0.0])
            probe_label = self.probes.labels[p] if self.probes.labels is not None else None
            if labels is not None and probe_label is not None:
                same = labels[idx[p]] == probe_label
                colours[1:] = torch.where(
                    same.view(-1, 1), torch.tensor([0.1, 0.7, 0.1]), torch.tensor([0.9, 0.1, 0.1])
                )
            tiles = render.frame(tiles, colours)
            rows.append(render.label_left(render.tile_grid(tiles, ncol=len(tiles)), f"probe {p}"))
        sink.image("embedding/neighbours", render.stack_rows(rows), step)

    # --------------------------------------------------------------------------------- off-path projection
    def _submit(
        self, features: torch.Tensor, labels: torch.Tensor | None, step: int, epochs_done: int, tsv: str | None = None
    ) -> bool:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="lightning_viz_")
        workdir = os.path.join(self._tmp, f"{step:08d}")
        os.makedirs(workdir, exist_ok=True)
        np.save(os.path.join(workdir, "features.npy"), features.numpy().astype(np.float32), allow_pickle=False)
        job = _Job(step, epochs_done, workdir, labels.numpy() if labels is not None else None, tsv=tsv or "-")
        self._jobs.append(job)
        self._poll()
        return True

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.poll() is None

    def _send(self, job: _Job) -> None:
        """Hand a job to the long-lived child (started on first use): numba compiles UMAP once per fit."""
        if self._worker is None:
            assert self._tmp is not None
            self._worker_log = open(os.path.join(self._tmp, "worker_stderr.txt"), "w")
            self._worker = subprocess.Popen(
                [sys.executable, _projection_worker.__file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=self._worker_log,
                text=True,
            )
        features = os.path.join(job.workdir, "features.npy")
        assert self._worker.stdin is not None
        self._worker.stdin.write(f"{features}\t{job.output}\t{self.reducer}\t{self.seed}\t15\t{job.tsv}\n")
        self._worker.stdin.flush()
        job.sent = True

    def _poll(self, wait: bool = False) -> None:
        """Log finished maps in order; never blocks unless ``wait``. One child works through the queue in order."""
        for job in self._jobs:
            if not job.sent:
                self._send(job)
        while self._jobs:
            job = self._jobs[0]
            while wait and not _finished(job) and self._worker_alive():
                time.sleep(0.05)
            if not _finished(job):
                if self._worker_alive():
                    return
                code = self._worker.returncode if self._worker is not None else None
                self._jobs.pop(0)
                self._guard("map", self._fail_job, job, code)
                continue
            self._jobs.pop(0)
            self._guard("map", self._finish_job, job)

    def _fail_job(self, job: _Job, code: int | None) -> None:
        tail = ""
        if self._tmp is not None and os.path.exists(os.path.join(self._tmp, "worker_stderr.txt")):
            with open(os.path.join(self._tmp, "worker_stderr.txt")) as f:
                tail = f.read()[-1500:]
        self._worker = None
        raise RuntimeError(f"the {self.reducer} worker process exited with {code}: {tail}")

    def _finish_job(self, job: _Job) -> None:
        try:
            if os.path.exists(job.output + ".error"):
                with open(job.output + ".error") as f:
                    raise RuntimeError(f"the {self.reducer} projection failed: {f.read()[-1500:]}")
            coords = np.load(job.output, allow_pickle=False)
            with open(job.output + ".json") as f:
                worker_seconds = json.load(f)["seconds"]
        finally:
            shutil.rmtree(job.workdir, ignore_errors=True)
        if self._reference is not None and self._reference.shape == coords.shape:
            coords = E.procrustes_align(coords, self._reference)
        self._reference = coords
        sink = self._sink
        assert sink is not None
        image = render.scatter(
            coords,
            job.labels,
            title=f"{self.reducer} of the code, epoch {job.epochs_done}",
            class_names=self.class_names,
        )
        sink.image("embedding/map", image, job.step)
        small = render.scatter(coords, job.labels, size=160, title=f"ep {job.epochs_done}", radius=1)
        self._maps.append((f"ep {job.epochs_done}", torch.from_numpy(small.copy())))
        del self._maps[: -self.filmstrip_length]
        sink.image("embedding/map_filmstrip", render.hstack([m.numpy() for _, m in self._maps]), job.step)
        sink.scalars({"embedding/projection_seconds": worker_seconds}, job.step)
        sink.flush()

    # ------------------------------------------------------------------------------------------- lifecycle
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._jobs:
            self._poll()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._jobs:
            self._poll()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._wait_for_maps()

    def _wait_for_maps(self) -> None:
        if self._jobs:
            if self._sink is not None and self._sink.writes_images:
                print(f"lightning_viz: waiting for {len(self._jobs)} embedding map(s) ({self.reducer})...", flush=True)
            self._poll(wait=True)

    def _stop_worker(self, kill: bool) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                if kill:
                    worker.kill()
                else:
                    worker.stdin.close()  # end of input: the child exits
                    worker.wait(timeout=30)
            except Exception:
                worker.kill()
        if self._worker_log is not None:
            self._worker_log.close()
            self._worker_log = None

    def _release(self, pl_module: Any) -> None:
        self._remove_capture_hooks()
        try:
            self._wait_for_maps()
        finally:
            self._jobs.clear()
            self._stop_worker(kill=False)
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_capture_hooks()
        self._jobs.clear()  # the run is failing: don't wait for maps, stop the child
        self._stop_worker(kill=True)
        super().on_exception(trainer, pl_module, exception)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "indices": list(self._indices) if self._indices is not None else None,
            "reference": torch.from_numpy(self._reference) if self._reference is not None else None,
            "maps": [(label, img.clone()) for label, img in self._maps],
            "probes": self.probes.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._indices = state.get("indices")
        ref = state.get("reference")
        self._reference = ref.numpy() if ref is not None else None
        self._maps = [(label, img) for label, img in state.get("maps", [])]
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])


def _finished(job: _Job) -> bool:
    return os.path.exists(job.output) or os.path.exists(job.output + ".error")


def _thumbnails(images: torch.Tensor, side: int) -> torch.Tensor:
    tiles = torch.stack([render.display_image(im) for im in images])
    return torch.nn.functional.interpolate(tiles, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)


def _sprite(thumbs: torch.Tensor) -> np.ndarray:
    """Square sprite sheet, row-major, as TensorBoard's projector expects. (N, 3, s, s) -> (S, S, 3) uint8."""
    n, _, s, _ = thumbs.shape
    per_side = int(np.ceil(np.sqrt(n)))
    sheet = torch.zeros(3, per_side * s, per_side * s)
    for i in range(n):
        r, c = divmod(i, per_side)
        sheet[:, r * s : (r + 1) * s, c * s : (c + 1) * s] = thumbs[i]
    return render.to_uint8(sheet)
