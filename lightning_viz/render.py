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
    legend: bool = True,
    legend_width: int = 110,
) -> np.ndarray:
    """A 2-D scatter plot of points coloured by class, with a legend ``legend_width`` pixels wide (names cut to fit).
    (N, 2) -> (H, W, 3) uint8.

    Without labels every point is grey and there is no legend (nor with ``legend=False``).
    """
    coords = np.asarray(coords, dtype=np.float64)
    margin, legend_w = 12, 0
    classes: list[int] = []
    if labels is not None and legend:
        classes = sorted(int(c) for c in np.unique(labels))
        legend_w = legend_width
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
        while len(name) > 1 and _text_width(name, _font()) > legend_w - 20:
            name = name[:-2] + "…"
        draw.text((size + 18, top - 2), name, fill=(0, 0, 0), font=_font())
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

    def images(self) -> list[tuple[str, np.ndarray]]:
        """The frames as (label, image) pairs, oldest first, for a layout of the caller's choice."""
        return [(label, frame.numpy()) for label, frame in self.frames]

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


#: The most items a text table lists in one cell; the rest are counted ("... (168 more)").
LIST_LIMIT = 32


def listed(items: Sequence[Any], limit: int = LIST_LIMIT) -> str:
    """``items`` joined by commas, at most ``limit`` of them, then how many more: a cell stays one readable line."""
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


def dead_channel_table(sites: Sequence[tuple[str, Sequence[int], int]], epochs_done: int, step: int) -> str:
    """A Markdown table of dead channels: one row per ``(site, dead channel indices, channel count)``.

    At most :data:`LIST_LIMIT` indices are listed per site, then how many more.
    """
    lines = [
        f"Dead channels after {epochs_done} epoch(s), step {step}:\n",
        "| site | dead | channels |",
        "|---|---:|---|",
    ]
    for site, indices, channels in sites:
        lines.append(f"| `{site}` | {len(indices)}/{channels} | {listed(indices) or '-'} |")
    return "\n".join(lines)


# ---- saliency drawing ----
def heat_tiles(maps: torch.Tensor, display: torch.Tensor) -> torch.Tensor:
    """Non-negative saliency maps as heat over the grayscale images, each map scaled to its own 99th percentile.

    Shape:
        maps: (N, H, W); display: (N, 3, H, W) in [0, 1]. Returns (N, 3, H, W) in [0, 1].
    """
    return torch.stack([overlay(d, robust_unit(m)) for d, m in zip(display, maps.detach().float().cpu())])


def signed_tiles(maps: torch.Tensor) -> torch.Tensor:
    """Signed input-space maps (guided backprop, deconvnet) as images, 0 = grey. (N, C, H, W) -> (N, 3, H, W)."""
    return torch.stack([signed_image(m) for m in maps.detach().float().cpu()])


def probability_tiles(maps: torch.Tensor, display: torch.Tensor) -> torch.Tensor:
    """Probabilities over the grayscale images on the fixed scale 0 (black) to 1 (bright), comparable across epochs.

    Shape:
        maps: (N, H, W) in [0, 1] (clipped); display: (N, 3, H, W). Returns (N, 3, H, W).
    """
    maps = maps.detach().float().cpu()
    return torch.stack([overlay(d, m.clamp(0, 1), "viridis", 0.75) for d, m in zip(display, maps)])


def class_map_tiles(maps: torch.Tensor) -> torch.Tensor:
    """Maps of class indices in categorical colours. (N, H, W) -> (N, 3, H, W)."""
    return torch.stack([class_map(m) for m in maps.detach().cpu()])


