"""Where our images, text, histograms and scalars go.

Images, text, histograms and embeddings go to the first ``TensorBoardLogger`` in ``trainer.loggers`` (either Lightning
namespace). Scalars go through every logger the Trainer has, so a CSV logger beside TensorBoard records them too.
Everything is written on global rank zero only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lightning_viz._compat import is_dummy_logger, is_tensorboard_logger
from lightning_viz.render import downsize

NO_LOGGER_MESSAGE = (
    "lightning_viz callbacks write to TensorBoard, but the Trainer has no logger. Pass one, e.g. "
    "`Trainer(logger=TensorBoardLogger('runs'))` (from `lightning.pytorch.loggers` or `pytorch_lightning.loggers`), "
    "or leave `logger` at its default."
)


class Sink:
    """Writes one callback's output for a Trainer. Build it with :meth:`for_trainer`."""

    def __init__(
        self, experiment: Any | None, loggers: list[Any], is_global_zero: bool, max_image_side: int | None = None
    ) -> None:
        self._experiment = experiment  # a SummaryWriter, or None when there is no TensorBoard logger
        self._loggers = loggers
        self._is_global_zero = is_global_zero
        self.max_image_side = max_image_side  #: images larger than this (pixels per side) are downsized

    @classmethod
    def for_trainer(cls, trainer: Any, max_image_side: int | None = None) -> Sink:
        loggers = list(trainer.loggers)
        tensorboard = next((lg for lg in loggers if is_tensorboard_logger(lg)), None)
        experiment = tensorboard.experiment if (tensorboard is not None and trainer.is_global_zero) else None
        return cls(experiment, loggers, trainer.is_global_zero, max_image_side)

    @property
    def writes_images(self) -> bool:
        return self._experiment is not None

    @property
    def log_dir(self) -> str | None:
        return getattr(self._experiment, "log_dir", None) if self._experiment is not None else None

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Write an (H, W, 3) uint8 image."""
        if self._experiment is None:
            return
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be (H, W, 3) uint8, got {image.shape} {image.dtype} for tag {tag!r}.")
        if self.max_image_side is not None and max(image.shape[:2]) > self.max_image_side:
            image = downsize(image, self.max_image_side)
        self._experiment.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self._experiment is not None:
            self._experiment.add_text(tag, markdown, global_step=step)

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray, step: int) -> None:
        if self._experiment is None:
            return
        values = torch.as_tensor(values).detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self._experiment.add_histogram(tag, values, global_step=step)

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
        """Send scalars through every logger of the Trainer (TensorBoard, CSV, ...) on rank zero."""
        if not self._is_global_zero or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for logger in self._loggers:
            if not is_dummy_logger(logger):
                logger.log_metrics(clean, step=step)

    def flush(self) -> None:
        if self._experiment is not None:
            self._experiment.flush()


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
    import os  # imported here: this section is appended while sinks.py's header changes on another branch

    from google.protobuf import text_format
    from PIL import Image
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
    if thumbnails is not None:
        Image.fromarray(sprite(thumbnails)).save(os.path.join(path, "sprite.png"))
    config_path = os.path.join(log_dir, "projector_config.pbtxt")
    config = ProjectorConfig()
    if os.path.exists(config_path):
        with open(config_path) as f:
            text_format.Merge(f.read(), config)
    kept = [e for e in config.embeddings if e.tensor_path != os.path.join(subdir, "tensors.tsv")]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    info = config.embeddings.add()
    info.tensor_name = f"{tag}:{step:08d}"
    info.tensor_path = os.path.join(subdir, "tensors.tsv")
    info.metadata_path = os.path.join(subdir, "metadata.tsv")
    if thumbnails is not None:
        info.sprite.image_path = os.path.join(subdir, "sprite.png")
        info.sprite.single_image_dim.extend([thumbnails.shape[-1], thumbnails.shape[-2]])
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text_format.MessageToString(config))
    os.replace(tmp, config_path)
    return os.path.join(path, "tensors.tsv")
