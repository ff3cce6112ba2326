"""Tensors to images: fixed normalisations, tile grids, colour maps, labelled filmstrips.

Every function here returns ``uint8`` arrays of shape (H, W, 3) or float tensors in [0, 1]: TensorBoard multiplies
float images by 255 without clipping, so nothing leaves this module outside that range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

#: Colour used for values that are NaN or Inf (magenta: it appears in no colour map we use).
NAN_COLOUR = (1.0, 0.0, 1.0)

# Control points of matplotlib's perceptually uniform maps (sampled at 9 points), so we need no matplotlib.
_COLORMAPS: dict[str, np.ndarray] = {
    "viridis": np.array(
        [
            [0.267, 0.005, 0.329],
            [0.283, 0.141, 0.458],
            [0.254, 0.265, 0.530],
            [0.207, 0.372, 0.553],
            [0.164, 0.471, 0.558],
            [0.128, 0.567, 0.551],
            [0.135, 0.659, 0.518],
            [0.267, 0.749, 0.441],
            [0.478, 0.821, 0.318],
            [0.741, 0.873, 0.150],
            [0.993, 0.906, 0.144],
        ]
    ),
    "inferno": np.array(
        [
            [0.001, 0.000, 0.014],
            [0.087, 0.045, 0.224],
            [0.258, 0.039, 0.406],
            [0.416, 0.090, 0.433],
            [0.578, 0.148, 0.404],
            [0.735, 0.216, 0.330],
            [0.865, 0.317, 0.226],
            [0.954, 0.469, 0.099],
            [0.988, 0.645, 0.040],
            [0.964, 0.843, 0.273],
            [0.988, 0.998, 0.645],
        ]
    ),
    # Diverging blue - white - red, for signed quantities centred on zero (0.5 is white).
    "coolwarm": np.array(
        [
            [0.230, 0.299, 0.754],
            [0.552, 0.690, 0.996],
            [0.866, 0.866, 0.866],
            [0.958, 0.604, 0.482],
            [0.706, 0.016, 0.150],
        ]
    ),
    "gray": np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
}


def colormap_names() -> list[str]:
    return sorted(_COLORMAPS)


def symmetric_unit(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Map ``[-scale, scale]`` linearly onto ``[0, 1]`` (zero to mid-grey), clipping beyond; NaN stays NaN.

    A fixed ``scale`` keeps images of different epochs comparable.
    """
    if not scale > 0:
        raise ValueError(f"`scale` must be a positive number, got {scale!r}.")
    return (x.float() / (2.0 * scale) + 0.5).clamp(0.0, 1.0)


def apply_colormap(values: torch.Tensor, name: str = "viridis") -> torch.Tensor:
    """Colour a map of values in [0, 1].

    Shape:
        values: (..., H, W), float in [0, 1] (NaN allowed); returns (..., 3, H, W) float in [0, 1], NaN in magenta.
    """
    if name not in _COLORMAPS:
        raise ValueError(f"Unknown colour map {name!r}; available: {colormap_names()}.")
    lut = torch.as_tensor(_COLORMAPS[name], dtype=torch.float32, device=values.device)
    v = values.float()
    bad = ~torch.isfinite(v)
    v = torch.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    pos = v * (len(lut) - 1)
    lo = pos.floor().long().clamp(max=len(lut) - 2)
    frac = (pos - lo.float()).unsqueeze(-1)
    rgb = lut[lo] * (1.0 - frac) + lut[lo + 1] * frac  # (..., H, W, 3)
    if bad.any():
        rgb[bad] = torch.tensor(NAN_COLOUR, device=values.device)
    return rgb.movedim(-1, -3)


