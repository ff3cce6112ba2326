"""Streaming per-channel activation statistics, dead-unit masks and activation maps. Pure tensor code.

A unit is *active* where its value is > 0. For the ReLU family (``nn.ReLU``, ``nn.ReLU6``, and the outputs of layers
that feed a functional ``F.relu``, where a value <= 0 is what the ReLU turns into 0) an inactive unit is exactly a
zero, and a channel that is never active on any position of any sample is *dead*: no gradient reaches its weights,
so it stays dead. For smooth activations (GELU, SiLU, ELU, LeakyReLU...) the same counts give a *sparsity* (share of
positions <= 0) but "dead" is not defined.

Channels follow the layer: a convolution's output is (N, C, ...), a Linear's, a LayerNorm's or an attention's
(N, ..., D), e.g. (N, tokens, D) in a transformer. Statistics are per channel or hidden unit, never per token or
position. An activation module (GELU, ReLU) has no layout of its own: :func:`channel_layouts` takes it from the
layer that produces its input, the nearest layout-defining module before it in the model (``fc1`` for the GELU of a
transformer's MLP, ``bn1`` for a ResNet's ReLU), and :meth:`Layout.axis_for` checks that guess against each
output's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_viz._hooks import CallSiteRecorder
from lightning_viz._layers import resolve_layers

#: Modules that count as activations (sparsity is reported for all of them).
ACTIVATION_KINDS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
)
#: timm's own activation modules (``timm.layers.activations``, not subclasses of torch's), recognised by name so
#: that timm need not be imported: ConvNeXt and others build ``timm.layers.GELU``.
TIMM_ACTIVATION_NAMES = frozenset(
    {"GELU", "GELUTanh", "QuickGELU", "Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "HardMish"}
)

#: Activations whose inactive output is exactly zero, so a channel can be *dead*.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

#: A call site: a module's name and which of its calls within one forward pass (0-based).
Site = tuple[str, int]

#: Layers whose outputs have their hidden units last, (N, ..., D).
CHANNELS_LAST_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.MultiheadAttention) + (
    (nn.Embedding, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.Embedding,)
)
#: Layers whose outputs have their channels on axis 1, (N, C, ...).
CHANNELS_FIRST_KINDS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)
#: Modules that keep their input's layout (skipped when looking for the layer that produced an activation's input).
_LAYOUT_KEEPING: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity, *ACTIVATION_KINDS)


def _keeps_layout(module: nn.Module) -> bool:
    return isinstance(module, _LAYOUT_KEEPING) or type(module).__name__ in TIMM_ACTIVATION_NAMES


class Layout(NamedTuple):
    """Where a site's channels are: ``axis`` 1 (channels first) or -1 (last), and their number when known."""

    axis: int = 1
    width: int | None = None

    def axis_for(self, output: torch.Tensor) -> int:
        """The channel axis of ``output``: :attr:`axis`, unless only the other candidate axis has :attr:`width`
        entries (timm's ``LayerNorm2d`` is a LayerNorm that keeps (N, C, H, W))."""
        if self.width is None or output.ndim <= 2:
            return self.axis
        other = -1 if self.axis == 1 else 1
        if output.shape[self.axis] != self.width and output.shape[other] == self.width:
            return other
        return self.axis


def layer_layout(module: nn.Module) -> Layout | None:
    """The layout of a layout-defining module's output; ``None`` for others (activations, containers, ...)."""
    width_attributes = ("out_features", "embed_dim", "embedding_dim", "out_channels", "num_features", "num_channels")
    width = next((getattr(module, a) for a in width_attributes if hasattr(module, a)), None)
    if width is None and getattr(module, "normalized_shape", None):  # LayerNorm, RMSNorm
        width = module.normalized_shape[-1]
    if isinstance(module, CHANNELS_LAST_KINDS):
        return Layout(-1, None if width is None else int(width))
    if isinstance(module, CHANNELS_FIRST_KINDS):
        return Layout(1, None if width is None else int(width))
    return None


