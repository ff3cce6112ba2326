"""One Lightning callback per file; each is thin: schedule, gather inputs, call ``functional``, render, write."""

from lightning_viz.callbacks.activation_monitor import ActivationMonitor
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.callbacks.diagnosis_monitor import DiagnosisMonitor
from lightning_viz.callbacks.embedding_monitor import EmbeddingMonitor
from lightning_viz.callbacks.exemplar_monitor import ExemplarMonitor
from lightning_viz.callbacks.featurevis_monitor import FeatureVisMonitor
from lightning_viz.callbacks.filter_monitor import FilterMonitor
from lightning_viz.callbacks.saliency_monitor import SaliencyMonitor

__all__ = [
    "ActivationMonitor",
    "DiagnosisMonitor",
    "EmbeddingMonitor",
    "ExemplarMonitor",
    "FeatureVisMonitor",
    "FilterMonitor",
    "SaliencyMonitor",
    "VizCallback",
]
