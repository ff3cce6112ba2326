"""ExemplarMonitor and its functional core."""

from __future__ import annotations

import pytest
import torch
from conftest import Events, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz import ExemplarMonitor
from lightning_viz.functional import exemplars as X
from lightning_viz.records import ExemplarStats, bus_for


def test_streaming_topk_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(103, 6, generator=gen)
    locations = torch.randint(0, 9, (103, 6, 2), generator=gen)
    top = X.StreamingTopK(6, k=5)
    for start in range(0, 103, 17):
        top.update(scores[start : start + 17], torch.arange(start, min(start + 17, 103)), locations[start : start + 17])
    expected = scores.T.topk(5, dim=1)
    assert torch.equal(top.ids, expected.indices)
    assert torch.allclose(top.scores, expected.values)
    for c in range(6):
        assert torch.equal(top.locations[c], locations[expected.indices[c], c])


def test_streaming_topk_with_fewer_samples_than_k():
    top = X.StreamingTopK(2, k=4)
    top.update(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([7, 8]), torch.zeros(2, 2, 2, dtype=torch.long))
    assert top.ids.tolist() == [[8, 7], [7, 8]]


def test_spatial_max_and_location():
    acts = torch.zeros(2, 3, 4, 5)
    acts[1, 2, 3, 1] = 7.0
    scores, loc = X.spatial_max(acts)
    assert scores[1, 2] == 7.0 and loc[1, 2].tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\)"):
        X.spatial_max(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "layers, size",
    [
        # r = 1 + 2 + 2 = 5; pool(2, 2): r = 6, jump 2; conv3: r = 6 + 2 * 2 = 10
        (
            [
                nn.Conv2d(1, 2, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(2, 2, 3, padding=1),
                nn.MaxPool2d(2),
                nn.Conv2d(2, 2, 3),
            ],
            10,
        ),
        # conv5 stride 2: r = 5, jump 2; dilated conv3 (d=2): r = 5 + (3 - 1) * 2 * 2 = 13
        ([nn.Conv2d(1, 2, 5, stride=2, padding=2), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, dilation=2, padding=2)], 13),
        # two 2x2 pools then conv3: r = 1 + 1 + 2 + 2 * 4 = 12
        ([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Conv2d(1, 2, 3, padding=1)], 12),
    ],
)
def test_receptive_field_matches_the_analytic_size(layers, size):
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 64, 64))
    centre = torch.tensor([[out.shape[2] // 2, out.shape[3] // 2]])
    top, left, bottom, right = X.receptive_field_boxes(model, layers[-1], (1, 64, 64), centre)[0].tolist()
    assert bottom - top == size and right - left == size
    corner = X.receptive_field_boxes(model, layers[-1], (1, 64, 64), torch.tensor([[0, 0]]))[0].tolist()
    assert corner[0] == 0 and corner[1] == 0 and corner[2] < size  # clipped at the border


def _cross_data(n: int = 60, size: int = 20, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 1, size, size, generator=gen)
    with_cross = torch.arange(n) % 6 == 0  # 10 of 60 images carry a bright cross
    centres = torch.randint(3, size - 3, (n, 2), generator=gen)
    for i in with_cross.nonzero().flatten().tolist():
        cy, cx = centres[i].tolist()
        x[i, 0, cy - 2 : cy + 3, cx] = 1.0
        x[i, 0, cy, cx - 2 : cx + 3] = 1.0
    return x, with_cross, centres


class CrossNet(nn.Module):
    """Channel 2 of ``conv`` is a bright-cross detector; the rest is random."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, padding=2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            cross = torch.full((5, 5), -0.2)
            cross[2, :] = 1.0
            cross[:, 2] = 1.0
            self.conv.weight[2, 0] = cross
            self.conv.bias[2] = -6.0

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).amax(dim=(2, 3)))


def test_planted_cross_detector_finds_the_crosses(tmp_path, pl_ns):
    x, with_cross, centres = _cross_data()
    data = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    monitor = ExemplarMonitor(layers=["model.conv"], channels=[2, 0], top_k=5, every_n_epochs=1, on_error="raise")
    trainer = pl_ns.Trainer(
        callbacks=[monitor],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1),
    )
    trainer.fit(
        make_module(pl_ns, CrossNet(), lr=0.0), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16)
    )
    latest = bus_for(trainer).latest(ExemplarStats)["model.conv"]
    ids = latest.ids[0].tolist()
    assert all(with_cross[i] for i in ids)  # the five exemplars of channel 2 all carry the cross
    for j, i in enumerate(ids):
        top, left, bottom, right = latest.boxes[j].tolist()
        cy, cx = centres[i].tolist()
        assert top <= cy < bottom and left <= cx < right  # the receptive-field crop contains the cross's centre
        assert bottom - top == 5 and right - left == 5
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("exemplars/model.conv") == [0, 1]
    image = events.image("exemplars/model.conv")
    assert image.shape[0] >= 2 * 32  # two channels, one row each
    text = events.text("exemplars/indices/model.conv")[-1][1]
    assert text.splitlines()[2].startswith(f"| 2 | {ids[0]}: ")


def test_unit_projection_is_confined_to_the_receptive_field():
    model = CrossNet().eval()
    x, with_cross, centres = _cross_data(n=6)
    i = int(with_cross.nonzero()[0])
    cy, cx = centres[i].tolist()
    proj = X.unit_projection(model, model.conv, x[i : i + 1], torch.tensor([2]), torch.tensor([[cy, cx]]))
    outside = proj.clone()
    outside[..., cy - 2 : cy + 3, cx - 2 : cx + 3] = 0
    assert proj.abs().sum() > 0 and outside.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k": 0}, ValueError, r"`top_k` must be a positive int \(>= 1\), got 0"),
        ({"channels": [1, -2]}, ValueError, r"`channels` must be non-empty non-negative indices"),
        ({"channels": 3}, TypeError, r"`channels` must be a list of indices"),
        ({"projection_rule": "lrp"}, ValueError, r"`projection_rule` must be one of \['guided', 'deconvnet'\]"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExemplarMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"layers": ["model.conv"], "channels": [4]},
            r"`channels`: index 4 is out of range for layer 'model.conv', "
            r"which has 4 channels \(0..3\)",
        ),
        ({"layers": ["model.head"]}, r"`layers`: layer 'model.head' is a Linear, whose output has no 2-D spatial map"),
        ({"layers": ["model.missing"]}, r"`layers`: the model has no layer named 'model.missing'"),
    ],
)
def test_bad_input_fails_at_setup(tmp_path, pl_ns, kwargs, match):
    x, _, _ = _cross_data(n=8)
    data = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = pl_ns.Trainer(
        callbacks=[ExemplarMonitor(**kwargs)],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(make_module(pl_ns, CrossNet()), data, data)
