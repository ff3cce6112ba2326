"""Pure tensor functions, usable on a plain ``nn.Module`` without a Trainer or a logger.

Nothing here imports Lightning. Submodules load on first use (``lightning_viz.functional.gradient`` imports
``saliency``), so importing one of them costs only what it needs. The occlusion function itself is
``lightning_viz.functional.occlusion.occlusion``: the package attribute ``occlusion`` is its module.
"""

from __future__ import annotations

from lightning_viz import _lazy_attributes

_SUBMODULES = ("activations", "attention", "embedding", "exemplars", "featurevis", "filters", "occlusion", "saliency")

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "filter_norms": "filters",
    "filter_statistics": "filters",
    "noise_score": "filters",
    "ChannelStats": "activations",
    "attention_maps": "attention",
    "attention_modules": "attention",
    "attention_rollout": "attention",
    "attention_weights": "attention",
    "gradient_rollout": "attention",
    "knn_accuracy": "embedding",
    "nearest_neighbours": "embedding",
    "class_scores": "saliency",
    "deconvnet": "saliency",
    "FoldingError": "saliency",
    "head_outputs": "saliency",
    "resolve_head": "saliency",
    "fullgrad": "saliency",
    "grad_cam": "saliency",
    "gradient": "saliency",
    "guided_backprop": "saliency",
    "inference_copy": "saliency",
    "input_gradient": "saliency",
    "rows_to_explain": "saliency",
    "smoothgrad": "saliency",
    "target_scores": "saliency",
    "IncrementalMismatchWarning": "occlusion",
    "OcclusionResult": "occlusion",
    "occlusion_attribution": "occlusion",
    "upsample_grid": "occlusion",
    "StreamingTopK": "exemplars",
    "receptive_field_boxes": "exemplars",
    "unit_projection": "exemplars",
    "Objective": "featurevis",
    "Transforms": "featurevis",
    "visualize": "featurevis",
}

__all__ = sorted([*_SUBMODULES, *_EXPORTS])


__getattr__, __dir__ = _lazy_attributes(__name__, {**dict.fromkeys(_SUBMODULES, ""), **_EXPORTS})
