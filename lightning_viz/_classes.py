"""Class names where a class is shown: ``class_name(3, names)`` gives ``"cat"`` instead of ``"3"``.

Names are found by looking, never by drawing a sample (rule 12): a torchvision-style ``dataset.classes``, a
datamodule's (or LightningModule's) ``classes`` / ``class_names`` attribute, following ``.dataset`` through data
loaders and ``Subset`` wrappers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_ATTRIBUTES = ("class_names", "classes")
_MAX_DEPTH = 4


def class_name(index: int, class_names: Sequence[str] | None) -> str:
    """The name of class ``index``, or the index itself as text when no (or no such) name is known."""
    index = int(index)
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _as_names(value: Any) -> list[str] | None:
    """A list of names from a ``classes`` attribute: a sequence of names, or a mapping index -> name."""
    if isinstance(value, Mapping):
        if value and all(isinstance(k, int) for k in value) and sorted(value) == list(range(len(value))):
            return [str(value[i]) for i in range(len(value))]
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        return None
    if not all(isinstance(v, str) for v in value):
        return None
    return list(value)


def class_names_of(obj: Any, _depth: int = 0) -> list[str] | None:
    """The class names an object carries (``class_names`` or ``classes``), also through its ``.dataset``."""
    if obj is None or _depth > _MAX_DEPTH:
        return None
    for attribute in _ATTRIBUTES:
        names = _as_names(getattr(obj, attribute, None))
        if names is not None:
            return names
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and 0 < len(obj) <= 8:  # several loaders
        for item in obj:
            names = class_names_of(item, _depth + 1)
            if names is not None:
                return names
    return class_names_of(getattr(obj, "dataset", None), _depth + 1)


def find_class_names(trainer: Any, pl_module: Any = None) -> list[str] | None:
    """Class names for a run: the datamodule's, the LightningModule's, then the train and validation datasets'.

    Reads attributes only (no sample is drawn); returns ``None`` when nothing names the classes.
    """
    candidates = [getattr(trainer, "datamodule", None), pl_module]
    for loader_attribute in ("train_dataloader", "val_dataloaders"):
        try:
            candidates.append(getattr(trainer, loader_attribute, None))
        except Exception:  # noqa: BLE001 - a Trainer property that cannot answer yet has no names for us
            continue
    for candidate in candidates:
        names = class_names_of(candidate)
        if names is not None:
            return names
    return None
