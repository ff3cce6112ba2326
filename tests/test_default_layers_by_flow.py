"""Default layers are chosen by data flow, not registration order (issue 14, section 4).

Each model registers a conv before its stem (an auxiliary head, a decoder, a layer never called): the FilterMonitor's
default layer is the first conv the input reaches, whether the sample to trace comes from the sanity check, from the
first validation pass or (no validation) from the first training batch; its distance from init starts at 0.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_monitor, loaders
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz import FilterMonitor


class AuxFirst(nn.Module):
    """An auxiliary reconstruction conv, registered first, applied to the features on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(8, 3, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.reconstruction: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        self.reconstruction = self.aux(h)  # read by an auxiliary loss elsewhere; not on the way to the logits
        return self.fc(h.mean(dim=(2, 3)))


class DecoderFirst(nn.Module):
    """A decoder conv registered before the encoder's stem, on the way to the output, but called after it."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Conv2d(8, 4, 3, padding=1)
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).mean(dim=(2, 3))


class UnusedFirst(nn.Module):
    """A conv left over in ``__init__`` and never called, registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.legacy = nn.Conv2d(3, 4, 5)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


CASES = {
    "aux_first": (AuxFirst, "model.stem"),
    "decoder_first": (DecoderFirst, "model.encoder.0"),
    "unused_first": (UnusedFirst, "model.features.0"),
}


@pytest.mark.parametrize(
    "name, where",
    [("aux_first", "sanity"), ("decoder_first", "validation"), ("unused_first", "training"), ("aux_first", "training")],
)
def test_filter_default_is_the_first_conv_the_input_reaches(tmp_path, pl_ns, name, where):
    build, stem = CASES[name]
    train, val = loaders(n=32)
    kwargs = {"num_sanity_val_steps": 1} if where == "sanity" else {}
    if where == "training":
        val, kwargs = None, {"limit_val_batches": 0}
    _, events = fit_monitor(pl_ns, tmp_path, FilterMonitor(), build(), train=train, val=val, **kwargs)
    shown = sorted(t for t in events.tags["images"] if t.startswith("filters/") and "filmstrip" not in t)
    assert shown == [f"filters/{stem}"], shown
    assert events.image_steps(f"filters/{stem}")[0] == 0  # the step-0 view of the right layer
    distance = events.scalars(f"filters/distance_from_init/{stem}")
    assert distance[0] == (0, 0.0) and distance[-1][1] > 0


class FlatInput(nn.Module):
    """Vectors (N, 48) reshaped to images inside: no batch holds an image to trace with."""

    def __init__(self) -> None:
        super().__init__()
        self.head_conv = nn.Conv2d(8, 8, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_conv(F.relu(self.stem(x.view(-1, 3, 4, 4)))).mean(dim=(2, 3)))


def test_without_a_sample_to_trace_the_first_registered_conv_is_shown_and_said(tmp_path, pl_ns, caplog):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 48, generator=gen), torch.randint(0, 4, (32,), generator=gen))
    train, val = DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
    with caplog.at_level(logging.INFO, logger="lightning_viz"):
        _, events = fit_monitor(pl_ns, tmp_path, FilterMonitor(), FlatInput(), train=train, val=val)
    said = [r.getMessage() for r in caplog.records if "FilterMonitor shows the first registered" in r.getMessage()]
    assert len(said) == 1 and "'model.head_conv'" in said[0] and "layers=" in said[0], said
    assert "filters/model.head_conv" in events.tags["images"]
    assert events.scalars("filters/distance_from_init/model.head_conv")[0] == (0, 0.0)


def test_named_layers_are_kept_as_given(tmp_path, pl_ns):
    _, events = fit_monitor(pl_ns, tmp_path, FilterMonitor(layers=["model.aux"]), AuxFirst(), n=32)
    assert [t for t in events.tags["images"] if t.startswith("filters/model.")] == ["filters/model.aux"]