def mark_non_finite(images: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Paint pixels whose ``source`` value is not finite in :data:`NAN_COLOUR`.

    Shape:
        images: (N, 3, H, W) in [0, 1]; source: (N, C, H, W), any C. Returns a new tensor.
    """
    bad = (~torch.isfinite(source)).any(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    if not bad.any():
        return images
    out = images.clone()
    colour = torch.tensor(NAN_COLOUR, dtype=out.dtype, device=out.device).view(1, 3, 1, 1).expand_as(out)
    out[bad] = colour[bad]
    return out


def upscale_factor(size: int, min_pixels: int) -> int:
    """Smallest integer factor that makes a tile of ``size`` pixels at least ``min_pixels`` wide."""
    return max(1, -(-min_pixels // max(1, size)))


def tile_grid(tiles: torch.Tensor, ncol: int, *, pad: int = 1, pad_value: float = 1.0, upscale: int = 1) -> np.ndarray:
    """Arrange tiles row-major in a grid, nearest-upsampled by ``upscale``.

    Shape:
        tiles: (N, 1 or 3, h, w) float in [0, 1]. Returns (H, W, 3) uint8.
    """
    if tiles.ndim != 4 or tiles.shape[1] not in (1, 3):
        raise ValueError(f"`tiles` must have shape (N, 1 or 3, h, w), got {tuple(tiles.shape)}.")
    tiles = tiles.detach().float().cpu()
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    if upscale > 1:
        tiles = tiles.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, _, h, w = tiles.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), float(pad_value))
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = tiles[i]
    return to_uint8(grid)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] to (H, W, 3) uint8."""
    arr = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def downsize(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an (H, W, 3) uint8 image so its longer side is at most ``max_side`` (never enlarges)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    ratio = max_side / max(h, w)
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def label_left(image: np.ndarray, text: str, width: int = 64) -> np.ndarray:
    """Put ``text`` in a white margin ``width`` pixels wide on the image's left side."""
    h = image.shape[0]
    canvas = Image.new("RGB", (width + image.shape[1], h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (width, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((3, max(0, h // 2 - 6)), text, fill=(0, 0, 0), font=_font())
    return np.asarray(canvas)


def stack_rows(rows: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Stack (H_i, W_i, 3) uint8 images vertically, left-aligned, on white, ``gap`` pixels apart."""
    if not rows:
        raise ValueError("`rows` is empty.")
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    top = 0
    for r in rows:
        out[top : top + r.shape[0], : r.shape[1]] = r
        top += r.shape[0] + gap
    return out


def filmstrip(rows: Sequence[tuple[str, np.ndarray]], max_rows: int) -> np.ndarray:
    """The most recent ``max_rows`` labelled rows (e.g. one per logged epoch), oldest at the top."""
    recent = list(rows)[-max_rows:]
    return stack_rows([label_left(img, label) for label, img in recent])


# Ten distinguishable colours (matplotlib's "tab10") for class maps; classes beyond 10 reuse them.
CATEGORICAL = torch.tensor(
    [
        [0.122, 0.467, 0.706],
        [1.000, 0.498, 0.055],
        [0.173, 0.627, 0.173],
        [0.839, 0.153, 0.157],
        [0.580, 0.404, 0.741],
        [0.549, 0.337, 0.294],
        [0.890, 0.467, 0.761],
        [0.498, 0.498, 0.498],
        [0.737, 0.741, 0.133],
        [0.090, 0.745, 0.812],
    ]
)


def display_image(x: torch.Tensor) -> torch.Tensor:
    """An input image for display: min-max stretched to [0, 1], grayscale expanded to RGB. (C, H, W) -> (3, H, W)."""
    x = x.detach().float().cpu()
    x = torch.nan_to_num(x)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]


def robust_unit(heat: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """Scale a non-negative map by its ``quantile`` (so one extreme pixel does not darken the rest), clip to [0, 1]."""
    heat = torch.nan_to_num(heat.detach().float().cpu())
    scale = float(torch.quantile(heat.flatten(), quantile)) if heat.numel() else 0.0
    return (heat / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(heat)


def overlay(image: torch.Tensor, heat: torch.Tensor, colormap: str = "inferno", alpha: float = 0.6) -> torch.Tensor:
    """A heat map in [0, 1] blended over the grayscale of ``image``. (3, H, W), (H, W) -> (3, H, W)."""
    gray = image.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return (1 - alpha) * gray + alpha * apply_colormap(heat, colormap)


def signed_image(g: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """A signed input-space map (e.g. guided backprop) as an image: 0 grey, scaled by the ``quantile`` of ``|g|``."""
    g = torch.nan_to_num(g.detach().float().cpu())
    scale = float(torch.quantile(g.abs().flatten(), quantile)) if g.numel() else 0.0
    out = (g / (2 * scale) + 0.5).clamp(0, 1) if scale > 0 else torch.full_like(g, 0.5)
    return out.expand(3, -1, -1) if out.shape[0] == 1 else out[:3]


def class_map(classes: torch.Tensor) -> torch.Tensor:
    """A map of class indices in categorical colours. (H, W) -> (3, H, W)."""
    return CATEGORICAL[classes.long().cpu() % len(CATEGORICAL)].permute(2, 0, 1)


def header(labels: Sequence[str], tile_width: int, left: int = 64, height: int = 14, pad: int = 1) -> np.ndarray:
    """A white strip with one label per column of a :func:`tile_grid` (tiles ``tile_width`` wide, ``pad`` apart)."""
    width = left + pad + len(labels) * (tile_width + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((left + pad + i * (tile_width + pad) + 2, 1), label[: max(1, tile_width // 6)], fill=(0, 0, 0))
    return np.asarray(canvas)


def resize_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, 3, h, w) tiles to (N, 3, size, size): nearest when enlarging by an integer factor, else bilinear."""
    import torch.nn.functional as F

    h, w = tiles.shape[-2:]
    if (h, w) == (size, size):
        return tiles
    if size % h == 0 and size % w == 0:
        return F.interpolate(tiles, size=(size, size), mode="nearest")
    return F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def scatter(
    coords: np.ndarray,
    labels: np.ndarray | None,
    *,
    size: int = 480,
    title: str = "",
    class_names: Sequence[str] | None = None,
    radius: int = 2,
) -> np.ndarray:
    """A 2-D scatter plot of points coloured by class, with a legend. (N, 2) -> (H, W, 3) uint8.

    Without labels every point is grey and there is no legend.
    """
    coords = np.asarray(coords, dtype=np.float64)
    margin, legend_w = 12, 0
    classes: list[int] = []
    if labels is not None:
        classes = sorted(int(c) for c in np.unique(labels))
        legend_w = 110
    canvas = Image.new("RGB", (size + legend_w, size + 16), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
    finite = np.isfinite(coords).all(axis=1)
    if finite.any():
        lo, hi = coords[finite].min(0), coords[finite].max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        xy = (coords - lo) / span * (size - 2 * margin) + margin
        palette = (CATEGORICAL.numpy() * 255).astype(int)
        for i in np.flatnonzero(finite):
            x, y = xy[i, 0], xy[i, 1] + 16
            colour = (128, 128, 128) if labels is None else tuple(palette[int(labels[i]) % len(palette)])
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    for row, c in enumerate(classes[:40]):
        colour = tuple((CATEGORICAL[c % len(CATEGORICAL)].numpy() * 255).astype(int))
        top = 20 + row * 13
        draw.rectangle((size + 6, top, size + 14, top + 8), fill=colour)
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        draw.text((size + 18, top - 2), name[:14], fill=(0, 0, 0))
    return np.asarray(canvas)


def hstack(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Place (H_i, W_i, 3) uint8 images side by side, top-aligned, on white."""
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for img in images:
        out[: img.shape[0], left : left + img.shape[1]] = img
        left += img.shape[1] + gap
    return out


def frame(tiles: torch.Tensor, colours: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Draw a coloured frame of ``width`` pixels inside each tile. (N, 3, h, w), (N, 3) -> (N, 3, h, w)."""
    out = tiles.clone()
    c = colours.view(-1, 3, 1, 1)
    out[:, :, :width, :] = c
    out[:, :, -width:, :] = c
    out[:, :, :, :width] = c
    out[:, :, :, -width:] = c
    return out


class Filmstrip:
    """The same view at each of the last ``length`` logged epochs: labelled frames, oldest first.

    Frames are kept as tensors (uint8 images, or any tensor a monitor draws itself, such as firing rates), so the
    filmstrip saves in a checkpoint and a resumed run continues it. :meth:`rows` draws image frames one under another,
    :meth:`columns` side by side.
    """

    def __init__(self, length: int) -> None:
        self.length = int(length)
        self.frames: list[tuple[str, torch.Tensor]] = []

    def push(self, label: str, frame: np.ndarray | torch.Tensor) -> Filmstrip:
        """Append a frame (copied) and keep the last ``length``."""
        if isinstance(frame, np.ndarray):
            frame = torch.from_numpy(np.ascontiguousarray(frame).copy())
        else:
            frame = frame.detach().cpu().clone()
        self.frames.append((label, frame))
        del self.frames[: -self.length]
        return self

    def rows(self) -> np.ndarray:
        """Image frames stacked top to bottom, each labelled on the left."""
        return filmstrip([(label, frame.numpy()) for label, frame in self.frames], self.length)

    def columns(self, gap: int = 4) -> np.ndarray:
        """Image frames side by side (each already carries its own label)."""
        return hstack([frame.numpy() for _, frame in self.frames], gap=gap)

    def __len__(self) -> int:
        return len(self.frames)

    def state_dict(self) -> list[tuple[str, torch.Tensor]]:
        return [(label, frame.clone()) for label, frame in self.frames]

    def load_state_dict(self, frames: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.frames = [(str(label), torch.as_tensor(frame)) for label, frame in frames][-self.length :]


class Filmstrips(dict):
    """One :class:`Filmstrip` per key (layer, probe, tag), created on first use, all of the same length."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = int(length)

    def __missing__(self, key: Any) -> Filmstrip:
        strip = self[key] = Filmstrip(self.length)
        return strip

    def state_dict(self) -> dict[Any, list[tuple[str, torch.Tensor]]]:
        return {key: strip.state_dict() for key, strip in self.items()}

    def load_state_dict(self, state: dict[Any, Sequence[tuple[str, torch.Tensor]]]) -> None:
        self.clear()
        for key, frames in state.items():
            self[key].load_state_dict(frames)


# ---- filter and activation drawing ----

#: Colour of dead channels (never active on any value seen): frames of activation maps, cells of the history.
DEAD_COLOUR = (0.9, 0.0, 0.0)


@torch.no_grad()
def filter_tiles(weight: torch.Tensor, scale: float, *, max_filters: int = 64, max_channels: int = 8) -> torch.Tensor:
    """Render filters as tiles on a fixed symmetric scale: 0 is mid-grey, ``±scale`` black/white (or full colour).

    With 3 input channels each filter is one RGB tile; with 1 a grayscale tile; with more, each of the first
    ``max_channels`` input-channel slices is its own grayscale tile, one row of slices per filter. Non-finite
    weights are painted magenta.

    Shape:
        weight: (C_out, C_in, kh, kw). Returns (N, 3, kh, kw) float in [0, 1], N = min(C_out, max_filters) for
        C_in <= 3, else min(C_out, max_filters) * min(C_in, max_channels), filter-major.
    """
    if weight.ndim != 4:
        raise ValueError(f"`weight` must have shape (C_out, C_in, kh, kw), got {tuple(weight.shape)}.")
    w = weight.detach().float().cpu()[:max_filters]
    c_in = w.shape[1]
    if c_in == 3:
        tiles = symmetric_unit(w, scale)
        return mark_non_finite(tiles, w)
    if c_in != 1:
        w = w[:, :max_channels].reshape(-1, 1, *w.shape[-2:])
    tiles = symmetric_unit(w, scale).expand(-1, 3, -1, -1)
    return mark_non_finite(tiles, w)


def filter_grid(
    weight: torch.Tensor,
    scale: float,
    *,
    max_filters: int = 64,
    max_channels: int = 8,
    min_tile_pixels: int = 32,
    ncol: int | None = None,
) -> np.ndarray:
    """A grid image of :func:`filter_tiles`, nearest-upsampled so a 3x3 kernel is visible.

    Returns:
        (H, W, 3) uint8 numpy array. For C_in <= 3 the grid has ``ncol`` (default 8) filters per row; otherwise one
        row per filter, one column per input channel.
    """
    tiles = filter_tiles(weight, scale, max_filters=max_filters, max_channels=max_channels)
    c_in = weight.shape[1]
    if ncol is None:
        ncol = 8 if c_in in (1, 3) else min(c_in, max_channels)
    factor = upscale_factor(max(weight.shape[-2:]), min_tile_pixels)
    return tile_grid(tiles, ncol, upscale=factor)


def filter_row(weight: torch.Tensor, scale: float, *, filters: int, min_tile_pixels: int = 32) -> np.ndarray:
    """The first ``filters`` filters in one row (input channel 0 for layers with more than 3): a filmstrip frame.

    Shape:
        weight: (C_out, C_in, kh, kw). Returns (H, W, 3) uint8.
    """
    first = weight[:filters, :1] if weight.shape[1] > 3 else weight[:filters]
    return filter_grid(first, scale, max_filters=filters, max_channels=1, min_tile_pixels=min_tile_pixels, ncol=filters)


@torch.no_grad()
def activation_tiles(maps: torch.Tensor, scale: float, dead: torch.Tensor | None = None) -> torch.Tensor:
    """One colour tile per channel on a common scale (0 -> dark, ``scale`` -> bright); dead channels framed in red.

    Shape:
        maps: (C, H, W); dead: (C,) bool. Returns (C, 3, H + 2, W + 2) float in [0, 1] (a 1-pixel frame around
        each tile: mid-grey, :data:`DEAD_COLOUR` for dead channels).
    """
    if maps.ndim != 3:
        raise ValueError(f"`maps` must have shape (C, H, W), got {tuple(maps.shape)}.")
    values = (maps.detach().float().cpu() / max(scale, 1e-12)).clamp(0, 1)
    tiles = apply_colormap(values, "inferno")
    framed = torch.ones(tiles.shape[0], 3, tiles.shape[2] + 2, tiles.shape[3] + 2) * 0.5
    if dead is not None:
        framed[dead.cpu()] = torch.tensor(DEAD_COLOUR).view(3, 1, 1)
    framed[:, :, 1:-1, 1:-1] = tiles
    return framed


def activation_grid(
    maps: torch.Tensor,
    scale: float,
    dead: torch.Tensor | None = None,
    *,
    ncol: int = 8,
    min_tile_pixels: int = 48,
    max_side: int = 1024,
) -> np.ndarray:
    """A grid of :func:`activation_tiles`, ``ncol`` per row, upsampled to ``min_tile_pixels`` and at most ``max_side``.

    Shape:
        maps: (C, H, W); dead: (C,) bool. Returns (H', W', 3) uint8.
    """
    tiles = activation_tiles(maps, scale, dead)
    grid = tile_grid(tiles, ncol=ncol, pad=1, upscale=upscale_factor(maps.shape[-1], min_tile_pixels))
    return downsize(grid, max_side)


def firing_history(frames: Sequence[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Rows = logged epochs, columns = channels coloured by firing rate (viridis), dead channels in :data:`DEAD_COLOUR`.

    Shape:
        frames: (label, firing rates (C,) in [0, 1]) per logged epoch, oldest first. Returns (H, W, 3) uint8.
    """
    rows = []
    for label, rate in frames:
        channels = rate.numel()
        cell = max(1, min(12, 768 // max(1, channels)))
        colours = apply_colormap(rate.view(1, -1), "viridis")  # (3, 1, C)
        colours[:, 0, rate == 0] = torch.tensor(DEAD_COLOUR).view(3, 1)
        strip = colours.repeat_interleave(cell, dim=2).repeat_interleave(10, dim=1)
        rows.append((label, to_uint8(strip)))
    return filmstrip(rows, len(rows))


def dead_channel_table(sites: Sequence[tuple[str, Sequence[int], int]], epochs_done: int, step: int) -> str:
    """A Markdown table of dead channels: one row per ``(site, dead channel indices, channel count)``.

    At most 200 indices are listed per site.
    """
    lines = [
        f"Dead channels after {epochs_done} epoch(s), step {step}:\n",
        "| site | dead | channels |",
        "|---|---:|---|",
    ]
    for site, indices, channels in sites:
        shown = ", ".join(map(str, indices[:200])) + (" ..." if len(indices) > 200 else "")
        lines.append(f"| `{site}` | {len(indices)}/{channels} | {shown or '-'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ training dynamics
def log_heatmap(
    values: torch.Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    low: float,
    high: float,
    title: str,
    colormap: str = "viridis",
    cell: int = 12,
    label_width: int = 160,
) -> np.ndarray:
    """A heat map of positive values on a log10 colour scale from ``10**low`` to ``10**high`` (fixed by the caller,
    so images compare), with row labels on the left, column labels on top, a title and a colour bar with its decades.

    Zero or negative values are drawn black-ish (below the scale), NaN/Inf in :data:`NAN_COLOUR`.

    Shape:
        values: (rows, columns) float. Returns (H, W, 3) uint8.
    """
    if values.ndim != 2:
        raise ValueError(f"`values` must have shape (rows, columns), got {tuple(values.shape)}.")
    if not high > low:
        raise ValueError(f"`high` must be above `low`, got low={low!r}, high={high!r}.")
    v = values.detach().double().cpu()
    finite = torch.isfinite(v)
    logs = torch.where(finite & (v > 0), v.clamp_min(1e-300).log10(), torch.full_like(v, low - 1))
    unit = ((logs - low) / (high - low)).clamp(0, 1).float()
    unit[~finite] = float("nan")
    rows, cols = v.shape
    cell_w = max(2, min(cell, 900 // max(1, cols)))
    body = to_uint8(apply_colormap(unit, colormap).repeat_interleave(cell, 1).repeat_interleave(cell_w, 2))
    top, bar_h = 30, 40
    width = label_width + body.shape[1] + 8
    canvas = Image.new("RGB", (max(width, label_width + 260), top + body.shape[0] + bar_h + 8), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (label_width, top))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    step = max(1, -(-cols * 40 // max(1, body.shape[1])))  # a column label every ~40 pixels
    for c in range(0, cols, step):
        draw.text((label_width + c * cell_w, 16), str(column_labels[c]), fill=(60, 60, 60), font=font)
    row_step = max(1, -(-10 // cell))
    for r in range(0, rows, row_step):
        draw.text((2, top + r * cell), str(row_labels[r])[-26:], fill=(0, 0, 0), font=font)
    # the colour bar: one column per 1/40 decade, labelled at each decade
    bar_top, bar_w = top + body.shape[0] + 6, 240
    ramp = apply_colormap(torch.linspace(0, 1, bar_w).view(1, -1), colormap).repeat_interleave(12, 1)
    canvas.paste(Image.fromarray(to_uint8(ramp)), (label_width, bar_top))
    decades = int(round(high - low))
    every = max(1, -(-decades // 6))
    for d in range(0, decades + 1, every):
        x = label_width + round(d / max(1, decades) * (bar_w - 1))
        draw.line([(x, bar_top + 12), (x, bar_top + 16)], fill=(0, 0, 0))
        draw.text((max(0, x - 10), bar_top + 17), f"1e{int(low) + d}", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
