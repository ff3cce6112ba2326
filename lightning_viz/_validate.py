"""One validator per kind of argument, so the same bad value fails the same way in every monitor.

The rule: a value of the wrong *type* raises ``TypeError``; a value of the right type outside what is allowed raises
``ValueError``. Every message names the argument in backticks, says what is allowed and shows the value received
(as Lightning's own callbacks do). The README's table "Arguments shared by every monitor" lists the vocabulary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` is an int >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return
    if not _is_int(value):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int (>= 1), got {value!r}.")


def non_negative_int(name: str, value: Any) -> None:
    """``value`` is an int >= 0."""
    if not _is_int(value):
        raise TypeError(f"`{name}` must be a non-negative int, got {value!r} of type {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"`{name}` must be a non-negative int (>= 0), got {value!r}.")


def at_least(name: str, value: Any, low: int) -> None:
    """``value`` is an int >= ``low``."""
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int >= {low}, got {value!r} of type {type(value).__name__}.")
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")


def number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> None:
    """``value`` is a finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    bracket = "(" if low_open else "["
    if not _is_number(value):
        raise TypeError(f"`{name}` must be a number in {bracket}{low}, {high}], got {value!r}.")
    below = value <= low if low_open else value < low
    if math.isnan(value) or below or value > high:
        raise ValueError(f"`{name}` must be in {bracket}{low}, {high}], got {value!r}.")


def fraction(name: str, value: Any, *, high: float = 1.0) -> None:
    """``value`` is a number in ``(0, high]`` (a share, a threshold)."""
    number(name, value, low=0.0, high=high, low_open=True)


def choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices`` (the members of the argument's ``Literal`` type)."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {list(choices)}, got {value!r} of type {type(value).__name__}.")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def choices(name: str, value: Any, allowed: Sequence[str]) -> list[str]:
    """``value`` is a non-empty list of members of ``allowed``; returns them in ``allowed``'s order."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{name}` must be a list of names from {list(allowed)}, got {value!r}.")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ValueError(f"`{name}`: unknown name(s) {unknown}; available: {list(allowed)}.")
    if not value:
        raise ValueError(f"`{name}` is empty; choose from {list(allowed)}.")
    return [a for a in allowed if a in value]


def boolean(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` is ``True`` or ``False`` (or ``None`` where allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "None, True or False" if allow_none else "True or False"
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}.")


def integer(name: str, value: Any) -> None:
    """``value`` is an int (e.g. a seed)."""
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")


def layer_name(name: str, value: Any, *, allow_none: bool = True) -> None:
    """``value`` is one layer name (``str``), or ``None`` for the monitor's default."""
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a layer name (str) or None, got {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must be a non-empty layer name, got {value!r}.")


def layer_names(name: str, value: Any) -> None:
    """``value`` is ``None`` (the monitor's default) or a non-empty list of layer names."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"`{name}` must be a list of layer names (str) or None, got {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must name at least one layer (or be None for the default), got {list(value)}.")


def indices(name: str, value: Any) -> None:
    """``value`` is ``None`` or a non-empty list of non-negative ints (channel or class indices)."""
    if value is None:
        return
    if isinstance(value, (str, int)) or not isinstance(value, Sequence) or not all(_is_int(c) for c in value):
        raise TypeError(f"`{name}` must be a list of indices (int), got {value!r}.")
    if not value or min(value) < 0:
        raise ValueError(f"`{name}` must be non-empty non-negative indices, got {list(value)}.")


def probe_set(name: str, value: Any) -> None:
    """``value`` is ``None`` or a :class:`~lightning_viz.ProbeSet`."""
    from lightning_viz.probes import ProbeSet

    if value is not None and not isinstance(value, ProbeSet):
        raise TypeError(f"`{name}` must be a lightning_viz.ProbeSet or None, got {type(value).__name__}.")


def class_names(name: str, value: Any) -> list[str] | None:
    """``value`` is ``None`` or a list of class names; returns a copy."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"`{name}` must be a list of class names (str) or None, got {value!r}.")
    return list(value)


def metric_name(name: str, value: Any) -> None:
    """``value`` is the non-empty name of a logged metric."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be the name of a logged metric (str), got {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must be a non-empty metric name, got {value!r}.")


def renamed(owner: str, kwargs: dict[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """Pop deprecated argument names from ``kwargs``, warning once per use (``FutureWarning``).

    Returns ``{new name: value}`` for the old names that were passed. Old names stay accepted for one release::

        moved = renamed("ExemplarMonitor", kwargs, {"k": "top_k"})
        top_k = moved.get("top_k", top_k)
    """
    moved: dict[str, Any] = {}
    for old, new in renames.items():
        if old not in kwargs:
            continue
        warnings.warn(
            f"{owner}: `{old}` was renamed to `{new}`; the old name will be removed in the next release.",
            FutureWarning,
            stacklevel=3,
        )
        moved[new] = kwargs.pop(old)
    return moved


def positive_ints(**values: Any) -> None:
    """Each keyword's value is an int >= 1 (see :func:`positive_int`)."""
    for name, value in values.items():
        positive_int(name, value)


def callable_or_none(name: str, value: Any) -> None:
    """``value`` is a callable (a function, a method, an object with ``__call__``) or ``None``."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable or None, got {type(value).__name__} {value!r}.")
