"""Convolution filters: per-filter statistics and filter-grid images. Pure tensor functions.

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

from lightning_viz import render

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


@torch.no_grad()
def filter_tiles(weight: torch.Tensor, scale: float, *, max_filters: int = 64, max_channels: int = 8) -> torch.Tensor:
    """Render filters as tiles on a fixed symmetric scale: 0 is mid-grey, ``±scale`` black/white (or full colour).

    With 3 input channels each filter is one RGB tile; with 1 a grayscale tile; with more, each of the first
    ``max_channels`` input-channel slices is its own grayscale tile, one row of slices per filter. Non-finite
    weights are painted magenta.

    Shape:
        weight: (C_out, C_in, kh, kw). Returns (N, 3, kh, kw) in [0, 1], N = min(C_out, max_filters) for C_in <= 3,
        else min(C_out, max_filters) * min(C_in, max_channels), filter-major.
    """
    if weight.ndim != 4:
        raise ValueError(f"`weight` must have shape (C_out, C_in, kh, kw), got {tuple(weight.shape)}.")
    w = weight.detach().float().cpu()[:max_filters]
    c_in = w.shape[1]
    if c_in == 3:
        tiles = render.symmetric_unit(w, scale)
        return render.mark_non_finite(tiles, w)
    if c_in != 1:
        w = w[:, :max_channels].reshape(-1, 1, *w.shape[-2:])
    tiles = render.symmetric_unit(w, scale).expand(-1, 3, -1, -1)
    return render.mark_non_finite(tiles, w)


def filter_grid(
    weight: torch.Tensor,
    scale: float,
    *,
    max_filters: int = 64,
    max_channels: int = 8,
    min_tile_pixels: int = 32,
    ncol: int | None = None,
):
    """A grid image of :func:`filter_tiles`, nearest-upsampled so a 3x3 kernel is visible.

    Returns:
        (H, W, 3) uint8 numpy array. For C_in <= 3 the grid has ``ncol`` (default 8) filters per row; otherwise one
        row per filter, one column per input channel.
    """
    tiles = filter_tiles(weight, scale, max_filters=max_filters, max_channels=max_channels)
    c_in = weight.shape[1]
    if ncol is None:
        ncol = 8 if c_in in (1, 3) else min(c_in, max_channels)
    factor = render.upscale_factor(max(weight.shape[-2:]), min_tile_pixels)
    return render.tile_grid(tiles, ncol, upscale=factor)
