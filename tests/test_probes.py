"""ProbeSet: fixed probe images, chosen once and kept across a resumed run."""

from __future__ import annotations

import pytest
import torch
from conftest import make_data
from torch.utils.data import DataLoader

from lightning_viz import ProbeSet


def test_from_tensor_validates_shape_and_labels():
    probes = ProbeSet(torch.rand(3, 3, 8, 8), [0, 1, 2])
    assert len(probes) == 3 and probes.labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"float tensor of shape \(N, C, H, W\)"):
        ProbeSet(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="has 2 entries for 3 images"):
        ProbeSet(torch.rand(3, 3, 8, 8), [0, 1])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ProbeSet([[1.0]])


def test_from_dataset_indices():
    data = make_data(10)
    probes = ProbeSet.from_dataset(data, [4, 2])
    assert torch.equal(probes.images[0], data[4][0]) and probes.labels.tolist() == [int(data[4][1]), int(data[2][1])]
    with pytest.raises(ValueError, match="`indices` is empty"):
        ProbeSet.from_dataset(data, [])


def test_auto_is_deterministic_covers_classes_and_draws_no_global_rng():
    data = make_data(200, classes=4)
    state = torch.get_rng_state()
    a, b = ProbeSet.auto(6, seed=1), ProbeSet.auto(6, seed=1)
    a.resolve(data)
    b.resolve(data)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.images, b.images)
    assert set(a.labels[:4].tolist()) == {0, 1, 2, 3}
    c = ProbeSet.auto(6, seed=2)
    c.resolve(data)
    assert not torch.equal(a.images, c.images)


def test_auto_from_loader_when_dataset_is_not_indexable():
    data = make_data(20)
    probes = ProbeSet.auto(5)
    probes.resolve(None, DataLoader(data, batch_size=4))
    assert probes.images.shape == (5, 3, 16, 16) and probes.labels.shape == (5,)
    with pytest.raises(ValueError, match="no validation data"):
        ProbeSet.auto(2).resolve(None, None)
    with pytest.raises(ValueError, match="`n` must be a positive int"):
        ProbeSet.auto(0)


def test_state_dict_roundtrip():
    probes = ProbeSet.auto(4, seed=3)
    probes.resolve(make_data(50))
    restored = ProbeSet.auto(4, seed=99)
    restored.load_state_dict(probes.state_dict())
    assert torch.equal(restored.images, probes.images) and torch.equal(restored.labels, probes.labels)
    restored.resolve(make_data(50, seed=5))  # already resolved: keeps the saved probes
    assert torch.equal(restored.images, probes.images)
