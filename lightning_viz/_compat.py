"""Resolve the Lightning namespaces a Trainer may come from.

Lightning ships the same classes twice: as ``lightning.pytorch`` (the ``lightning`` package) and as
``pytorch_lightning``. A user's Trainer comes from one of them; our callbacks must be recognised by both, and we must
recognise both namespaces' loggers. Our callback base therefore inherits from every ``Callback`` class that is
installed, so ``isinstance(callback, Callback)`` holds in either namespace.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _import_all(attr_path: str) -> tuple[type, ...]:
    found: list[type] = []
    module_name, _, attr = attr_path.rpartition(".")
    for ns in _NAMESPACES:
        try:
            module = importlib.import_module(f"{ns}.{module_name}" if module_name else ns)
        except ImportError:
            continue
        obj = getattr(module, attr, None)
        if obj is not None and obj not in found:
            found.append(obj)
    return tuple(found)


CALLBACK_CLASSES: tuple[type, ...] = _import_all("Callback")
TENSORBOARD_LOGGERS: tuple[type, ...] = _import_all("loggers.TensorBoardLogger")
DUMMY_LOGGERS: tuple[type, ...] = _import_all("loggers.logger.DummyLogger")
WANDB_LOGGERS: tuple[type, ...] = _import_all("loggers.WandbLogger")
MLFLOW_LOGGERS: tuple[type, ...] = _import_all("loggers.MLFlowLogger")
LOGGER_CLASSES: tuple[type, ...] = _import_all("loggers.Logger")

if not CALLBACK_CLASSES:  # pragma: no cover - install_requires guarantees one
    raise ImportError("lightning_viz needs `pytorch_lightning` or `lightning` to be installed.")


def global_rank() -> int:
    """The process's global rank, read the way Lightning's ``rank_zero`` utilities read it (before a Trainer exists)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                continue
    return 0


def rank_zero_warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """Warn on global rank zero only, so a DDP run shows a message once, not once per process."""
    if global_rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel)


def is_tensorboard_logger(logger: Any) -> bool:
    return isinstance(logger, TENSORBOARD_LOGGERS)


def is_dummy_logger(logger: Any) -> bool:
    return isinstance(logger, DUMMY_LOGGERS)


def is_wandb_logger(logger: Any) -> bool:
    return isinstance(logger, WANDB_LOGGERS)


def is_mlflow_logger(logger: Any) -> bool:
    return isinstance(logger, MLFLOW_LOGGERS)


def is_folder_logger(logger: Any) -> bool:
    from lightning_viz.loggers import FolderLogger  # imports this module: resolved at call time

    return isinstance(logger, FolderLogger)


def rank_zero_only_rank() -> int:
    """The global rank Lightning's strategies record for ``rank_zero_only`` (shared by both namespaces)."""
    try:
        from lightning_utilities.core.rank_zero import rank_zero_only
    except ImportError:  # pragma: no cover - a dependency of both namespaces
        return global_rank()
    rank = getattr(rank_zero_only, "rank", None)
    return global_rank() if rank is None else int(rank)


LIGHTNING_MODULES: tuple[type, ...] = _import_all("LightningModule")


def is_overridden(method_name: str, instance: Any) -> bool:
    """Whether ``instance``'s class overrides a ``LightningModule`` method (e.g. ``validation_step``)."""
    for base in LIGHTNING_MODULES:
        if isinstance(instance, base):
            return getattr(type(instance), method_name, None) is not getattr(base, method_name, None)
    return hasattr(instance, method_name)