def channel_layouts(model: nn.Module, names: Sequence[str]) -> dict[str, Layout]:
    """Where the channels of each named module's output are.

    A layout-defining layer (:data:`CHANNELS_LAST_KINDS`, :data:`CHANNELS_FIRST_KINDS`) gives its own; any other
    module (an activation) takes the layout of the nearest layout-defining leaf module registered before it,
    skipping dropout, identities and other activations. Without one, channels are on axis 1.
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    order = {n: i for i, (n, _) in enumerate(leaves)}
    modules = dict(model.named_modules())
    layouts: dict[str, Layout] = {}
    for name in names:
        own = layer_layout(modules[name])
        if own is None:
            inside = [order[n] for n, _ in leaves if n.startswith(f"{name}.")]
            # a container's output comes from its last layer inside; an activation's from the one before it
            before = leaves[: max(inside) + 1] if inside else leaves[: order.get(name, 0)]
            own = next(
                (
                    layout
                    for _, m in reversed(before)
                    if not _keeps_layout(m) and (layout := layer_layout(m)) is not None
                ),
                Layout(),
            )
        layouts[name] = own
    return layouts


class ChannelStats:
    """Per-channel counters, updated batch by batch; activations themselves are never kept.

    Channels are along ``channel_axis`` of the activation: 1 for (N, C), (N, C, L), (N, C, H, W), ...; -1 for
    hidden units of tokens (N, T, D) or channels-last maps (N, H, W, C).

    Attributes (float64 tensors of shape (C,), so they can be summed across processes):
        positions: finite values seen per channel; active: values > 0; total: their sum; missing: NaN/Inf values,
        which are missing data (a diverged network), never counted as zeros: a channel is not "dead" for them.
    A bounded random sample of raw values (``sample_size``, drawn with the given generator) backs a histogram.
    """

    def __init__(
        self, sample_size: int = 4096, generator: torch.Generator | None = None, channel_axis: int = 1
    ) -> None:
        self.channel_axis = channel_axis
        self.positions: torch.Tensor | None = None
        self.active: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.missing: torch.Tensor | None = None
        self.batches = 0
        self.sample_size = sample_size
        self._generator = generator
        self._samples: list[torch.Tensor] = []
        self._sampled = 0

    @property
    def num_channels(self) -> int:
        return 0 if self.positions is None else int(self.positions.numel())

    @torch.no_grad()
    def update(self, activation: torch.Tensor) -> None:
        """Add one batch. Shape: (N, C, ...) with ``channel_axis=1``, (N, ..., C) with ``channel_axis=-1``."""
        if activation.ndim < 2:
            raise ValueError(f"activations must have shape (N, C, ...), got {tuple(activation.shape)}.")
        x = activation.detach()
        axis = self.channel_axis % x.ndim
        channels = x.shape[axis]
        dims = [d for d in range(x.ndim) if d != axis]
        per_channel = x.numel() // channels
        # Reductions accumulate in float64 inside the kernel: no float64 copy of the activation is materialised
        # (it would be 2x the activation's size at the largest layer, and show up in peak memory).
        # A NaN or Inf anywhere makes its channel's float64 sum non-finite (a float64 sum of finite float32 values
        # cannot overflow), so the sums find the missing values without a pass of their own over the activation.
        total = x.sum(dim=dims, dtype=torch.float64)
        missing = 0.0
        raw, finite = x, None
        if not bool(torch.isfinite(total).all()):  # NaN/Inf are missing values: a copy without them, only then
            finite = torch.isfinite(x)
            missing = (x.numel() // channels) - torch.count_nonzero(finite, dim=dims).double()
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
            per_channel = torch.count_nonzero(finite, dim=dims).double()  # type: ignore[assignment]
            total = x.sum(dim=dims, dtype=torch.float64)
        active = torch.count_nonzero(x > 0, dim=dims).double()
        if self.positions is None:
            self.positions = torch.zeros(channels, dtype=torch.float64, device=x.device)
            self.active = torch.zeros_like(self.positions)
            self.total = torch.zeros_like(self.positions)
            self.missing = torch.zeros_like(self.positions)
        elif channels != self.num_channels:
            raise ValueError(f"channel count changed from {self.num_channels} to {channels} between batches.")
        assert self.missing is not None
        self.positions += per_channel
        self.active += active
        self.total += total
        self.missing += missing
        self.batches += 1
        self._sample(raw if finite is None else raw[finite])

    def _sample(self, x: torch.Tensor) -> None:
        room = self.sample_size - self._sampled
        flat = x.reshape(-1)
        if room <= 0 or not flat.numel():
            return
        take = min(room, flat.numel(), max(1, self.sample_size // 8))
        index = torch.randint(0, flat.numel(), (take,), generator=self._generator).to(flat.device)
        self._samples.append(flat[index].float().cpu())
        self._sampled += take

    def counters(self) -> torch.Tensor:
        """The four counters stacked, (4, C): what a distributed sum reduces."""
        assert self.positions is not None and self.active is not None and self.total is not None
        assert self.missing is not None
        return torch.stack([self.positions, self.active, self.total, self.missing])

    def set_counters(self, counters: torch.Tensor) -> None:
        self.positions, self.active, self.total, self.missing = (c.clone() for c in counters.to(torch.float64))

    def firing_rate(self) -> torch.Tensor:
        """Share of the finite values > 0 per channel, (C,); NaN for a channel with no finite value."""
        assert self.positions is not None and self.active is not None
        rate = self.active / self.positions.clamp_min(1)
        return torch.where(self.positions > 0, rate, torch.full_like(rate, float("nan"))).float()

    def missing_fraction(self) -> float:
        """Share of the values seen that were NaN/Inf (0 for a healthy network)."""
        assert self.positions is not None and self.missing is not None
        missing = float(self.missing.sum())
        return missing / max(1.0, missing + float(self.positions.sum()))

    def sparsity(self) -> float:
        """Share of the finite values <= 0 (zeros after a ReLU) over every channel and position; NaN when none is
        finite."""
        assert self.positions is not None and self.active is not None
        seen = self.positions.sum()
        return float(1.0 - self.active.sum() / seen) if seen > 0 else float("nan")

    def mean(self) -> float:
        """Mean of the finite values; NaN when none is finite."""
        assert self.positions is not None and self.total is not None
        seen = self.positions.sum()
        return float(self.total.sum() / seen) if seen > 0 else float("nan")

    def dead_mask(self) -> torch.Tensor:
        """Channels never active on any finite value seen, (C,) bool (a channel with no finite value is not dead:
        it is unknown)."""
        assert self.active is not None and self.positions is not None
        return (self.active == 0) & (self.positions > 0)

    def known_channels(self) -> int:
        """Channels with at least one finite value (those whose deadness is known)."""
        assert self.positions is not None
        return int((self.positions > 0).sum())

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(0)


class SiteStats(dict):
    """:class:`ChannelStats` per call site (``(module name, call index)``), each created on its first output.

    Args:
        sample_size: values sampled per site for a histogram.
        seed: the k-th site created samples with a private generator seeded ``seed + k`` (never the global RNG).
        layouts: module name -> :class:`Layout` (see :func:`channel_layouts`); channels on axis 1 where missing.
    """

    def __init__(self, sample_size: int, seed: int = 0, layouts: Mapping[str, Layout] | None = None) -> None:
        super().__init__()
        self.sample_size = sample_size
        self.seed = seed
        self.layouts: dict[str, Layout] = dict(layouts or {})
        self.spatial: dict[str, None] = {}  #: modules with an (N, C, H, W) output, in the order first seen

    def add(self, site: Site, output: Any) -> None:
        """Count one output of a call site; outputs that are not tensors of shape (N, C, ...) are ignored.

        The channel axis is fixed by the site's first output (:meth:`Layout.axis_for`).
        """
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            return
        stats = self.get(site)
        if stats is None:
            if output.ndim == 4:
                self.spatial.setdefault(site[0])
            axis = self.layouts.get(site[0], Layout()).axis_for(output)
            generator = torch.Generator().manual_seed(self.seed + len(self))
            stats = self[site] = ChannelStats(self.sample_size, generator, channel_axis=axis)
        stats.update(output)


def activation_kinds(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """:data:`ACTIVATION_KINDS` and the timm activation classes (:data:`TIMM_ACTIVATION_NAMES`) used in ``model``."""
    timm = {
        type(m)
        for m in model.modules()
        if type(m).__name__ in TIMM_ACTIVATION_NAMES and type(m).__module__.startswith("timm.layers")
    }
    return ACTIVATION_KINDS + tuple(sorted(timm - set(ACTIVATION_KINDS), key=lambda k: k.__name__))


def activation_layers(
    model: nn.Module,
    layers: Sequence[str] | None,
    pre_activation_layers: Sequence[str] | None,
    count_dead: bool | None,
) -> tuple[dict[str, nn.Module], dict[str, bool]]:
    """The modules whose outputs are counted, and for each whether dead units are counted there.

    Args:
        model: the model.
        layers: names of activation modules (:func:`activation_kinds`); ``None``: all of them, unless only
            ``pre_activation_layers`` are given.
        pre_activation_layers: names of layers whose outputs feed a functional ``F.relu`` (dead units defined).
        count_dead: ``None``: where defined (:data:`RELU_FAMILY` and ``pre_activation_layers``); ``True``: required
            everywhere (``ValueError`` naming the layers where it is not defined); ``False``: nowhere.

    Returns:
        ``(modules, dead)``: name -> module in model order (activations first), name -> whether dead units count.
    """
    modules: dict[str, nn.Module] = {}
    dead: dict[str, bool] = {}
    if layers is not None or pre_activation_layers is None:
        resolved = resolve_layers(model, layers, activation_kinds(model), argument="layers", default="all")
        modules.update(resolved)
        dead.update({name: isinstance(m, RELU_FAMILY) for name, m in resolved.items()})
    if pre_activation_layers is not None:
        resolved = resolve_layers(model, pre_activation_layers, (nn.Module,), argument="pre_activation_layers")
        modules.update(resolved)
        dead.update({name: True for name in resolved})
    if count_dead is True:
        undefined = [f"{n!r} ({type(modules[n]).__name__})" for n, d in dead.items() if not d]
        if undefined:
            raise ValueError(
                "`count_dead=True`, but dead units are defined only for the ReLU family (nn.ReLU, nn.ReLU6) and "
                f"for `pre_activation_layers`; these layers are not: {', '.join(undefined)}. Use "
                "`count_dead=None` to report sparsity for them, or choose other `layers`."
            )
    elif count_dead is False:
        dead = {name: False for name in dead}
    return modules, dead


def sum_counters(stats: Mapping[Site, ChannelStats], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every site's counters by ``reduce`` of them (e.g. a sum over processes), in one call.

    The counters of all sites are packed in a sorted order into one (4, sum of C) tensor, so every process must
    hold the same sites with the same channel counts.
    """
    keys = sorted(stats)
    if not keys:
        return
    summed = reduce(torch.cat([stats[k].counters() for k in keys], dim=1))
    offset = 0
    for key in keys:
        width = stats[key].num_channels
        stats[key].set_counters(summed[:, offset : offset + width])
        offset += width