def column_tiles(columns: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Columns of tiles, each (R, 3, h, w), resized to ``size`` and stacked per row. Returns (R, M, 3, size, size)."""
    return torch.stack([resize_tiles(c, size) for c in columns], dim=1)


def tile_row(tiles: torch.Tensor, size: int | None = None) -> np.ndarray:
    """One row of (M, 3, h, w) tiles side by side (optionally resized to ``size`` first). Returns (H, W, 3) uint8."""
    return tile_grid(tiles if size is None else resize_tiles(tiles, size), ncol=len(tiles))


# ---- exemplar and feature-visualisation drawing ----
#: Colour of the receptive-field outline on an exemplar image (yellow: it stands out on gray and on colour images).
OUTLINE_COLOUR = (1.0, 0.85, 0.0)


def fit_tile(tile: torch.Tensor, size: int) -> torch.Tensor:
    """Resize one tile to a square of ``size`` pixels: nearest when enlarging (so pixels stay pixels), else bilinear.

    Shape:
        tile: (3, h, w) float in [0, 1]. Returns a new (3, size, size) float tensor in [0, 1].
    """
    import torch.nn.functional as F

    mode = "nearest" if max(tile.shape[-2:]) <= size else "bilinear"
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(tile.unsqueeze(0), size=(size, size), mode=mode, **kwargs).squeeze(0).clamp(0, 1)


def outline(image: torch.Tensor, box: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A copy of ``image`` with a 1-pixel :data:`OUTLINE_COLOUR` rectangle along the inside of ``box``.

    Shape:
        image: (3, H, W) float in [0, 1]; box: (top, left, bottom, right), bottom/right exclusive. Returns (3, H, W).
    """
    out = image.clone()
    top, left, bottom, right = (int(v) for v in box)
    colour = torch.tensor(OUTLINE_COLOUR, dtype=out.dtype).view(3, 1)
    out[:, top, left:right] = colour
    out[:, bottom - 1, left:right] = colour
    out[:, top:bottom, left] = colour
    out[:, top:bottom, right - 1] = colour
    return out


def exemplar_tiles(
    image: torch.Tensor, box: torch.Tensor, projection: torch.Tensor, tile_size: int, *, show_full: bool = False
) -> list[torch.Tensor]:
    """The tiles of one exemplar: [the image with the receptive field outlined,] its crop, the projection's crop.

    The image is min-max stretched (:func:`display_image`), the projection drawn signed around grey
    (:func:`signed_image`), each tile resized to ``tile_size`` (:func:`fit_tile`).

    Shape:
        image: (C, H, W); box: (top, left, bottom, right); projection: (C, H, W). Returns (3, tile_size, tile_size)
        float tensors in [0, 1].
    """
    top, left, bottom, right = (int(v) for v in box)
    shown = display_image(image)
    tiles = [fit_tile(outline(shown, box), tile_size)] if show_full else []
    tiles.append(fit_tile(shown[:, top:bottom, left:right], tile_size))
    tiles.append(fit_tile(signed_image(projection[:, top:bottom, left:right]), tile_size))
    return tiles


def _channel_exemplar_tiles(
    images: torch.Tensor,
    boxes: torch.Tensor,
    projections: torch.Tensor,
    found: torch.Tensor,
    ci: int,
    tile_size: int,
    show_full: bool,
) -> list[torch.Tensor]:
    """The :func:`exemplar_tiles` of every found exemplar of the ``ci``-th channel (channel-major order)."""
    k = found.shape[1]
    return [
        tile
        for j in range(k)
        if found[ci, j]
        for tile in exemplar_tiles(
            images[ci * k + j], boxes[ci * k + j], projections[ci * k + j], tile_size, show_full=show_full
        )
    ]


def exemplar_table(
    channels: Sequence[int], ids: torch.Tensor, scores: torch.Tensor, sample_index: Sequence[int]
) -> str:
    """A Markdown table: per channel, its exemplars as ``sample index: score`` (non-finite scores left out).

    Shape:
        ids, scores: (C, k), ``ids`` positions in ``sample_index`` (the dataset indices that were scanned).
    """
    lines = ["| channel | exemplars (sample index: score) |", "|---:|---|"]
    for ci, channel in enumerate(channels):
        pairs = [
            f"{sample_index[int(ids[ci, j])]}: {float(scores[ci, j]):.3g}"
            for j in range(ids.shape[1])
            if torch.isfinite(scores[ci, j])
        ]
        lines.append(f"| {channel} | {', '.join(pairs)} |")
    return "\n".join(lines)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale expanded to three channels, extra channels dropped. (N, C, H, W) -> (N, 3, H, W)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


def with_header(labels: Sequence[str], tile_size: int, rows: Sequence[np.ndarray]) -> np.ndarray:
    """``rows`` (tile grids labelled on the left) under a :func:`header` naming their columns, no gap between.

    Returns (H, W, 3) uint8.
    """
    return stack_rows([header(labels, tile_size), *rows], gap=0)


def featurevis_grid(images: torch.Tensor, labels: Sequence[str], tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature-visualisation images as a grid: a column per label (channel or class), a row per starting noise.

    Returns the grid (header, then a row per seed labelled ``seed s``) and the first seed's row alone, unlabelled
    (the frame a filmstrip keeps).

    Shape:
        images: (S * len(labels), C, h, w) float in [0, 1], seed-major. Returns two (H, W, 3) uint8 images.
    """
    per_seed = len(labels)
    tiles = resize_tiles(to_rgb(images), tile_size)
    seeds = [tile_grid(tiles[s * per_seed : (s + 1) * per_seed], ncol=per_seed) for s in range(len(tiles) // per_seed)]
    rows = [label_left(grid, f"seed {s}") for s, grid in enumerate(seeds)]
    return with_header(labels, tile_size, rows), seeds[0]


# ---- embedding drawing ----

#: TensorBoard's projector accepts sprites up to this many pixels per side.
SPRITE_LIMIT = 8192
#: Frame colours of a neighbour strip: the probe, a neighbour of its class, of another class, of an unknown one.
PROBE_FRAME = (0.0, 0.0, 0.0)
SAME_CLASS_FRAME = (0.1, 0.7, 0.1)
OTHER_CLASS_FRAME = (0.9, 0.1, 0.1)
UNKNOWN_CLASS_FRAME = (0.5, 0.5, 0.5)


def sprite_tile_side(count: int, wanted: int) -> int:
    """Side of each of ``count`` sprite thumbnails: ``wanted``, shrunk so the square sheet fits :data:`SPRITE_LIMIT`."""
    per_side = int(np.ceil(np.sqrt(count)))
    return max(1, min(wanted, SPRITE_LIMIT // per_side))


def thumbnails(images: torch.Tensor, side: int) -> torch.Tensor:
    """Input images as display thumbnails (min-max stretched, RGB). (N, C, H, W) -> (N, 3, side, side) in [0, 1]."""
    tiles = torch.stack([display_image(im) for im in images])
    return torch.nn.functional.interpolate(tiles, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)


def sprite(thumbs: torch.Tensor) -> np.ndarray:
    """Square sprite sheet, row-major, as TensorBoard's projector expects. (N, 3, s, s) -> (S, S, 3) uint8.

    ``S = ceil(sqrt(N)) * s``; cells after the last thumbnail stay black.
    """
    n, _, s, _ = thumbs.shape
    per_side = int(np.ceil(np.sqrt(n)))
    sheet = torch.zeros(3, per_side * s, per_side * s)
    for i in range(n):
        r, c = divmod(i, per_side)
        sheet[:, r * s : (r + 1) * s, c * s : (c + 1) * s] = thumbs[i]
    return to_uint8(sheet)


def neighbour_strips(
    probes: torch.Tensor,
    neighbours: Sequence[torch.Tensor],
    same_class: Sequence[torch.Tensor | None],
    tile: int = 40,
    *,
    names: tuple[torch.Tensor | None, Sequence[str] | None] = (None, None),
    width: int | None = None,
) -> np.ndarray:
    """One row per probe under its caption (``probe 0: cat`` from ``names`` = (probe labels, class names), else
    ``probe 0``): the probe (black frame), then
    its nearest neighbours, nearest first, framed green when they share the probe's class, red otherwise, grey when
    either label is unknown. Tiles are ``tile`` pixels, smaller when a row would not fit ``width`` (default
    :data:`CARD_WIDTH`).

    Shape:
        probes: (P, C, H, W); neighbours: P tensors (k, C, H, W); same_class: P bool tensors (k,) or None.
        Returns (H', W', 3) uint8.
    """
    from lightning_viz._classes import class_name

    labels, class_names = names
    captions = [
        f"probe {p}" + (f": {class_name(int(labels[p]), class_names)}" if labels is not None else "")
        for p in range(len(probes))
    ]
    width = width or CARD_WIDTH
    rows = []
    for p, (probe, near, same) in enumerate(zip(probes, neighbours, same_class)):
        side = fit_tile_side(len(near) + 1, tile, width=width)
        rows.append((captions[p], framed_neighbours(probe, near, same, side)))
    key = "frames: black probe, green same class, red other class"
    return stack_rows([caption_strips(rows, width=width), text_strip(key, width)], gap=2)


def neighbours_of(
    probes: torch.Tensor,
    probe_labels: torch.Tensor | None,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    nearest: torch.Tensor,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`neighbour_strips` of each probe's ``nearest`` images (indices into ``images``, nearest first), framed by
    whether they share the probe's class, captioned with the probe's class name.

    Shape:
        probes: (P, C, H, W); probe_labels: (P,) or None; images: (N, C, H, W); labels: (N,) or None; nearest: (P, k).
    """
    neighbours, same = [], []
    for p, near in enumerate(nearest):
        neighbours.append(images[near])
        known = labels is not None and probe_labels is not None
        same.append(labels[near] == probe_labels[p] if known else None)  # type: ignore[index]
    return neighbour_strips(probes, neighbours, same, names=(probe_labels, class_names))


def embedding_map(
    coords: np.ndarray,
    labels: np.ndarray | None,
    *,
    reducer: str,
    epochs_done: int,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D map of the code (coloured by class, with a legend; :data:`CARD_WIDTH` wide) and its small filmstrip
    frame (labelled with :func:`epoch_label`), both uint8 (H, W, 3).

    Shape:
        coords: (N, 2); labels: (N,) class indices or None (grey points).
    """
    when = "untrained (init)" if epochs_done <= 0 else f"after epoch {epochs_done - 1}"
    legend = 0
    if labels is not None:  # as wide as the longest name shown needs, between 80 and 170 pixels
        shown = [class_names[c] if class_names is not None and c < len(class_names) else f"class {c}" for c in
                 sorted(int(c) for c in np.unique(labels))][:40]  # fmt: skip
        legend = min(170, max(80, max(_text_width(n, _font()) for n in shown) + 24))
    image = scatter(coords, labels, size=CARD_WIDTH - legend, title=f"{reducer} of the code, {when}",
                    class_names=class_names, legend_width=legend or 110)  # fmt: skip
    small = scatter(coords, labels, size=108, title=epoch_label(epochs_done), radius=1, legend=False)
    return image, small


# ---- attention drawing (AttentionMonitor) ----


def token_overlay(image: torch.Tensor, patch_map: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """A map over the patch grid drawn over the image: each patch's value, nearest-upsampled to its pixels.

    Args:
        image: the display image (:func:`display_image`), (3, H, W) in [0, 1].
        patch_map: one value per patch, (rows, cols), e.g. the class token's attention to each patch.
        scale: values are divided by ``scale`` and clipped to [0, 1] (a fixed scale: comparable across epochs);
            ``None`` scales the map to its own maximum.

    Returns:
        (3, H, W) float in [0, 1].
    """
    import torch.nn.functional as F

    values = torch.nan_to_num(patch_map.detach().float().cpu())
    if scale is None:
        top = float(values.max()) if values.numel() else 0.0
        scale = top if top > 0 else 1.0
    heat = F.interpolate((values / scale).clamp(0, 1)[None, None], size=tuple(image.shape[-2:]), mode="nearest")
    return overlay(image, heat[0, 0])


# ---- legends and colour bars ----

#: Width (pixels) at which TensorBoard shows an image by default. Its Images tab draws each image card 350 px wide
#: (``tf-image-loader``: ``width: 350px`` unless "show actual image size" is on) and its Time Series tab lays cards
#: out at least 335 px wide (``flex-basis: 318px`` plus padding; the card-width slider starts at 335); both scale a
#: wider image down to fit. Labels drawn into an image are legible only if they stay legible at this width.
CARD_WIDTH = 350
#: Smallest text height (pixels, font size) a reader can still read once TensorBoard has scaled the image to the card.
MIN_TEXT_PX = 11


def legible_font_size(image_width: int, *, card_width: int = CARD_WIDTH, min_px: int = MIN_TEXT_PX) -> int:
    """The font size for text drawn into an image ``image_width`` pixels wide so that it is still ``min_px`` tall
    when TensorBoard scales the image down to its card (``card_width``)."""
    return int(np.ceil(min_px * max(1.0, image_width / card_width)))


def label_font(size: int = MIN_TEXT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font ``size`` pixels tall (Pillow >= 10.1 ships a scalable default); PIL's 11 px bitmap font before that."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _text_width(text: str, font: Any) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left)


def colour_bar(
    width: int,
    colormap: str,
    meaning: str,
    *,
    low: str = "0",
    high: str = "1",
    marks: Sequence[tuple[str, Sequence[float]]] = (),
    font_size: int | None = None,
) -> np.ndarray:
    """A horizontal colour bar ``width`` pixels wide, its end values under its ends and its meaning written under it.

    ``marks`` adds a swatch per special colour after the meaning (e.g. ``("dead", DEAD_COLOUR)``). Text is
    :func:`legible_font_size` for ``width`` unless ``font_size`` is given.

    Returns:
        (H, width, 3) uint8, on white.
    """
    if width < 16:
        raise ValueError(f"`width` must be at least 16 pixels, got {width}.")
    size = font_size or legible_font_size(width)
    font = label_font(size)
    margin = max(4, size // 2)
    bar_height = max(10, size)
    values = torch.linspace(0, 1, width - 2 * margin).view(1, -1).expand(bar_height, -1)
    bar = to_uint8(apply_colormap(values, colormap))
    height = bar_height + 2 * (size + 6) + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(bar), (margin, 2))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((margin - 1, 1, width - margin, bar_height + 2), outline=(96, 96, 96))
    y = bar_height + 5
    draw.text((margin, y), low, fill=(0, 0, 0), font=font)
    draw.text((width - margin - _text_width(high, font), y), high, fill=(0, 0, 0), font=font)
    y += size + 4
    x = margin
    draw.text((x, y), meaning, fill=(0, 0, 0), font=font)
    x += _text_width(meaning, font) + size
    for name, colour in marks:
        fill = tuple(int(round(255 * float(c))) for c in colour)
        draw.rectangle((x, y + 1, x + size - 1, y + size), fill=fill, outline=(96, 96, 96))
        draw.text((x + size + 3, y), name, fill=(0, 0, 0), font=font)
        x += size + 3 + _text_width(name, font) + size
    return np.asarray(canvas)


#: The colour scales our heat maps use, with what their ends mean (``colormap``, ``low``, ``high``, ``meaning``).
COLOUR_SCALES: dict[str, tuple[str, str, str, str]] = {
    "saliency": ("inferno", "0", "p99", "saliency, per-map 99th percentile"),
    "occlusion": ("viridis", "0", "1", "probability 0-1"),
    "activations": ("inferno", "0", "max", "activation, one scale for all channels"),
    "firing": ("viridis", "0", "1", "firing rate 0-1"),
}


def with_colour_bar(
    image: np.ndarray, scale: str, *, high: str | None = None, marks: Sequence[tuple[str, Sequence[float]]] = ()
) -> np.ndarray:
    """``image`` with the colour bar of one of :data:`COLOUR_SCALES` under it (``high`` overrides its top label,
    e.g. the activation scale's value). The bar is as wide as the image, at most :data:`CARD_WIDTH` wider.

    Shape:
        image: (H, W, 3) uint8. Returns (H + bar height, W, 3) uint8.
    """
    if scale not in COLOUR_SCALES:
        raise ValueError(f"`scale` must be one of {sorted(COLOUR_SCALES)}, got {scale!r}.")
    colormap, low, top, meaning = COLOUR_SCALES[scale]
    width = max(image.shape[1], 16)
    bar = colour_bar(
        width, colormap, meaning, low=low, high=high or top, marks=marks, font_size=legible_font_size(width)
    )
    return stack_rows([image, bar], gap=2)


def class_key(classes: Sequence[int], names: Sequence[str], *, width: int = CARD_WIDTH) -> np.ndarray:
    """A key for class-coloured maps (occlusion's top class): one swatch per class in :data:`CATEGORICAL` colours
    with its name, wrapped into lines ``width`` pixels wide.

    Args:
        classes: the class indices shown (their colours are ``CATEGORICAL[index % 10]``).
        names: one name per entry of ``classes`` (see :func:`lightning_viz._classes.class_name`).
    Returns:
        (H, width, 3) uint8.
    """
    if len(classes) != len(names):
        raise ValueError(f"`classes` and `names` must have the same length, got {len(classes)} and {len(names)}.")
    size = legible_font_size(width)
    font = label_font(size)
    line_height = size + 6
    items = [(int(c), str(n)) for c, n in zip(classes, names)]
    placed, x, y = [], 4, 3
    for index, name in items:
        item_width = size + 4 + _text_width(name, font) + size
        if x > 4 and x + item_width > width:
            x, y = 4, y + line_height
        placed.append((x, y, index, name))
        x += item_width
    canvas = Image.new("RGB", (width, y + line_height + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for x, y, index, name in placed:
        fill = tuple(int(round(255 * float(c))) for c in CATEGORICAL[index % len(CATEGORICAL)])
        draw.rectangle((x, y + 1, x + size - 1, y + size), fill=fill, outline=(96, 96, 96))
        draw.text((x + size + 4, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def numbered_grid(
    tiles: torch.Tensor, labels: Sequence[str], *, ncol: int, pad: int = 1, upscale: int = 1, max_side: int = 1024
) -> np.ndarray:
    """A :func:`tile_grid` with a label (e.g. the channel number) in each tile's top-left corner, white on a dark
    box, in a font legible at TensorBoard's card width once the grid is downsized to ``max_side``.

    Shape:
        tiles: (N, 3, h, w) float in [0, 1]; ``len(labels) == N``. Returns (H, W, 3) uint8.
    """
    if len(labels) != tiles.shape[0]:
        raise ValueError(f"`labels` must have one entry per tile ({tiles.shape[0]}), got {len(labels)}.")
    grid = tile_grid(tiles, ncol=ncol, pad=pad, upscale=upscale)
    shrink = min(1.0, max_side / max(grid.shape[:2]))
    size = legible_font_size(round(grid.shape[1] * shrink))
    font = label_font(max(6, int(np.ceil(size / shrink))))
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    th, tw = tiles.shape[-2] * upscale, tiles.shape[-1] * upscale
    for i, label in enumerate(labels):
        if not label:
            continue
        x, y = pad + (i % ncol) * (tw + pad), pad + (i // ncol) * (th + pad)
        left, top, right, bottom = draw.textbbox((x + 2, y + 1), label, font=font)
        draw.rectangle((x, y, min(right + 2, x + tw - 1), min(bottom + 2, y + th - 1)), fill=(0, 0, 0))
        draw.text((x + 2, y + 1), label, fill=(255, 255, 255), font=font)
    return downsize(np.asarray(canvas), max_side)


# ------------------------------------------------------------------------------------------------ training dynamics
def log_heatmap(
    values: torch.Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    low: float,
    high: float,
    title: str,
    meaning: str = "value, log10 colour scale",
    colormap: str = "viridis",
    cell: int = 12,
    label_width: int = 110,
    width: int = CARD_WIDTH,
) -> np.ndarray:
    """A heat map of positive values on a log10 colour scale from ``10**low`` to ``10**high`` (fixed by the caller,
    so images compare), laid out for TensorBoard's card (``width`` pixels): the title wrapped into lines, row labels
    on the left (the end of a long name kept), column labels on top, and a colour bar with its ends and ``meaning``.

    Zero or negative values are drawn black-ish (below the scale), NaN/Inf in :data:`NAN_COLOUR`.

    Shape:
        values: (rows, columns) float. Returns (H, width, 3) uint8.
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
    font = label_font(MIN_TEXT_PX)
    room = width - label_width - 4
    cell_w = max(1, min(cell, room // max(1, cols)))
    body = Image.fromarray(to_uint8(apply_colormap(unit, colormap)))
    body = body.resize((min(room, cell_w * cols), cell * rows), Image.Resampling.NEAREST)
    head = wrapped_text(title, width)
    top = MIN_TEXT_PX + 6
    canvas = Image.new("RGB", (width, top + body.height + 2), (255, 255, 255))
    canvas.paste(body, (label_width, top))
    draw = ImageDraw.Draw(canvas)
    step = max(1, -(-cols * 44 // max(1, body.width)))  # a column label every ~44 pixels
    for c in range(0, cols, step):
        x = label_width + round(c * body.width / max(1, cols))
        if x + _text_width(str(column_labels[c]), font) <= width:
            draw.text((x, 1), str(column_labels[c]), fill=(60, 60, 60), font=font)
    row_step = max(1, -(-(MIN_TEXT_PX + 1) // cell))
    for r in range(0, rows, row_step):
        draw.text((2, top + r * cell), _cut_left(str(row_labels[r]), label_width - 6, font), fill=(0, 0, 0), font=font)
    bar = colour_bar(
        width, colormap, meaning, low=f"1e{int(round(low))}", high=f"1e{int(round(high))}",
        marks=[("NaN/Inf", NAN_COLOUR)],
    )  # fmt: skip
    return stack_rows([head, np.asarray(canvas), bar], gap=2)


def gradient_flow(
    norms: torch.Tensor, layers: Sequence[str], steps: Sequence[int], low: float, high: float, epochs_done: int
) -> np.ndarray:
    """The DynamicsMonitor's picture: gradient norm per layer (rows) at an epoch's sampled steps (columns), on the
    fixed log10 scale ``10**low`` to ``10**high``, at card width (:func:`log_heatmap`).

    Shape:
        norms: (layers, steps). Returns (H, :data:`CARD_WIDTH`, 3) uint8.
    """
    title = f"gradient norm per layer (rows) at the sampled steps (columns) of {epoch_label(epochs_done)}"
    meaning = "gradient norm, log10 colour scale"
    return log_heatmap(norms, layers, [str(s) for s in steps], low=low, high=high, title=title, meaning=meaning)


def _cut_left(text: str, width: int, font: Any) -> str:
    """``text`` shortened from the left ("…ures.3.conv") so it fits ``width`` pixels: a layer name's end says most."""
    while len(text) > 2 and _text_width(text, font) > width:
        text = "…" + text[2:]
    return text


def wrapped_text(text: str, width: int, *, size: int = MIN_TEXT_PX) -> np.ndarray:
    """``text`` wrapped at spaces into lines ``width`` pixels wide, on white. Returns (H, width, 3) uint8."""
    font = label_font(size)
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}", font) <= width - 4:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return stack_rows([text_strip(line, width, size=size) for line in lines or [""]], gap=0)


# ------------------------------------------------------------------------------------ card-sized panels (issue 17)
# Every image below is laid out for TensorBoard's card (:data:`CARD_WIDTH` pixels): tiles shrink and rows wrap so
# nothing is scaled down on screen, text is :data:`MIN_TEXT_PX` tall, and each heat map carries its colour bar.

#: Image tags (prefixes) that may be wider than :data:`CARD_WIDTH`: view them with TensorBoard's "show actual image
#: size" toggle. Empty for the default suite: every image it writes fits the card (the README lists this too).
ACTUAL_SIZE_TAGS: tuple[str, ...] = ()


def epoch_label(epochs_done: int) -> str:
    """A frame's label in Lightning's counting: ``"init"`` for the untrained baseline (no epoch done), ``"ep N"``
    after Lightning's epoch ``N`` (0-based: ``epochs_done`` = N + 1)."""
    return "init" if epochs_done <= 0 else f"ep {epochs_done - 1}"


def fit_tile_side(columns: int, wanted: int, *, width: int = CARD_WIDTH, left: int = 0, pad: int = 1) -> int:
    """The side of ``columns`` tiles in a row (``pad`` apart, after a ``left`` margin) so the row fits ``width``:
    ``wanted`` or smaller, at least 8 pixels."""
    room = (width - left - pad) // max(1, columns) - pad
    return max(8, min(int(wanted), room))


def text_strip(
    text: str, width: int, *, size: int = MIN_TEXT_PX, colour: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """One line of ``text`` on white, ``width`` pixels wide (cut with an ellipsis when it does not fit)."""
    font = label_font(size)
    while len(text) > 1 and _text_width(text, font) > width - 4:
        text = text[:-2] + "…"
    canvas = Image.new("RGB", (width, size + 5), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=colour, font=font)
    return np.asarray(canvas)


def vertical_header(labels: Sequence[str], tile_width: int, *, left: int = 0, pad: int = 1) -> np.ndarray:
    """Column titles written bottom-to-top above columns ``tile_width`` wide (``pad`` apart, after ``left``), so
    a long title ("smoothgrad") is never cut by a narrow column. Returns (H, W, 3) uint8."""
    font = label_font(MIN_TEXT_PX)
    height = max([_text_width(label, font) for label in labels] + [8]) + 6
    width = left + pad + len(labels) * (tile_width + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for i, label in enumerate(labels):
        word = Image.new("RGB", (height, MIN_TEXT_PX + 4), (255, 255, 255))
        ImageDraw.Draw(word).text((2, 0), label, fill=(0, 0, 0), font=font)
        turned = word.rotate(90, expand=True)
        x = left + pad + i * (tile_width + pad) + max(0, (tile_width - turned.width) // 2)
        canvas.paste(turned, (x, 0))
    return np.asarray(canvas)


def labelled_rows(rows: Sequence[tuple[str, np.ndarray]], *, label_width: int = 36) -> np.ndarray:
    """Images stacked top to bottom, each with a short label (an epoch) left of it in a legible font."""
    font = label_font(MIN_TEXT_PX)
    out = []
    for label, image in rows:
        h = max(image.shape[0], MIN_TEXT_PX + 4)
        canvas = Image.new("RGB", (label_width + image.shape[1], h), (255, 255, 255))
        canvas.paste(Image.fromarray(image), (label_width, 0))
        ImageDraw.Draw(canvas).text((2, max(0, (h - MIN_TEXT_PX) // 2 - 1)), label, fill=(0, 0, 0), font=font)
        out.append(np.asarray(canvas))
    return stack_rows(out, gap=1)


def column_filmstrip(
    titles: Sequence[str], frames: Sequence[tuple[str, np.ndarray]], tile_width: int, *, label_width: int = 36
) -> np.ndarray:
    """A filmstrip of tile rows (one per logged epoch, labelled) under vertical column titles."""
    head = vertical_header(titles, tile_width, left=label_width)
    return stack_rows([head, labelled_rows(frames, label_width=label_width)], gap=0)


def _bin_channels(rate: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Firing rates (C,) folded into ``bins`` columns: their mean rate, and whether any channel in a column is dead."""
    c = rate.numel()
    index = (torch.arange(c) * bins // max(1, c)).clamp(max=bins - 1)
    rate = rate.detach().float().cpu().flatten()
    finite = torch.nan_to_num(rate, nan=0.0)
    sums = torch.zeros(bins).index_add_(0, index, finite)
    counts = torch.zeros(bins).index_add_(0, index, torch.ones(c))
    dead = torch.zeros(bins).index_add_(0, index, (rate == 0).float()) > 0
    return sums / counts.clamp(min=1), dead


def dead_history_panel(
    layers: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
    *,
    width: int = CARD_WIDTH,
    row_height: int = 9,
    max_height: int | None = None,
) -> np.ndarray:
    """Every layer's firing-rate history in one image: per layer a title (name, channels, dead now), then a row per
    logged epoch (labelled), one column per channel coloured by firing rate, dead channels in :data:`DEAD_COLOUR`
    (layers wider than the card fold neighbouring channels into one column, red if any of them is dead); a colour bar
    at the bottom. Taller than ``max_height`` (a model with dozens of ReLU sites), it keeps the layers with the most
    dead channels now, in model order, and says how many it left out, rather than being shrunk until no label reads.

    Shape:
        layers: (layer name, [(epoch label, firing rates (C,) in [0, 1]), ...] oldest first). Returns (H, width, 3).
    """
    if not layers:
        raise ValueError("`layers` is empty.")
    label_width = 36
    room = width - label_width - 2
    drawn = []  # (dead now, the layer's title and rows)
    for name, frames in layers:
        if not frames:
            continue
        channels = frames[-1][1].numel()
        dead_now = int((frames[-1][1] == 0).sum())
        title = text_strip(f"{name}: {channels} ch, {dead_now} dead", width)
        bins = min(channels, room)
        rows = []
        for label, rate in frames:
            mean, dead = _bin_channels(rate, bins)
            colours = apply_colormap(mean.view(1, -1), "viridis")
            colours[:, 0, dead] = torch.tensor(DEAD_COLOUR).view(3, 1)
            strip = Image.fromarray(to_uint8(colours)).resize((room, row_height), Image.Resampling.NEAREST)
            rows.append((label, np.asarray(strip)))
        drawn.append((dead_now, [title, labelled_rows(rows, label_width=label_width)]))
    bar = colour_bar(width, "viridis", "firing rate", marks=[("dead", DEAD_COLOUR)])
    blocks = [b for _, pair in drawn for b in pair]
    if max_height is not None and sum(b.shape[0] + 2 for b in [*blocks, bar]) > max_height:
        note = text_strip("...", width)
        room_left = max_height - bar.shape[0] - note.shape[0] - 4
        keep: set[int] = set()
        for i in sorted(range(len(drawn)), key=lambda i: (-drawn[i][0], i)):  # most dead first, then model order
            need = sum(b.shape[0] + 2 for b in drawn[i][1])
            if need <= room_left:
                keep.add(i)
                room_left -= need
        left_out = len(drawn) - len(keep)
        note = text_strip(f"{left_out} more layer(s), fewer dead: see the text tab", width)
        blocks = [b for i, (_, pair) in enumerate(drawn) if i in keep for b in pair] + [note]
    return stack_rows([*blocks, bar], gap=2)


def activation_panel(
    probe: torch.Tensor,
    maps: torch.Tensor,
    scale: float,
    dead: torch.Tensor | None,
    channels: Sequence[int],
    *,
    title: str = "",
    width: int = CARD_WIDTH,
    ncol: int = 8,
) -> np.ndarray:
    """The probe image beside the title, then one numbered tile per channel (:func:`activation_tiles`: one scale for
    all, dead channels framed red), then the colour bar with the scale's value.

    Shape:
        probe: (3, H, W) display image in [0, 1]; maps: (C, h, w); dead: (C,) bool; ``len(channels) == C``.
        Returns (H', width, 3) uint8.
    """
    tiles = activation_tiles(maps, scale, dead)
    side = fit_tile_side(ncol, 96, width=width)
    grid = numbered_grid(resize_tiles(tiles, side), [str(c) for c in channels], ncol=ncol, max_side=10_000)
    thumb = to_uint8(fit_tile(probe.detach().float().cpu(), 56))
    caption = np.concatenate(
        [text_strip(title, width - 60), text_strip("probe image; tiles: channel maps", width - 60)], axis=0
    )
    top = hstack([thumb, caption], gap=4)
    marks = [("dead", DEAD_COLOUR)] if dead is not None and bool(dead.any()) else []
    bar = colour_bar(width, "inferno", "activation, one scale for all channels", high=f"{scale:.3g}", marks=marks)
    return stack_rows([top, grid, bar], gap=3)


def row_caption(probe: int, target: int, probs: torch.Tensor, labels: torch.Tensor | None, names: Any = None) -> str:
    """One line naming a saliency row: the probe, the class explained (true or predicted, by name) and the prediction
    with its probability (``probs``: that probe's class probabilities (K,); ``names``: class names or ``None``)."""
    from lightning_viz._classes import class_name

    pred = int(probs.argmax())
    p = float(probs[pred])
    if labels is not None and target == int(labels[probe]):
        return f"p{probe}: true {class_name(target, names)}, pred {class_name(pred, names)} {p:.2f}"
    return f"p{probe}: pred {class_name(pred, names)} {p:.2f} (explained)"


def saliency_panel(
    tiles: torch.Tensor,
    titles: Sequence[str],
    row_captions: Sequence[str],
    *,
    bars: Sequence[str] = (),
    key: tuple[Sequence[int], Sequence[str]] | None = None,
    width: int = CARD_WIDTH,
) -> np.ndarray:
    """The saliency grid at card width: vertical column titles, a caption line above each row of tiles, then a colour
    bar per scale in ``bars`` (names of :data:`COLOUR_SCALES`) and the class ``key`` (indices, names) of class maps.

    Shape:
        tiles: (R, M, 3, s, s) in [0, 1]. Returns (H, W, 3) uint8, W <= ``width`` when M * (s + 1) + 1 <= width.
    """
    side = tiles.shape[-1]
    parts = [vertical_header(titles, side)]
    row_width = max(width, len(titles) * (side + 1) + 1)
    for row, caption in zip(tiles, row_captions):
        parts.append(text_strip(caption, row_width))
        parts.append(tile_row(row))
    for scale in bars:
        colormap, low, high, meaning = COLOUR_SCALES[scale]
        parts.append(colour_bar(width, colormap, meaning, low=low, high=high))
    if key is not None and len(key[0]):
        parts.append(text_strip("occl. top: class predicted with each square occluded", width))
        parts.append(class_key(list(key[0]), list(key[1]), width=width))
    return stack_rows(parts, gap=1)


def caption_strips(
    rows: Sequence[tuple[str, torch.Tensor]], *, tiles_per_item: int = 1, width: int = CARD_WIDTH
) -> np.ndarray:
    """Rows of tiles, each under a caption line, wrapped to ``width`` (never splitting the ``tiles_per_item`` tiles
    of one item, e.g. an exemplar's crop and projection).

    Shape:
        rows: (caption, tiles (N, 3, s, s) in [0, 1]). Returns (H, W, 3) uint8.
    """
    parts = []
    for caption, tiles in rows:
        side = tiles.shape[-1]
        per_row = max(tiles_per_item, (width - 1) // (side + 1) // tiles_per_item * tiles_per_item)
        parts.append(text_strip(caption, width))
        parts.append(tile_grid(tiles, ncol=min(per_row, len(tiles))))
    return stack_rows(parts, gap=1)


def framed_neighbours(probe: torch.Tensor, near: torch.Tensor, same: torch.Tensor | None, side: int) -> torch.Tensor:
    """A probe (black frame) and its neighbours (green: same class, red: other, grey: unknown) as framed tiles.

    Shape:
        probe: (C, H, W); near: (k, C, H, W); same: (k,) bool or None. Returns (k + 1, 3, side, side).
    """
    tiles = resize_tiles(torch.stack([display_image(im) for im in torch.cat([probe[None], near])]), side)
    colours = torch.tensor(UNKNOWN_CLASS_FRAME).repeat(len(tiles), 1)
    colours[0] = torch.tensor(PROBE_FRAME)
    if same is not None:
        colours[1:] = torch.where(same.view(-1, 1), torch.tensor(SAME_CLASS_FRAME), torch.tensor(OTHER_CLASS_FRAME))
    return frame(tiles, colours)


def grid_filmstrip(frames: Sequence[tuple[str, np.ndarray]], *, width: int = CARD_WIDTH, gap: int = 4) -> np.ndarray:
    """Small frames (each carrying its own label) wrapped into rows ``width`` wide, oldest first."""
    images = [f for _, f in frames]
    per_row = max(1, (width + gap) // (max(f.shape[1] for f in images) + gap))
    rows = [hstack(images[i : i + per_row], gap=gap) for i in range(0, len(images), per_row)]
    return stack_rows(rows, gap=gap)


def featurevis_panel(
    images: torch.Tensor, labels: Sequence[str], tile_size: int, *, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Feature-visualisation images at card width: per starting noise a caption, then its images wrapped into rows,
    each tile labelled (``ch 5``, ``class 3``); and the first noise's images as one small row for a filmstrip
    (:func:`column_filmstrip`). A grayscale network's images stay gray (one channel is drawn as gray, never coloured).

    Shape:
        images: (S * len(labels), C, h, w) float in [0, 1], seed-major. Returns two (H, W, 3) uint8 images.
    """
    width = width or CARD_WIDTH
    per_seed = len(labels)
    side = min(tile_size, width - 2)
    ncol = max(1, (width - 1) // (side + 1))
    tiles = resize_tiles(to_rgb(images.detach().float().cpu()), side)
    parts = []
    seeds = len(tiles) // per_seed
    for s in range(seeds):
        if seeds > 1:
            parts.append(text_strip(f"starting noise {s}", width))
        chunk = tiles[s * per_seed : (s + 1) * per_seed]
        parts.append(numbered_grid(chunk, list(labels), ncol=min(ncol, per_seed), max_side=10_000))
    small = fit_tile_side(per_seed, tile_size, width=width, left=36)
    return stack_rows(parts, gap=2), tile_row(tiles[:per_seed], small)


def exemplar_caption(channel: int, classes: Sequence[str] | None) -> str:
    """``ch 5: cat x2, dog``: the channel and its exemplars' classes, most frequent first; an unnamed class (a bare
    index) reads ``class 3`` so that ``class 3 x2`` cannot be read as ``3x2``."""
    from collections import Counter

    caption = f"ch {channel}"
    if classes:
        named = [f"class {name}" if str(name).isdigit() else str(name) for name in classes]
        caption += ": " + ", ".join(f"{name} x{n}" if n > 1 else name for name, n in Counter(named).most_common())
    return caption


def exemplar_panel(
    images: torch.Tensor,
    boxes: torch.Tensor,
    projections: torch.Tensor,
    found: torch.Tensor,
    channels: Sequence[int],
    tile_size: int,
    *,
    show_full: bool = False,
    classes: Sequence[Sequence[str]] | None = None,
    width: int | None = None,
) -> np.ndarray | None:
    """Exemplars at card width: per channel a caption (``ch 5``, and its exemplars' classes when ``classes`` gives
    them, most frequent first), then its exemplars' :func:`exemplar_tiles` wrapped into rows, never splitting one
    exemplar's tiles, then a line saying what the tiles are. Returns ``None`` when no channel has an exemplar.

    Exemplars are ordered channel-major (channel ``c``'s ``j``-th exemplar at ``c * k + j``); those with
    ``found[c, j]`` false (fewer samples than ``k``) are left out.

    Shape:
        images, projections: (C * k, ch, H, W); boxes: (C * k, 4); found: (C, k) bool; classes: per channel, the
        class name of each found exemplar. Returns (H', W', 3) uint8, at most ``width`` (default 350) wide.
    """
    width = width or CARD_WIDTH
    per_item = 3 if show_full else 2
    side = min(tile_size, (width - 1) // per_item - 1)
    rows = []
    for ci, channel in enumerate(channels):
        tiles = _channel_exemplar_tiles(images, boxes, projections, found, ci, side, show_full)
        if not tiles:
            continue
        rows.append((exemplar_caption(channel, classes[ci] if classes is not None else None), torch.stack(tiles)))
    if not rows:
        return None
    key = "per exemplar: its crop, then what the channel sees (grey = 0)"
    return stack_rows([caption_strips(rows, tiles_per_item=per_item, width=width), text_strip(key, width)], gap=2)


# ------------------------------------------------------------------------------------ attention at card width (#17)
def attention_panel(
    columns: Sequence[torch.Tensor],
    titles: Sequence[str],
    row_labels: Sequence[str],
    *,
    tile_size: int,
    scale_high: str,
    notes: Sequence[str] = (),
    width: int = CARD_WIDTH,
    min_tile: int = 32,
) -> np.ndarray:
    """Attention maps at card width: a row per probe (labelled), a column per view (vertical titles), then the
    colour bar of the fixed attention scale (0 to ``scale_high``) and one line per note.

    When the columns would make tiles smaller than ``min_tile`` (many heads), each probe's tiles wrap into rows
    instead, each tile carrying its title in its corner, under a caption line naming the probe.

    Shape:
        columns: each (R, 3, h, w) in [0, 1]; ``len(titles) == len(columns)``, ``len(row_labels) == R``.
        Returns (H, W, 3) uint8, W <= ``width``.
    """
    label_width = 30
    side = fit_tile_side(len(columns), tile_size, width=width, left=label_width)
    if side >= min(tile_size, min_tile):
        tiles = column_tiles(columns, side)
        rows = labelled_rows([(label, tile_row(row)) for label, row in zip(row_labels, tiles)], label_width=label_width)
        parts = [vertical_header(titles, side, left=label_width), rows]
    else:
        side = min(tile_size, min_tile)
        ncol = max(1, (width - 1) // (side + 1))
        tiles = column_tiles(columns, side)
        parts = []
        for label, row in zip(row_labels, tiles):
            parts.append(text_strip(label, width))
            parts.append(numbered_grid(row, list(titles), ncol=ncol, max_side=10_000))
    parts.append(
        colour_bar(width, "inferno", "attention to a patch, in multiples of 1/patches", low="0", high=scale_high)
    )
    parts.extend(text_strip(note, width) for note in notes)
    return stack_rows(parts, gap=1)
