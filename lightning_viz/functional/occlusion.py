"""Batched occlusion sensitivity (Zeiler & Fergus): slide a baseline-valued square over the image, watch the output.

All occluded images of all positions (and all input images) are evaluated in batches that stay within
``max_batch_bytes`` of occluded input, not one forward pass per position. When the model's first layers are local
(convolutions, pooling, activations, residual additions), ``torch.fx`` can trace it and there are enough positions to
pay for the trace, only the patch that the window changes is recomputed in those layers
(:mod:`lightning_viz.functional._incremental`); the outputs equal full forward passes up to float rounding, and the
first batch is checked against full passes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_viz._hooks import capture
from lightning_viz.functional._incremental import IncrementalOcclusion, window_offsets
from lightning_viz.functional.saliency import class_scores, head_outputs


class IncrementalMismatchWarning(RuntimeWarning):
    """Recomputing only the occluded patch disagreed with full forward passes; full passes were used instead."""


def occlusion_grid(height: int, width: int, window: int, stride: int) -> tuple[list[int], list[int]]:
    """Top and left offsets of the occluding window: 0, stride, 2*stride, ... as Captum's ``Occlusion`` places them:
    when the windows do not tile the image, a last window starts before the border and is cut off by it, so every
    pixel is covered."""
    if window < 1 or stride < 1:
        raise ValueError(f"`window` and `stride` must be >= 1, got window={window}, stride={stride}.")
    if window > height or window > width:
        raise ValueError(f"occlusion `window`={window} is larger than the image ({height}x{width}).")
    return window_offsets(height, window, stride), window_offsets(width, window, stride)


@dataclass
class OcclusionResult:
    """Model outputs with the window at each position.

    Attributes:
        logits: (N, gh, gw, K) output with the window at each grid position.
        clean_logits: (N, K) output on the unoccluded images.
        tops, lefts: the window's offsets along each grid axis.
        window: the window's side.
        layer_total: (N, gh, gw) total activation of the chosen layer's strongest channel (on the clean image),
            or ``None`` when no layer was given.
    """

    logits: torch.Tensor
    clean_logits: torch.Tensor
    tops: list[int]
    lefts: list[int]
    window: int
    layer_total: torch.Tensor | None = None

    def probability(self, target: torch.Tensor, head: str = "auto") -> torch.Tensor:
        """Probability of each image's ``target`` class at each position, (N, gh, gw), as the classification
        ``head`` reads the logits (:func:`~lightning_viz.functional.saliency.head_outputs`; default: softmax, or
        sigmoid for a single logit)."""
        probs = head_outputs(self.logits, head)[0]
        index = target.to(probs.device).view(-1, 1, 1, 1).expand(-1, *probs.shape[1:3], 1)
        return probs.gather(-1, index).squeeze(-1)

    def rows(self, index: torch.Tensor) -> OcclusionResult:
        """The results of images ``index`` (e.g. one row per image and target class), in that order."""
        index = index.to(self.logits.device)
        total = self.layer_total[index] if self.layer_total is not None else None
        return OcclusionResult(self.logits[index], self.clean_logits[index], self.tops, self.lefts, self.window, total)

    def top_class(self, head: str = "auto") -> torch.Tensor:
        """The predicted class at each position, (N, gh, gw) (for a single logit: ``logit > 0``)."""
        return head_outputs(self.logits, head)[1]

    def upsampled(
        self, target: torch.Tensor, image_size: tuple[int, int], head: str = "auto"
    ) -> dict[str, torch.Tensor]:
        """:meth:`probability` of ``target``, :meth:`top_class` and ``layer_total`` (when measured), each painted
        to image size by :func:`upsample_grid`, on the CPU. Keys: ``probability``, ``top_class``, ``layer_total``.

        Shape:
            target: (N,). Returns maps of shape (N, H, W).
        """
        grids = {"probability": self.probability(target, head), "top_class": self.top_class(head)}
        if self.layer_total is not None:
            grids["layer_total"] = self.layer_total
        return {key: upsample_grid(grid, self, image_size).cpu() for key, grid in grids.items()}


#: Window positions (over all images) from which ``occlusion(incremental="auto")`` recomputes only the patch. Measured
#: on one CPU thread (mobilenet_v3_small at 64x64, resnet18 at 32x32 and 64x64): at 64 positions full passes took
#: 0.5-0.9x the incremental path's time (its fx trace and check dominate), at 225 0.8-1.35x, at 900 1.15-1.5x.
INCREMENTAL_MIN_POSITIONS = 256


@torch.no_grad()
def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    *,
    window: int = 8,
    stride: int = 4,
    baseline: float = 0.0,
    max_batch_bytes: int = 64 * 2**20,
    layer: nn.Module | None = None,
    incremental: bool | Literal["auto"] = "auto",
) -> OcclusionResult:
    """Evaluate ``model`` on every occluded copy of every image, in memory-bounded batches.

    Args:
        window: side of the square (all channels are occluded).
        stride: step between window positions.
        baseline: the value written into the window (0 is the mean colour for standardised inputs: grey).
        max_batch_bytes: at most this many bytes of occluded images per forward pass.
        layer: optionally, a module whose strongest channel's total activation is recorded at each position.
        incremental: recompute only the window's patch in the model's first local layers when the model allows it
            (not with ``layer``). Exact up to float rounding. ``"auto"`` (default) does so from
            :data:`INCREMENTAL_MIN_POSITIONS` window positions on (below, tracing the model and checking the patch
            against full passes costs more than it saves); ``True`` whenever possible; ``False`` never.

    Window positions follow Captum (:func:`occlusion_grid`): a last window cut off by the border when the windows do
    not tile the image. The model gets fresh copies of the images, so one that edits its input in place sees the
    clean image, and the windows are cut from the clean image.

    Shape:
        x: (N, C, H, W).
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must have shape (N, C, H, W), got {tuple(x.shape)}.")
    n, c, h, w = x.shape
    tops, lefts = occlusion_grid(h, w, window, stride)
    positions = [(t, lf) for t in tops for lf in lefts]
    per_image = x[0].numel() * x.element_size()
    chunk = max(1, max_batch_bytes // per_image)
    pairs_image = torch.arange(n).repeat_interleave(len(positions))
    pairs_top = torch.tensor([t for t, _ in positions]).repeat(n)
    pairs_left = torch.tensor([lf for _, lf in positions]).repeat(n)
    # plain tensors (a model's in-place ops may need them); leaving inference mode turns grad mode on, so off again
    with torch.inference_mode(False), torch.no_grad():
        x = x.detach().clone()

        def occluded(sl: slice) -> torch.Tensor:
            images = x[pairs_image[sl].to(x.device)].clone()
            for row, (t, lf) in enumerate(zip(pairs_top[sl].tolist(), pairs_left[sl].tolist())):
                images[row, :, t : t + window, lf : lf + window] = baseline
            return images

        worth = incremental is True or (incremental == "auto" and len(pairs_image) >= INCREMENTAL_MIN_POSITIONS)
        fast = IncrementalOcclusion.build(model, x[:1], window, stride) if worth and layer is None else None
        if fast is not None:
            clean = fast.prepare(x.clone()).detach()
            first = slice(0, min(4, len(pairs_image)))
            got = fast.forward(pairs_image[first], pairs_top[first], pairs_left[first], window, baseline)
            want = model(occluded(first))
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp_min(1.0))):
                warnings.warn(
                    "occlusion: recomputing only the occluded patch gave different outputs than full forward passes "
                    f"(max difference {float((got - want).abs().max()):.3g}); using full forward passes.",
                    IncrementalMismatchWarning,
                    stacklevel=2,
                )
                fast = None
        if fast is not None:
            outputs = []
            for start in range(0, len(pairs_image), chunk):
                sl = slice(start, start + chunk)
                outputs.append(fast.forward(pairs_image[sl], pairs_top[sl], pairs_left[sl], window, baseline).detach())
            logits = torch.cat(outputs).view(n, len(tops), len(lefts), -1)
            return OcclusionResult(logits, clean, tops, lefts, window, None)

        channel = None
        with capture([layer] if layer is not None else [], keep="last") as captured:
            clean = model(x.clone()).detach()
            if layer is not None:
                acts = captured[0][-1]
                channel = acts.flatten(2).sum(-1).argmax(dim=1)  # (N,) strongest channel per image
            outputs, totals = [], []
            for start in range(0, len(pairs_image), chunk):
                sl = slice(start, start + chunk)
                outputs.append(model(occluded(sl)).detach())
                if layer is not None:
                    acts = captured[0][-1]
                    idx = channel[pairs_image[sl].to(channel.device)]
                    totals.append(acts.flatten(2).sum(-1).gather(1, idx.view(-1, 1)).squeeze(1).detach())
    logits = torch.cat(outputs).view(n, len(tops), len(lefts), -1)
    layer_total = torch.cat(totals).view(n, len(tops), len(lefts)) if layer is not None else None
    return OcclusionResult(logits, clean, tops, lefts, window, layer_total)