@torch.no_grad()
def site_maps(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    image: torch.Tensor,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[Site, torch.Tensor]:
    """One forward pass of ``image``; each call site's spatial output (float, on the CPU), per site.

    Args:
        layouts: module name -> :class:`Layout`; a channels-last (N, H, W, C) output is returned channels first.

    Shape:
        image: (1, C, H, W). Returns (C', H', W') per call site of ``modules`` whose output is 4-D.
    """
    captured: dict[Site, torch.Tensor] = {}
    layouts = layouts or {}

    def keep(name: str, index: int, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            axis = layouts.get(name, Layout()).axis_for(output) % 4
            captured[(name, index)] = output[0].detach().movedim(axis - 1, 0).float().cpu().clone()

    recorder = CallSiteRecorder(modules, keep)
    recorder.attach()
    try:
        model(image)
    finally:
        recorder.detach()
    return captured


def map_scale(maps: torch.Tensor, quantile: float = 0.995) -> float:
    """The colour scale of a site's maps: the ``quantile`` of its finite values, 1.0 where that is not positive.

    A high quantile, not the maximum: one hot pixel would otherwise darken every tile of the site.
    """
    finite = maps[torch.isfinite(maps)]
    scale = float(torch.quantile(finite, quantile)) if finite.numel() else 0.0
    return scale if scale > 0 else 1.0


def map_layers(monitored: Sequence[str], chosen: Sequence[str] | None = None) -> list[str]:
    """The layers whose activation maps are drawn: ``chosen`` (each one monitored), by default the first and last.

    Args:
        monitored: the monitored layer names, in model order.
        chosen: the user's ``map_layers``, or ``None``.

    Returns:
        The layer names.
    """
    names = list(monitored)
    if chosen is None:
        return names[:1] + names[-1:] if len(names) > 1 else names
    if unknown := [n for n in chosen if n not in names]:
        raise ValueError(f"`map_layers`: {unknown} are not monitored layers; choose from {names[:40]}.")
    return list(chosen)
