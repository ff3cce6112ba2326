"""One Lightning callback per file; each is thin: schedule, gather inputs, call ``functional``, render, write.

Each monitor's module loads on first use (PEP 562), so importing one monitor does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_viz import _lazy_attributes

if TYPE_CHECKING:
    from lightning_viz.callbacks.activation_monitor import ActivationMonitor
    from lightning_viz.callbacks.attention_monitor import AttentionMonitor
    from lightning_viz.callbacks.base import VizCallback
    from lightning_viz.callbacks.diagnosis_monitor import DiagnosisMonitor
    from lightning_viz.callbacks.dynamics_monitor import DynamicsMonitor
    from lightning_viz.callbacks.embedding_monitor import EmbeddingMonitor
    from lightning_viz.callbacks.exemplar_monitor import ExemplarMonitor
    from lightning_viz.callbacks.featurevis_monitor import FeatureVisMonitor
    from lightning_viz.callbacks.filter_monitor import FilterMonitor
    from lightning_viz.callbacks.saliency_monitor import SaliencyMonitor

#: Public name -> the module under `lightning_viz.callbacks` that defines it.
_MODULES = {
    "ActivationMonitor": "activation_monitor",
    "AttentionMonitor": "attention_monitor",
    "DiagnosisMonitor": "diagnosis_monitor",
    "DynamicsMonitor": "dynamics_monitor",
    "EmbeddingMonitor": "embedding_monitor",
    "ExemplarMonitor": "exemplar_monitor",
    "FeatureVisMonitor": "featurevis_monitor",
    "FilterMonitor": "filter_monitor",
    "SaliencyMonitor": "saliency_monitor",
    "VizCallback": "base",
}

__all__ = [
    "ActivationMonitor",
    "AttentionMonitor",
    "DiagnosisMonitor",
    "DynamicsMonitor",
    "EmbeddingMonitor",
    "ExemplarMonitor",
    "FeatureVisMonitor",
    "FilterMonitor",
    "SaliencyMonitor",
    "VizCallback",
]


__getattr__, __dir__ = _lazy_attributes(__name__, _MODULES)
