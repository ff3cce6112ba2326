"""Inputs (issue 14, section 4): ProbeSet.from_dataset reads samples as the monitors read batches, and a model's
other inputs follow each row the monitors compute (a probe, its noisy and occluded copies, a kept sample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_viz as lv
from lightning_viz._hooks import _OUR_PASSES
from lightning_viz._inputs import extra_for_rows, model_inputs, source_rows


class Items(Dataset):
    """16 samples of 3x16x16 images in the layout users have; the image's channel 0 is offset by its domain."""

    def __init__(self, layout: str, n: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.layout, self.y = layout, torch.randint(0, 4, (n,), generator=gen)
        self.domain = torch.arange(n) % 2
        self.x = torch.randn(n, 3, 16, 16, generator=gen)
        self.x[:, 0] += 3.0 * (2 * self.domain[:, None, None] - 1)  # what the image shows says its domain

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x, y = self.x[i], int(self.y[i])
        return {
            "path": lambda: (f"images/{i:04d}.png", x, y),
            "dict": lambda: {"image": x, "label": y, "id": i},
            "hf": lambda: {"pixel_values": x.numpy(), "labels": y},
            "pair": lambda: (x, y),
            "two": lambda: (x, self.domain[i], y),
        }[self.layout]()


def two_inputs(batch):
    return (batch[0], batch[1]), batch[2]


@pytest.mark.parametrize("layout", ["path", "dict", "hf", "pair"])
def test_from_dataset_reads_samples_as_the_monitors_read_batches(layout):
    data = Items(layout)
    probes = lv.ProbeSet.from_dataset(data, [5, 2, 9])
    assert torch.equal(probes.images, data.x[[5, 2, 9]])
    assert probes.labels.tolist() == data.y[[5, 2, 9]].tolist()
    assert probes.extra_inputs == ()


def test_from_dataset_keeps_each_probes_other_inputs_and_names_the_fix_when_it_cannot_read():
    data = Items("two")
    probes = lv.ProbeSet.from_dataset(data, [3, 0, 6], input_fn=two_inputs)
    assert probes.labels.tolist() == data.y[[3, 0, 6]].tolist()
    assert [e.tolist() for e in probes.extra_inputs] == [[1, 0, 0]]
    restored = lv.ProbeSet()
    restored.load_state_dict(probes.state_dict())
    assert torch.equal(restored.extra_inputs[0], probes.extra_inputs[0])
    with pytest.raises(ValueError, match=r"has no floating-point tensor.*input_fn="):
        lv.ProbeSet.from_dataset([("a.png", 1), ("b.png", 2)], [0, 1])
    with pytest.raises(ValueError, match=r"`extra_inputs` must be tensors of 2 rows"):
        lv.ProbeSet(torch.zeros(2, 3, 4, 4), extra_inputs=(torch.zeros(3),))


def test_each_row_gets_the_other_inputs_of_the_sample_it_was_made_from():
    gen = torch.Generator().manual_seed(0)
    kept, domain = torch.randn(6, 3, 16, 16, generator=gen), torch.tensor([10, 11, 12, 13, 14, 15])
    noisy = kept[[4, 1]] + 0.3 * torch.randn(2, 3, 16, 16, generator=gen)  # SmoothGrad's copies
    occluded = kept[[2, 5, 0]].clone()
    occluded[:, :, 4:10, 4:10] = 0  # occlusion windows
    unrelated = torch.rand(2, 3, 16, 16, generator=gen) * 10  # feature visualisation's images
    assert source_rows(kept[[3, 3, 0]], kept).tolist() == [3, 3, 0]
    assert source_rows(noisy, kept).tolist() == [4, 1]
    assert source_rows(occluded, kept).tolist() == [2, 5, 0]
    assert source_rows(unrelated, kept).tolist() == [0, 0]  # the first sample's
    assert extra_for_rows(occluded, (domain,), kept)[0].tolist() == [12, 15, 10]
    assert extra_for_rows(noisy, (domain[:1],))[0].tolist() == [10, 10]  # without rows: one value for all

    class Echo(nn.Module):
        def forward(self, x, d):
            return x.mean(dim=(1, 2, 3)) * 0 + d

    model = Echo()
    with model_inputs(model, (domain.float(),), kept):
        assert model(torch.cat([noisy, occluded])).tolist() == [14, 11, 12, 15, 10]


ROWS_SEEN: list[bool] = []


class DomainCheck(nn.Module):
    """A CNN with a second input; records, for every row it is called with, whether that input is the row's own
    (the domain its image shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn, self.embed = TinyCNN(), nn.Embedding(2, 4)

    def forward(self, x, d):
        if _OUR_PASSES[0]:  # our passes only (the Trainer's own are right by construction)
            shown = (x[:, 0].float().mean(dim=(1, 2)) > 0).long()
            ROWS_SEEN.extend((shown == d).tolist())  # (a list of the module's own would be copied with it)
        return self.cnn(x) + self.embed(d)


def _fit(pl_ns, tmp_path, callbacks):
    class Module(pl_ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = DomainCheck()

        def forward(self, x, d):
            return self.model(x, d)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0], batch[1]), batch[2])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0], batch[1]), batch[2]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    module = Module()
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    train = DataLoader(Items("two"), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    ROWS_SEEN.clear()
    trainer.fit(module, train, DataLoader(Items("two", seed=1), batch_size=8))
    return list(ROWS_SEEN)


@pytest.mark.parametrize("probes", ["taken", "ProbeSet(extra_inputs=)", "from_dataset"])
def test_a_second_input_follows_every_row_of_our_passes(tmp_path, pl_ns, probes):
    data = Items("two", seed=1)
    given = {
        "taken": None,
        "ProbeSet(extra_inputs=)": lv.ProbeSet(data.x[:4], data.y[:4], extra_inputs=(data.domain[:4],)),
        "from_dataset": lv.ProbeSet.from_dataset(data, [7, 2, 5], input_fn=two_inputs),
    }[probes]
    saliency = lv.SaliencyMonitor(
        input_fn=two_inputs, probes=given, methods=("gradient", "smoothgrad", "occlusion"), smoothgrad_samples=2
    )
    embedding = lv.EmbeddingMonitor(input_fn=two_inputs, reducer="pca")
    seen = _fit(pl_ns, tmp_path, [saliency, embedding])
    assert len(seen) > 40 and all(seen), f"{seen.count(False)} of {len(seen)} rows had another sample's input"


def test_explicit_probes_on_a_second_input_model_name_the_cause_and_the_fix(tmp_path, pl_ns):
    data = Items("two", seed=1)
    saliency = lv.SaliencyMonitor(input_fn=two_inputs, probes=lv.ProbeSet(data.x[:4], data.y[:4]))
    with pytest.raises(ValueError, match=r"takes more inputs than the image") as info:
        _fit(pl_ns, tmp_path, [saliency])
    for fix in ("extra_inputs=", "ProbeSet.from_dataset", "input_fn="):
        assert fix in str(info.value)
    assert not np.char.startswith(str(info.value), "`probes`: the model cannot take")
