"""Convolution filters: per-filter statistics. Pure tensor functions (:mod:`lightning_viz.render` draws them).

The noise score
---------------
A filter's *high-frequency share* is the share of its spectral energy (2-D DFT of each ``kh x kw`` slice, summed over
input channels) at spatial frequencies above half the Nyquist frequency (radius > 0.25 cycles/pixel). White noise
spreads its energy evenly over all frequency bins, so its expected share is the fraction of bins above that radius
(8/9 for 3x3 kernels, 20/25 for 5x5). The *noise score* divides the share by that white-noise value: about 1.0 means
"as rough as random noise", values well below 1 mean smooth, structured filters (edges, blobs, colour opponents).
It is comparable across kernel sizes. A 1x1 kernel has no spatial frequencies; its score is NaN.
"""

from __future__ import annotations

import torch

_HIGH_FREQUENCY_RADIUS = 0.25


def _high_frequency_mask(kh: int, kw: int, device: torch.device) -> torch.Tensor:
    fy = torch.fft.fftfreq(kh, device=device).view(-1, 1)
    fx = torch.fft.fftfreq(kw, device=device).view(1, -1)
    return (fy**2 + fx**2).sqrt() > _HIGH_FREQUENCY_RADIUS


def high_frequency_share(weight: torch.Tensor) -> torch.Tensor:
    """Share of each filter's spectral energy above half the Nyquist frequency.

    Args:
        weight: convolution weights.

    Returns:
        One value per output filter in [0, 1]; NaN for an all-zero filter or a 1x1 kernel.

    Shape:
        weight: (C_out, C_in, kh, kw); returns (C_out,).
    """
    if weight.ndim != 4:
        raise ValueError(f"`weight` must have shape (C_out, C_in, kh, kw), got {tuple(weight.shape)}.")
    w = weight.detach().double()
    kh, kw = w.shape[-2:]
    mask = _high_frequency_mask(kh, kw, w.device)
    if not mask.any():
        return torch.full((w.shape[0],), float("nan"), dtype=torch.float32, device=w.device)
    energy = torch.fft.fft2(w).abs().pow(2).sum(dim=1)  # (C_out, kh, kw)
    total = energy.sum(dim=(-2, -1))
    high = (energy * mask).sum(dim=(-2, -1))
    share = high / total
    share[total == 0] = float("nan")
    return share.float()


def white_noise_high_frequency_share(kh: int, kw: int) -> float:
    """Expected :func:`high_frequency_share` of i.i.d. noise weights (the share of frequency bins above the cut)."""
    mask = _high_frequency_mask(kh, kw, torch.device("cpu"))
    return float(mask.float().mean())


def noise_score(weight: torch.Tensor) -> torch.Tensor:
    """High-frequency share relative to white noise: ~1 = noise-like, well below 1 = smooth. Shape (C_out,)."""
    reference = white_noise_high_frequency_share(*weight.shape[-2:])
    if reference == 0:
        return torch.full((weight.shape[0],), float("nan"))
    return high_frequency_share(weight) / reference


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter. Shape: (C_out, ...) -> (C_out,)."""
    return weight.detach().float().flatten(1).norm(dim=1)


def relative_distance(weight: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Per filter ``||W - W0|| / ||W0||``: 0 = has not moved since the initial weights. Shape (C_out,)."""
    if weight.shape != initial.shape:
        raise ValueError(f"`weight` {tuple(weight.shape)} and `initial` {tuple(initial.shape)} differ in shape.")
    w = weight.detach().float().flatten(1)
    w0 = initial.detach().float().to(w.device).flatten(1)
    return (w - w0).norm(dim=1) / w0.norm(dim=1).clamp_min(1e-12)


def filter_statistics(weight: torch.Tensor, initial: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-filter ``weight_norm``, ``noise_score`` and (with ``initial``) ``distance_from_init``, each (C_out,)."""
    stats = {"weight_norm": filter_norms(weight), "noise_score": noise_score(weight)}
    if initial is not None:
        stats["distance_from_init"] = relative_distance(weight, initial)
    return stats


def finite_abs_max(weight: torch.Tensor) -> float:
    """The largest finite ``|w|`` (0.0 when there is none): what a running symmetric colour scale grows to."""
    finite = weight[torch.isfinite(weight)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def nonfinite_filters(weight: torch.Tensor) -> int:
    """Number of output filters with at least one NaN/Inf weight. Shape: (C_out, ...)."""
    return int((~torch.isfinite(weight)).flatten(1).any(dim=1).sum())


def finite_means(values: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Mean of the finite values of each entry (``None`` where there is none), e.g. of :func:`filter_statistics`."""
    means: dict[str, float | None] = {}
    for key, value in values.items():
        finite = value[torch.isfinite(value)]
        means[key] = float(finite.mean()) if finite.numel() else None
    return means
