"""Where our images, text, histograms, tables and scalars go.

A :class:`Sink` fans each output out to one backend per logger of the Trainer that can take it (either Lightning
namespace):

================================  ==========================================================================
logger                            what it receives from us
================================  ==========================================================================
``TensorBoardLogger``             images, text, histograms (the first such logger; projector files beside it)
``WandbLogger``                   images with captions, text as HTML panels (key ``<tag>/html``), histograms,
                                  embedding tables
``MLFlowLogger``                  images (PNG), text (Markdown), histograms and embedding tables (JSON/TSV), as
                                  artifacts under ``lightning_viz/step_<global step>/``
``lightning_viz.FolderLogger``    PNG, Markdown, JSON and TSV files plus an ``index.jsonl`` the report reads
any other logger (CSV, ...)       scalars only
================================  ==========================================================================

Scalars go through every logger's own ``log_metrics`` (never twice through a backend). Everything is written on
global rank zero only, and ``wandb`` / ``mlflow`` are imported only when such a logger is present.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from lightning_viz._compat import (
    is_dummy_logger,
    is_folder_logger,
    is_mlflow_logger,
    is_tensorboard_logger,
    is_wandb_logger,
)
from lightning_viz.render import downsize
from lightning_viz.report import OUR_AREAS

NO_LOGGER_MESSAGE = (
    "lightning_viz callbacks write to the Trainer's loggers, but the Trainer has no logger. Pass one, e.g. "
    "`Trainer(logger=TensorBoardLogger('runs'))` (from `lightning.pytorch.loggers` or `pytorch_lightning.loggers`), "
    "`WandbLogger`, `MLFlowLogger`, or `lightning_viz.FolderLogger('runs')` for plain files; or leave `logger` at "
    "its default."
)
NO_IMAGE_LOGGER_MESSAGE = (
    "the Trainer has no TensorBoardLogger, WandbLogger, MLFlowLogger or lightning_viz.FolderLogger, so images, text "
    "and histograms are neither computed nor written; scalars still go to the loggers it has. Add one to "
    "`logger=[...]`, e.g. `lightning_viz.FolderLogger(save_dir)` for plain PNG/JSON files."
)

#: Folder (MLflow artifacts) holding one sub-folder per logged step.
ARTIFACT_ROOT = "lightning_viz"
#: Bins of the histogram summaries written where no native histogram exists (MLflow, folder).
HISTOGRAM_BINS = 64
#: zlib level of the PNGs we encode (TensorBoard, folder, projector sprite): level 1 encodes our rendered images 2-3x
#: faster than PIL's default (6) for files about 10 % larger; encoding is a fixed CPU cost no accelerator shrinks.
PNG_COMPRESS_LEVEL = 1
#: A TensorBoard event file is flushed at most this often (seconds) by our calls (TensorBoard reloads every 30 s); the
#: logger's own flush at the end of ``fit`` (``finalize``) writes the rest. Waiting for the writer thread after every
#: monitor call cost more than the encoding itself.
FLUSH_SECONDS = 30.0


def takes_images(loggers: Sequence[Any]) -> bool:
    """Whether any of ``loggers`` can receive images (and text and histograms)."""
    return any(_backend_kind(lg) is not None for lg in loggers)


def _backend_kind(logger: Any) -> str | None:
    if is_tensorboard_logger(logger):
        return "tensorboard"
    if is_wandb_logger(logger):
        return "wandb"
    if is_mlflow_logger(logger):
        return "mlflow"
    if is_folder_logger(logger):
        return "folder"
    return None


def safe_path(tag: str) -> str:
    """A relative file path for ``tag``: ``/`` separates folders, other odd characters become ``_``, never ``..``."""
    parts = [re.sub(r"[^A-Za-z0-9_.-]+", "_", p).strip(".") or "_" for p in tag.split("/") if p]
    return "/".join(parts) or "_"


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def tensorboard_image(tag: str, image: np.ndarray) -> Any:
    """A TensorBoard ``Summary`` of one (H, W, 3) uint8 image, encoded once at :data:`PNG_COMPRESS_LEVEL` (what
    ``SummaryWriter.add_image`` does, without its float round trip, its same-size Lanczos resize and level-6 PNG)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = image.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png_bytes(image))
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


