"""lightning_viz: PyTorch Lightning callbacks that make a CNN's training visible in TensorBoard."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning_viz.probes import ProbeSet

if TYPE_CHECKING:
    from lightning_viz.callbacks import (
        ActivationMonitor,
        AttentionMonitor,
        DiagnosisMonitor,
        DynamicsMonitor,
        EmbeddingMonitor,
        ExemplarMonitor,
        FeatureVisMonitor,
        FilterMonitor,
        SaliencyMonitor,
        VizCallback,
    )
    from lightning_viz.loggers import FolderLogger

__version__ = "0.1.0"

__all__ = [
    "ActivationMonitor",
    "AttentionMonitor",
    "DiagnosisMonitor",
    "DynamicsMonitor",
    "EmbeddingMonitor",
    "ExemplarMonitor",
    "FeatureVisMonitor",
    "FilterMonitor",
    "FolderLogger",
    "ProbeSet",
    "SaliencyMonitor",
    "VizCallback",
    "default_suite",
    "__version__",
]

# The callbacks load on first use (PEP 562): `import lightning_viz` and `lightning_viz.functional` stay free of
# Lightning, and each monitor module is imported only when asked for.
_CALLBACKS = frozenset(__all__) - {"ProbeSet", "FolderLogger", "default_suite", "__version__"}

# Monitors in the default suite, by the keyword that configures each in `default_suite(...)`.
_SUITE = {
    "filters": "FilterMonitor",
    "activations": "ActivationMonitor",
    "saliency": "SaliencyMonitor",
    "embedding": "EmbeddingMonitor",
    "exemplars": "ExemplarMonitor",
    "featurevis": "FeatureVisMonitor",
    "attention": "AttentionMonitor",  # steps aside silently on a model without attention
    "dynamics": "DynamicsMonitor",
    "diagnosis": "DiagnosisMonitor",
}
_SHARED_OPTIONS = ("on_error", "seed", "log_baseline", "max_overhead", "input_fn")
#: Default share of the run's training time the suite may spend: 5 %, baseline and end of fit included.
DEFAULT_BUDGET = 0.05


def default_suite(
    every_n_epochs: int | None = None, *, budget: float | None = DEFAULT_BUDGET, **options: Any
) -> list[VizCallback]:
    """Every monitor lightning_viz has, with sane defaults.

    Args:
        every_n_epochs: if given, overrides every monitor's own default cadence (kept exactly; no budget schedule).
        budget: the most the suite may cost, as a share of the run's training time (default 0.05: 5 %), baseline
            and end of fit included. The monitors share one measured budget: cheap ones log often, expensive ones
            rarely and scaled down, and each logs the trained network at the end of ``fit``. ``None``: each monitor
            keeps its own fixed cadence. A monitor given its own ``every_n_epochs`` keeps it exactly.
        **options: per-monitor options as a dict under the monitor's key (``filters={"max_filters": 32}``), or ``False``
            to leave that monitor out (``filters=False``); or options shared by all monitors: ``on_error``, ``seed``,
            ``log_baseline``, ``max_overhead``, ``input_fn`` (how a batch becomes the model's input).

    Returns:
        A list of callbacks for ``Trainer(callbacks=...)``.
    """
    shared = {k: options.pop(k) for k in _SHARED_OPTIONS if k in options}
    unknown = sorted(set(options) - set(_SUITE))
    if unknown:
        raise TypeError(
            f"default_suite() got unknown option(s) {unknown}; monitors: {sorted(_SUITE)}, "
            f"shared options: {list(_SHARED_OPTIONS)}."
        )
    suite: list[VizCallback] = []
    from lightning_viz import callbacks
    from lightning_viz._budget import Budget

    shared_budget = Budget(budget) if budget is not None and every_n_epochs is None else None

    for key, name in _SUITE.items():
        cls = getattr(callbacks, name)
        own = options.get(key, {})
        if own is False:
            continue
        if not isinstance(own, dict):
            raise TypeError(f"`{key}` must be a dict of {cls.__name__} options or False, got {own!r}.")
        kwargs = {**shared, **own}
        if every_n_epochs is not None:
            kwargs["every_n_epochs"] = every_n_epochs
        if shared_budget is not None:
            kwargs.setdefault("budget", shared_budget)
        suite.append(cls(**kwargs))
    return suite


def _lazy_attributes(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to the submodule that
    defines it (relative to ``package``), or to ``""`` when the name is a submodule itself. Each loads on first use."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if not exports[name]:
            return importlib.import_module(f"{package}.{name}")
        value = namespace[name] = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_attributes(__name__, {**dict.fromkeys(_CALLBACKS, "callbacks"), "FolderLogger": "loggers"})
