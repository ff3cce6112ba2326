"""Streaming per-channel activation statistics, dead-unit masks and activation-map tiles. Pure tensor code.

A unit is *active* where its value is > 0. For the ReLU family (``nn.ReLU``, ``nn.ReLU6``, and the outputs of layers
that feed a functional ``F.relu``, where a value <= 0 is what the ReLU turns into 0) an inactive unit is exactly a
zero, and a channel that is never active on any position of any sample is *dead*: no gradient reaches its weights,
so it stays dead. For smooth activations (GELU, SiLU, ELU, LeakyReLU...) the same counts give a *sparsity* (share of
positions <= 0) but "dead" is not defined.
"""

from __future__ import annotations

import torch

from lightning_viz import render


class ChannelStats:
    """Per-channel counters, updated batch by batch; activations themselves are never kept.

    Channels are along dimension 1 of the activation: (N, C), (N, C, L), (N, C, H, W), ...

    Attributes (float64 tensors of shape (C,), so they can be summed across processes):
        positions: values seen per channel; active: values > 0; total: their sum.
    A bounded random sample of raw values (``sample_size``, drawn with the given generator) backs a histogram.
    """

    def __init__(self, sample_size: int = 4096, generator: torch.Generator | None = None) -> None:
        self.positions: torch.Tensor | None = None
        self.active: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
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
        """Add one batch. Shape: (N, C, ...)."""
        if activation.ndim < 2:
            raise ValueError(f"activations must have shape (N, C, ...), got {tuple(activation.shape)}.")
        x = activation.detach()
        channels = x.shape[1]
        dims = [0, *range(2, x.ndim)]
        per_channel = x.numel() // channels
        # Reductions accumulate in float64 inside the kernel: no float64 copy of the activation is materialised
        # (it would be 2x the activation's size at the largest layer, and show up in peak memory).
        active = torch.count_nonzero(x > 0, dim=dims).double()
        total = x.sum(dim=dims, dtype=torch.float64)
        if self.positions is None:
            self.positions = torch.zeros(channels, dtype=torch.float64, device=x.device)
            self.active = torch.zeros_like(self.positions)
            self.total = torch.zeros_like(self.positions)
        elif channels != self.num_channels:
            raise ValueError(f"channel count changed from {self.num_channels} to {channels} between batches.")
        self.positions += per_channel
        self.active += active
        self.total += total
        self.batches += 1
        self._sample(x)

    def _sample(self, x: torch.Tensor) -> None:
        room = self.sample_size - self._sampled
        if room <= 0:
            return
        flat = x.reshape(-1)
        take = min(room, flat.numel(), max(1, self.sample_size // 8))
        index = torch.randint(0, flat.numel(), (take,), generator=self._generator).to(flat.device)
        self._samples.append(flat[index].float().cpu())
        self._sampled += take

    def counters(self) -> torch.Tensor:
        """The three counters stacked, (3, C): what a distributed sum reduces."""
        assert self.positions is not None and self.active is not None and self.total is not None
        return torch.stack([self.positions, self.active, self.total])

    def set_counters(self, counters: torch.Tensor) -> None:
        self.positions, self.active, self.total = (c.clone() for c in counters.to(torch.float64))

    def firing_rate(self) -> torch.Tensor:
        """Share of values > 0 per channel, (C,)."""
        assert self.positions is not None and self.active is not None
        return (self.active / self.positions.clamp_min(1)).float()

    def sparsity(self) -> float:
        """Share of all values <= 0 (zeros after a ReLU) over every channel and position."""
        assert self.positions is not None and self.active is not None
        return float(1.0 - self.active.sum() / self.positions.sum().clamp_min(1))

    def mean(self) -> float:
        assert self.positions is not None and self.total is not None
        return float(self.total.sum() / self.positions.sum().clamp_min(1))

    def dead_mask(self) -> torch.Tensor:
        """Channels never active on any value seen, (C,) bool."""
        assert self.active is not None
        return self.active == 0

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(0)


@torch.no_grad()
def activation_tiles(maps: torch.Tensor, scale: float, dead: torch.Tensor | None = None) -> torch.Tensor:
    """One colour tile per channel on a common scale (0 -> dark, ``scale`` -> bright); dead channels framed in red.

    Shape:
        maps: (C, H, W); dead: (C,) bool. Returns (C, 3, H + 2, W + 2) in [0, 1] (a 1-pixel frame around each tile).
    """
    if maps.ndim != 3:
        raise ValueError(f"`maps` must have shape (C, H, W), got {tuple(maps.shape)}.")
    values = (maps.detach().float().cpu() / max(scale, 1e-12)).clamp(0, 1)
    tiles = render.apply_colormap(values, "inferno")
    framed = torch.ones(tiles.shape[0], 3, tiles.shape[2] + 2, tiles.shape[3] + 2) * 0.5
    if dead is not None:
        framed[dead.cpu()] = torch.tensor([0.9, 0.0, 0.0]).view(3, 1, 1)
    framed[:, :, 1:-1, 1:-1] = tiles
    return framed