_last_flush: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def histogram_summary(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts over ``bins`` equal bins of finite ``values`` (1-D float), with the usual summary numbers."""
    counts, edges = np.histogram(values, bins=bins)
    return {
        "count": int(values.size),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
    }


def embedding_tsv(features: np.ndarray, labels: Sequence[str], predicted: Sequence[str]) -> str:
    """A tab-separated table: ``label``, ``predicted``, then one column per feature dimension."""
    header = ["label", "predicted", *[f"d{i}" for i in range(features.shape[1])]]
    rows = ["\t".join(header)]
    for i, row in enumerate(features):
        rows.append("\t".join([_tsv_cell(labels[i]), _tsv_cell(predicted[i]), *[f"{v:.6g}" for v in row]]))
    return "\n".join(rows) + "\n"


def _tsv_cell(value: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", value)


def _names(values: Sequence[Any] | np.ndarray | torch.Tensor | None, n: int, what: str) -> list[str]:
    if values is None:
        return ["?"] * n
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    names = [str(v) for v in (values.tolist() if isinstance(values, np.ndarray) else values)]
    if len(names) != n:
        raise ValueError(f"`{what}` must have one entry per row of `features` ({n}), got {len(names)}.")
    return names


class _Backend(Protocol):
    """One logger's way of receiving our output. Each ``takes_*`` flag says whether the method does anything."""

    takes_images: bool
    takes_text: bool
    takes_histograms: bool
    takes_tables: bool

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None: ...

    def text(self, tag: str, markdown: str, step: int) -> None: ...

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...

    def embedding_table(
        self, tag: str, features: np.ndarray, labels: list[str], predicted: list[str], step: int
    ) -> None: ...

    def flush(self) -> None: ...


class TensorBoardBackend:
    """A ``SummaryWriter``: images, text and histograms (embedding tables: TensorBoard's projector instead)."""

    takes_images = takes_text = takes_histograms = True
    takes_tables = False

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:  # a writer of another make: its own (slower) encoding
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            return
        file_writer().add_summary(tensorboard_image(tag, np.ascontiguousarray(image)), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, global_step=step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.writer.add_histogram(tag, values, global_step=step)

    def embedding_table(self, tag, features, labels, predicted, step) -> None:  # noqa: ANN001
        pass

    def flush(self) -> None:
        """Flush the event file, at most every :data:`FLUSH_SECONDS` (the first call always flushes)."""
        now = time.monotonic()
        try:
            last = _last_flush.get(self.writer)
        except TypeError:  # a writer that cannot be weakly referenced: flush every time
            self.writer.flush()
            return
        if last is None or now - last >= FLUSH_SECONDS:
            self.writer.flush()
            _last_flush[self.writer] = time.monotonic()


class WandbBackend:
    """A ``WandbLogger``: ``wandb.Image`` with a caption, ``wandb.Html`` panels, ``wandb.Histogram``, ``wandb.Table``.

    Everything goes through the logger's own methods, so its prefix and its ``trainer/global_step`` x-axis apply.
    """

    takes_images = takes_text = takes_histograms = takes_tables = True

    def __init__(self, logger: Any) -> None:
        import wandb

        self.logger = logger
        self._wandb = wandb

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.logger.log_image(tag, [image], step=step, caption=[caption])

    def text(self, tag: str, markdown: str, step: int) -> None:
        from lightning_viz.report import markdown_to_html

        try:
            html = self._wandb.Html(markdown_to_html(markdown), data_is_not_path=True)
        except TypeError:  # wandb before 0.19 has no `data_is_not_path`
            html = self._wandb.Html(markdown_to_html(markdown))
        # the tag's own key may already hold a scalar (`diagnosis/findings` counts them): the panel gets its own key
        self.logger.log_metrics({f"{tag}/html": html}, step=step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.logger.log_metrics({tag: self._wandb.Histogram(values, num_bins=HISTOGRAM_BINS)}, step=step)

    def embedding_table(self, tag, features, labels, predicted, step) -> None:  # noqa: ANN001
        # one numeric column per dimension: W&B's 2-D projection panel (PCA / UMAP / t-SNE) reads those columns,
        # and colours the points by `label`
        columns = ["label", "predicted", *[f"d{i}" for i in range(features.shape[1])]]
        data = [[labels[i], predicted[i], *row] for i, row in enumerate(features.astype(float).tolist())]
        self.logger.log_table(tag, columns=columns, data=data, step=step)

    def flush(self) -> None:
        pass


class MLflowBackend:
    """An ``MLFlowLogger``: artifacts under ``lightning_viz/step_<step>/<tag>.{png,md,json,tsv}`` of its run."""

    takes_images = takes_text = takes_histograms = takes_tables = True

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def _path(self, tag: str, step: int, suffix: str) -> str:
        return f"{ARTIFACT_ROOT}/step_{step:08d}/{safe_path(tag)}{suffix}"

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.logger.experiment.log_image(self.logger.run_id, image, artifact_file=self._path(tag, step, ".png"))

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, markdown, self._path(tag, step, ".md"))

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        summary = histogram_summary(values)
        self.logger.experiment.log_dict(self.logger.run_id, summary, self._path(tag, step, ".hist.json"))

    def embedding_table(self, tag, features, labels, predicted, step) -> None:  # noqa: ANN001
        text = embedding_tsv(features, labels, predicted)
        self.logger.experiment.log_text(self.logger.run_id, text, self._path(tag, step, ".tsv"))

    def flush(self) -> None:
        pass


class FolderBackend:
    """Plain files in ``root``: ``<kind>/<tag>/<step>.<ext>`` and one ``index.jsonl`` line per file written.

    The index keeps the exact tag (file names are sanitised); ``lightning-viz report`` reads it, and the scalars a
    :class:`~lightning_viz.FolderLogger` writes to ``scalars.jsonl`` beside it.
    """

    takes_images = takes_text = takes_histograms = takes_tables = True
    INDEX = "index.jsonl"

    def __init__(self, root: str) -> None:
        self.root = root

    def _write(self, kind: str, tag: str, step: int, ext: str, data: bytes, **extra: Any) -> str:
        rel = f"{kind}/{safe_path(tag)}/{step:08d}{ext}"
        path = os.path.join(self.root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        record = {"kind": kind, "tag": tag, "step": int(step), "file": rel, **extra}
        with open(os.path.join(self.root, self.INDEX), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        return path

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self._write("images", tag, step, ".png", png_bytes(image), caption=caption)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._write("text", tag, step, ".md", markdown.encode("utf-8"))

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self._write("histograms", tag, step, ".json", json.dumps(histogram_summary(values)).encode("utf-8"))

    def embedding_table(self, tag, features, labels, predicted, step) -> None:  # noqa: ANN001
        buffer = io.BytesIO()
        np.save(buffer, features.astype(np.float32), allow_pickle=False)
        rel_dir = f"embeddings/{safe_path(tag)}/{step:08d}"
        os.makedirs(os.path.join(self.root, *rel_dir.split("/")), exist_ok=True)
        metadata = "label\tpredicted\n" + "".join(
            f"{_tsv_cell(a)}\t{_tsv_cell(b)}\n" for a, b in zip(labels, predicted)
        )
        meta_path = os.path.join(self.root, *rel_dir.split("/"), "metadata.tsv")
        with open(meta_path, "w", encoding="utf-8") as f:
            f.write(metadata)
        self._write(
            "embeddings",
            tag,
            step,
            "/features.npy",
            buffer.getvalue(),
            metadata=f"{rel_dir}/metadata.tsv",
            shape=list(features.shape),
        )

    def flush(self) -> None:
        pass


def backend_for(logger: Any) -> _Backend | None:
    """The backend of one logger (on rank zero), or ``None`` when it takes scalars only."""
    kind = _backend_kind(logger)
    if kind == "tensorboard":
        return TensorBoardBackend(logger.experiment)
    if kind == "wandb":
        return WandbBackend(logger)
    if kind == "mlflow":
        return MLflowBackend(logger)
    if kind == "folder":
        return FolderBackend(logger.log_dir)
    return None


class Sink:
    """Writes one callback's output to every logger of a Trainer that can take it. Build it with :meth:`for_trainer`.

    Args:
        experiment: a TensorBoard ``SummaryWriter``, or ``None``.
        loggers: the Trainer's loggers; scalars go through each one's ``log_metrics``.
        is_global_zero: only global rank zero writes anything.
        backends: further backends (W&B, MLflow, folder), written after TensorBoard.
        max_image_side: images larger than this (pixels per side) are downsized before any backend sees them.
    """

    def __init__(
        self,
        experiment: Any | None,
        loggers: list[Any],
        is_global_zero: bool,
        backends: Sequence[_Backend] = (),
        max_image_side: int | None = None,
    ) -> None:
        self._experiment = experiment  # a SummaryWriter, or None when there is no TensorBoard logger
        self._loggers = loggers
        self._is_global_zero = is_global_zero
        self.max_image_side = max_image_side  #: images larger than this (pixels per side) are downsized
        self._backends: list[_Backend] = []
        self._records_only = False  # see `records_only`
        if experiment is not None and is_global_zero:
            self._backends.append(TensorBoardBackend(experiment))
        if is_global_zero:
            self._backends.extend(backends)

    @classmethod
    def for_trainer(cls, trainer: Any, max_image_side: int | None = None) -> Sink:
        loggers = list(trainer.loggers)
        if not trainer.is_global_zero:
            return cls(None, loggers, False, max_image_side=max_image_side)
        tensorboard = next((lg for lg in loggers if is_tensorboard_logger(lg)), None)
        experiment = tensorboard.experiment if tensorboard is not None else None
        present = {
            name
            for cb in getattr(trainer, "callbacks", [])
            if isinstance(name := getattr(cb, "monitor_name", None), str)
        }
        write_custom_scalars_layout(experiment, layout_for(present))  # once per run: the losses and key curves
        others = [backend_for(lg) for lg in loggers if _backend_kind(lg) not in (None, "tensorboard")]
        return cls(experiment, loggers, True, [b for b in others if b is not None], max_image_side=max_image_side)

    @property
    def backends(self) -> list[_Backend]:
        return list(self._backends)

    @property
    def writes_images(self) -> bool:
        return not self._records_only and any(b.takes_images for b in self._backends)

    @property
    def writes_text(self) -> bool:
        return not self._records_only and any(b.takes_text for b in self._backends)

    @property
    def writes_histograms(self) -> bool:
        return not self._records_only and any(b.takes_histograms for b in self._backends)

    @contextlib.contextmanager
    def records_only(self, on: bool = True) -> Iterator[None]:
        """Write scalars only inside (no images, text or histograms): a monitor whose call a budget cannot afford
        but whose records the final diagnosis needs measures and publishes, and draws nothing."""
        saved, self._records_only = self._records_only, on or self._records_only
        try:
            yield
        finally:
            self._records_only = saved

    @property
    def writes_tables(self) -> bool:
        return any(b.takes_tables for b in self._backends)

    @property
    def log_dir(self) -> str | None:
        """The TensorBoard run directory (where projector files belong), or ``None``."""
        return getattr(self._experiment, "log_dir", None) if self._experiment is not None else None

    def image(self, tag: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
        """Write an (H, W, 3) uint8 image; ``caption`` (W&B, folder) defaults to the tag and step."""
        if not self.writes_images:
            return
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be (H, W, 3) uint8, got {image.shape} {image.dtype} for tag {tag!r}.")
        if self.max_image_side is not None and max(image.shape[:2]) > self.max_image_side:
            image = downsize(image, self.max_image_side)
        caption = caption if caption is not None else f"{tag} (step {step})"
        for backend in self._backends:
            if backend.takes_images:
                backend.image(tag, image, step, caption)

    def text(self, tag: str, markdown: str, step: int) -> None:
        for backend in self._backends if not self._records_only else ():
            if backend.takes_text:
                backend.text(tag, markdown, step)

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray, step: int) -> None:
        """Write the finite entries of ``values`` (any shape) as one histogram."""
        if not self.writes_histograms:
            return
        flat = torch.as_tensor(values).detach().float().cpu().flatten()
        flat = flat[torch.isfinite(flat)].numpy()
        if not flat.size:
            return
        for backend in self._backends:
            if backend.takes_histograms:
                backend.histogram(tag, flat, step)

    def embedding_table(
        self,
        tag: str,
        features: np.ndarray | torch.Tensor,
        labels: Sequence[Any] | np.ndarray | torch.Tensor | None,
        predicted: Sequence[Any] | np.ndarray | torch.Tensor | None,
        step: int,
    ) -> None:
        """Write codes as a table: one row per sample, its true and predicted label, one column per dimension.

        Shape:
            features: (N, D) float; labels, predicted: N entries (class names or indices) or ``None``.
        """
        if not self.writes_tables:
            return
        features = torch.as_tensor(features).detach().float().cpu().numpy()
        if features.ndim != 2:
            raise ValueError(f"`features` must be (N, D), got shape {tuple(features.shape)} for tag {tag!r}.")
        n = features.shape[0]
        label_names = _names(labels, n, "labels")
        predicted_names = _names(predicted, n, "predicted")
        for backend in self._backends:
            if backend.takes_tables:
                backend.embedding_table(tag, features, label_names, predicted_names, step)

    def projector(
        self,
        features: torch.Tensor | np.ndarray,
        labels: list[str] | None,
        predicted: list[str] | None,
        thumbnails: torch.Tensor | None,
        step: int,
        tag: str = "embedding",
    ) -> str | None:
        """Write one step of TensorBoard projector data: metadata (true, predicted label), sprite, merged config.

        The tensor file itself is left to the caller (formatting text is slow; a child process can write it).

        Shape:
            features: (N, D); labels, predicted: N names each (None: "?"); thumbnails: (N, 3, s, s) in [0, 1] or None.

        Returns:
            the path the tensor file (``tensors.tsv``) is to be written to, or None without a TensorBoard log dir.
        """
        log_dir = self.log_dir
        if log_dir is None:
            return None
        return write_projector_step(log_dir, len(features), labels, predicted, thumbnails, step, tag)

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Send scalars through every logger of the Trainer (TensorBoard, W&B, MLflow, CSV, ...) on rank zero."""
        if not self._is_global_zero or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for logger in self._loggers:
            if not is_dummy_logger(logger):
                logger.log_metrics(clean, step=step)

    def flush(self) -> None:
        for backend in self._backends:
            backend.flush()


# ---- TensorBoard projector files ----


def write_projector_step(
    log_dir: str,
    count: int,
    labels: list[str] | None,
    predicted: list[str] | None,
    thumbnails: torch.Tensor | None,
    step: int,
    tag: str = "embedding",
) -> str:
    """Metadata and sprite of one projector embedding under ``log_dir/tag/STEP``, listed in ``projector_config.pbtxt``.

    The config is merged with what is on disk (and replaced atomically), so it lists every step also after a resumed
    run or a second writer process (``SummaryWriter.add_embedding`` rewrites it with only its own process's steps).
    Returns the path of the embedding's tensor file, which the caller writes.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    from lightning_viz.render import sprite

    subdir = os.path.join(tag, f"{step:08d}")
    path = os.path.join(log_dir, subdir)
    os.makedirs(path, exist_ok=True)
    rows = ["label\tpredicted"]
    for i in range(count):
        rows.append(f"{labels[i] if labels is not None else '?'}\t{predicted[i] if predicted is not None else '?'}")
    with open(os.path.join(path, "metadata.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    sprite_path = _shared_sprite(log_dir, tag, sprite(thumbnails)) if thumbnails is not None else None
    config_path = os.path.join(log_dir, "projector_config.pbtxt")
    config = ProjectorConfig()
    if os.path.exists(config_path):
        with open(config_path) as f:
            text_format.Merge(f.read(), config)
    kept = [e for e in config.embeddings if e.tensor_path != os.path.join(subdir, "tensors.tsv")]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    info = config.embeddings.add()
    info.tensor_path = os.path.join(subdir, "tensors.tsv")
    info.metadata_path = os.path.join(subdir, "metadata.tsv")
    if thumbnails is not None:
        info.sprite.image_path = sprite_path
        info.sprite.single_image_dim.extend([thumbnails.shape[-1], thumbnails.shape[-2]])
    name_projector_steps(config, tag)
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text_format.MessageToString(config))
    os.replace(tmp, config_path)
    return os.path.join(path, "tensors.tsv")


def _shared_sprite(log_dir: str, tag: str, sheet: np.ndarray) -> str:
    """The sprite sheet's path relative to ``log_dir``: one PNG per distinct sheet (``<tag>/sprite_<digest>.png``),
    encoded once and shared by every step that shows the same thumbnails (the embedding keeps its subset)."""
    import hashlib

    from PIL import Image

    digest = hashlib.blake2b(sheet.tobytes(), digest_size=8)
    digest.update(repr(sheet.shape).encode())
    relative = os.path.join(tag, f"sprite_{digest.hexdigest()}.png")
    path = os.path.join(log_dir, relative)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        Image.fromarray(sheet).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    return relative


def _projector_step(tag: str, tensor_path: str) -> int | None:
    parts = tensor_path.replace(os.sep, "/").split("/")
    if len(parts) == 3 and parts[0] == tag and parts[1].isdigit():
        return int(parts[1])
    return None


def name_projector_steps(config: Any, tag: str) -> None:
    """Name ``tag``'s embeddings so the projector opens on the latest: it lists embeddings with metadata sorted by
    name and opens the first, so the newest step is ``"<tag>: latest (step N)"`` and the others
    ``"<tag>: step 00000N"`` ("l" sorts before "s"). Entries of other tags are left as they are."""
    steps = [_projector_step(tag, e.tensor_path) for e in config.embeddings]
    known = [s for s in steps if s is not None]
    if not known:
        return
    newest = max(known)
    for embedding, step in zip(config.embeddings, steps):
        if step is not None:
            embedding.tensor_name = f"{tag}: latest (step {step})" if step == newest else f"{tag}: step {step:08d}"


# ---- TensorBoard custom-scalars layout ----

#: The first part of every tag our monitors write: the report's list (one list; the report imports no torch).
OUR_TAG_AREAS = OUR_AREAS
#: TensorBoard's Custom Scalars page: the losses, the diagnosis and each monitor's key curve on one page. Each chart
#: lists regular expressions (TensorBoard matches them from the start of a tag) and draws every matching scalar.
CUSTOM_SCALARS_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "lightning_viz: training": {
        # yours only: the losses our monitors log (dynamics/bn_probe/eval_loss, diagnosis/train_loss ...) stay out
        "loss": ["Multiline", ["train_loss", "val_loss", f"(?!({'|'.join(sorted(OUR_TAG_AREAS))})/).*loss.*"]],
        "accuracy": ["Multiline", ["train_acc", "val_acc", "(train|val|valid|validation)[_/].*acc.*"]],
    },
    "lightning_viz: diagnosis": {
        # the counts and 0/1 flags only: the diagnosis's loss and weight-norm curves have other scales
        "findings (count; 1 = present)": [
            "Multiline",
            [
                "diagnosis/(findings|divergence|dead_filters|dead_units|not_learning|overfitting|undertraining)$",
                "diagnosis/(exploding|vanishing)_gradients$",
                "diagnosis/(attention|rank)_collapse$",
                "diagnosis/(unchanged_weights|batchnorm_mismatch|saturated_activations|initial_loss|oscillating_loss)$",
            ],
        ],
        "training loss and weight norm, as the diagnosis reads them": [
            "Multiline",
            ["diagnosis/(train_loss|weight_norm)$"],
        ],
    },
    "lightning_viz: monitors": {
        "filter noise score (lower is smoother)": ["Multiline", ["filters/noise_score/.*"]],
        "dead fraction per layer (share 0-1)": ["Multiline", ["activations/dead_fraction/.*"]],
        "k-NN accuracy of the embedding (share 0-1)": ["Multiline", ["embedding/knn_accuracy"]],
        "seconds per monitor call": ["Multiline", ["lightning_viz/seconds/.*"]],
    },
}
#: Which monitor writes the tags of a chart (by ``monitor_name``); a chart whose monitor is not among the Trainer's
#: callbacks is left out of the layout (no empty chart). Charts not named here are always shown.
CHART_MONITORS: dict[str, str] = {
    "lightning_viz: diagnosis": "diagnosis",
    "filter noise score (lower is smoother)": "filters",
    "dead fraction per layer (share 0-1)": "activations",
    "k-NN accuracy of the embedding (share 0-1)": "embedding",
}


def layout_for(monitors: set[str]) -> dict[str, dict[str, list[Any]]]:
    """:data:`CUSTOM_SCALARS_LAYOUT` with only the charts whose tags the ``monitors`` (their names) write."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for group, charts in CUSTOM_SCALARS_LAYOUT.items():
        if CHART_MONITORS.get(group, "") not in {"", *monitors}:
            continue
        kept = {title: chart for title, chart in charts.items() if CHART_MONITORS.get(title, "") in {"", *monitors}}
        if kept:
            layout[group] = kept
    return layout


#: The tag under which TensorBoard's custom-scalars plugin finds its layout.
CUSTOM_SCALARS_TAG = "custom_scalars__config__"

_writers_with_layout: weakref.WeakSet[Any] = weakref.WeakSet()


def write_custom_scalars_layout(writer: Any, layout: Mapping[str, Mapping[str, list[Any]]] | None = None) -> bool:
    """Give a TensorBoard ``SummaryWriter`` our custom-scalars layout, once per writer (that is, once per run).

    Call it on global rank zero (e.g. from a monitor's ``setup`` when a TensorBoard logger exists); later calls for the
    same writer do nothing. Returns whether it wrote the layout.
    """
    if writer is None or not hasattr(writer, "add_custom_scalars"):
        return False
    try:
        if writer in _writers_with_layout:
            return False
        _writers_with_layout.add(writer)
    except TypeError:  # a writer that cannot be weakly referenced: write it each time (the last layout wins)
        pass
    writer.add_custom_scalars({k: dict(v) for k, v in (layout or CUSTOM_SCALARS_LAYOUT).items()})
    return True