def occlusion_attribution(result: OcclusionResult, target: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel attribution as Captum's ``Occlusion`` defines it: the drop of the target score when a window covering
    the pixel is occluded, averaged over every window position that covers it (0 where none does). The score is
    :func:`~lightning_viz.functional.saliency.class_scores`' (a single logit: ``±logit``).

    Shape:
        returns (N, H, W).
    """
    h, w = image_size
    n = result.logits.shape[0]
    drop = class_scores(result.clean_logits, target).view(n, 1, 1) - class_scores(result.logits, target)  # (N, gh, gw)
    total = torch.zeros(n, h, w, dtype=drop.dtype, device=drop.device)
    count = torch.zeros(h, w, dtype=drop.dtype, device=drop.device)
    k = result.window
    for gi, t in enumerate(result.tops):
        for gj, lf in enumerate(result.lefts):
            total[:, t : t + k, lf : lf + k] += drop[:, gi, gj].view(n, 1, 1)
            count[t : t + k, lf : lf + k] += 1
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def upsample_grid(grid: torch.Tensor, result: OcclusionResult, image_size: tuple[int, int]) -> torch.Tensor:
    """Paint each grid value over its window's centre area so the map lines up with the image. (N, gh, gw) -> (N, H, W).

    Each pixel takes the value of the window position whose centre is nearest (positions lie on a regular grid).
    """
    h, w = image_size
    k = result.window
    centres_y = torch.tensor([t + (k - 1) / 2 for t in result.tops])
    centres_x = torch.tensor([lf + (k - 1) / 2 for lf in result.lefts])
    iy = (torch.arange(h).view(-1, 1) - centres_y.view(1, -1)).abs().argmin(dim=1)
    ix = (torch.arange(w).view(-1, 1) - centres_x.view(1, -1)).abs().argmin(dim=1)
    return grid[:, iy][:, :, ix]


__all__ = [
    "IncrementalMismatchWarning",
    "OcclusionResult",
    "occlusion",
    "occlusion_attribution",
    "occlusion_grid",
    "upsample_grid",
]
