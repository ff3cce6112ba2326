"""``FolderLogger``: a Lightning logger that writes plain files, for runs with no logger service.

Pass it as ``Trainer(logger=FolderLogger("runs"))`` (it is a ``Logger`` of both Lightning namespaces). Each run gets
``runs/<name>/version_<n>/`` holding

- ``scalars.jsonl``: one JSON object per ``log_metrics`` call, ``{"step": 12, "metrics": {"train_loss": 0.3}}``
  (NaN/Inf are written as ``null``);
- ``hparams.json``: the hyper-parameters, values that JSON cannot hold written as their ``repr``;
- what lightning_viz's monitors write (see :class:`~lightning_viz.sinks.FolderBackend`): ``images/<tag>/<step>.png``,
  ``text/<tag>/<step>.md``, ``histograms/<tag>/<step>.json``, ``embeddings/<tag>/<step>/``, and ``index.jsonl``
  listing each file with its exact tag and step.

``lightning-viz report runs`` turns each such folder into one HTML page. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning_viz._compat import LOGGER_CLASSES, rank_zero_only_rank

SCALARS_FILE = "scalars.jsonl"
HPARAMS_FILE = "hparams.json"


def _number(value: Any) -> float | None:
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


class FolderLogger(*LOGGER_CLASSES):  # type: ignore[misc]
    """Writes scalars, hyper-parameters and lightning_viz's images/text/histograms as files in a folder.

    Args:
        save_dir: the root folder (created when the first thing is written).
        name: the experiment's sub-folder.
        version: ``None`` picks the next free ``version_<n>``; an int gives ``version_<int>``; a str is used as is.
        prefix: prepended to every metric name, joined with ``-`` (as Lightning's own loggers do).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str = "lightning_viz",
        version: int | str | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"`name` must be a folder name (a non-empty str without {os.sep!r}), got {name!r}.")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
            raise TypeError(f"`version` must be None, an int or a str, got {version!r}.")
        self._save_dir = os.fspath(save_dir)
        self._name = name
        self._version = version
        self._prefix = prefix

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = self._next_version()
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def log_dir(self) -> str:
        version = self.version
        return os.path.join(self.root_dir, version if isinstance(version, str) else f"version_{version}")

    @property
    def experiment(self) -> FolderLogger:
        return self

    def _next_version(self) -> int:
        if not os.path.isdir(self.root_dir):
            return 0
        found = []
        for entry in os.listdir(self.root_dir):
            if (
                entry.startswith("version_")
                and entry[8:].isdigit()
                and os.path.isdir(os.path.join(self.root_dir, entry))
            ):
                found.append(int(entry[8:]))
        return max(found) + 1 if found else 0

    def _append(self, filename: str, record: Mapping[str, Any]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, filename), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if rank_zero_only_rank() != 0 or not metrics:
            return
        join = f"{self._prefix}{self.LOGGER_JOIN_CHAR}" if self._prefix else ""
        values = {f"{join}{k}": _number(v) for k, v in metrics.items()}
        self._append(SCALARS_FILE, {"step": None if step is None else int(step), "metrics": values})

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None, *args: Any, **kwargs: Any) -> None:
        if rank_zero_only_rank() != 0 or params is None:
            return
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, HPARAMS_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({str(k): v for k, v in params.items()}, f, default=repr, indent=1, allow_nan=True)
        os.replace(path + ".tmp", path)

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass
