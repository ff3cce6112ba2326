"""Wrong configurations and inputs across the suite: each gives a clear message, and no training run is lost.

Construction errors happen before a Trainer exists; set-up errors happen in ``setup``, before the first step
(``global_step == 0``: nothing was trained, so nothing is lost); run-time trouble warns once and training finishes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinyCNN, loaders, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_viz as lv

CONSTRUCTION = [
    (lambda: lv.FilterMonitor(every_n_epochs=0), ValueError, r"`every_n_epochs` must be a positive int"),
    (lambda: lv.FilterMonitor(on_error="ignore"), ValueError, r"`on_error` must be one of"),
    (lambda: lv.FilterMonitor(scale=0.0), ValueError, r"`scale` must be 'running_max' or a positive"),
    (lambda: lv.FilterMonitor(layers="conv1"), TypeError, r"`layers` must be a list of layer names"),
    (lambda: lv.FilterMonitor(max_filters=-1), ValueError, r"`max_filters`"),
    (lambda: lv.ActivationMonitor(max_batches=0), ValueError, r"`max_batches`"),
    (lambda: lv.ActivationMonitor(count_dead="yes"), TypeError, r"`count_dead`"),
    (lambda: lv.SaliencyMonitor(methods=["gradient", "shap"]), ValueError, r"`methods`: unknown name\(s\) \['shap'\]"),
    (lambda: lv.SaliencyMonitor(noise_level=-1), ValueError, r"`noise_level` must be in \[0.0, inf\], got -1"),
    (lambda: lv.SaliencyMonitor(occlusion_stride=0), ValueError, r"`occlusion_stride`"),
    (lambda: lv.SaliencyMonitor(probes="images"), TypeError, r"`probes` must be a lightning_viz.ProbeSet"),
    (lambda: lv.EmbeddingMonitor(reducer="mds"), ValueError, r"`reducer` must be one of"),
    (lambda: lv.EmbeddingMonitor(subset_size=1), ValueError, r"`subset_size` must be an int >= 2, got 1"),
    (lambda: lv.ExemplarMonitor(top_k=0), ValueError, r"`top_k` must be a positive int"),
    (lambda: lv.ExemplarMonitor(channels=[-1]), ValueError, r"`channels` must be non-empty non-negative"),
    (lambda: lv.FeatureVisMonitor(objective="entropy"), ValueError, r"`objective` must be one of"),
    (lambda: lv.FeatureVisMonitor(image_size=8), ValueError, r"`image_size` must be an int >= "),
    (lambda: lv.FeatureVisMonitor(lr=-0.1), ValueError, r"`lr` must be in \(0.0, inf\], got -0.1"),
    (lambda: lv.DiagnosisMonitor(dead_threshold=2.0), ValueError, r"`dead_threshold` must be in"),
    (lambda: lv.DiagnosisMonitor(overfit_patience=0), ValueError, r"`overfit_patience`"),
    (lambda: lv.ProbeSet(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), ValueError, r"float tensor of shape"),
    (lambda: lv.ProbeSet.auto(0), ValueError, r"`n` must be a positive int"),
    (lambda: lv.default_suite(filter={}), TypeError, r"unknown option\(s\) \['filter'\]"),
]


@pytest.mark.parametrize("make, error, match", CONSTRUCTION)
def test_construction_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


SETUP = [
    (
        lambda: lv.FilterMonitor(layers=["model.conv9"]),
        r"`layers`: the model has no layer named 'model.conv9'. Its "
        r"nn.Conv2d layers are: \['model.conv1', 'model.conv2'\]",
    ),
    (lambda: lv.FilterMonitor(layers=["model.fc"]), r"layer 'model.fc' is a Linear, not a nn.Conv2d"),
    (lambda: lv.ActivationMonitor(layers=["model.conv1"]), r"layer 'model.conv1' is a Conv2d, not a nn.ReLU"),
    (lambda: lv.SaliencyMonitor(gradcam_layer="model.fc"), r"`gradcam_layer`: layer 'model.fc' is a Linear"),
    (
        lambda: lv.SaliencyMonitor(probes=lv.ProbeSet(torch.zeros(2, 1, 16, 16))),
        r"`probes`: the images have 1 "
        r"channels, but the model's first conv layer expects 3",
    ),
    (
        lambda: lv.SaliencyMonitor(probes=lv.ProbeSet(torch.zeros(2, 3, 16, 16)), occlusion_window=20),
        r"`occlusion_window`=20 is larger than the probe images \(16x16\)",
    ),
    (lambda: lv.EmbeddingMonitor(layer="model.nope"), r"`layer`: the model has no layer named 'model.nope'"),
    (lambda: lv.ExemplarMonitor(layers=["model.conv2"], channels=[99]), r"`channels`: index 99 is out of range"),
    (lambda: lv.ExemplarMonitor(layers=["model.fc"]), r"whose output has no 2-D spatial map"),
    (lambda: lv.FeatureVisMonitor(channels=[99]), r"`channels`: index 99 is out of range"),
    (lambda: lv.FilterMonitor(), r"has no logger"),  # logger=False below
]


@pytest.mark.parametrize("make, match", SETUP)
def test_setup_errors_come_before_any_training(tmp_path, pl_ns, make, match):
    train, val = loaders(n=32)
    no_logger = match == r"has no logger"
    trainer = pl_ns.Trainer(
        callbacks=[make()],
        logger=False if no_logger else pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    assert trainer.global_step == 0  # failed fast: no training was lost


def _unlabelled_loader():
    data = torch.randn(16, 3, 16, 16)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    return DataLoader(Images(), batch_size=8)


WARNINGS = [
    (
        "subset larger than the data",
        lambda: lv.EmbeddingMonitor(reducer="pca", subset_size=10_000),
        r"using all of them",
        None,
    ),
    (
        "empty validation loader",
        lambda: lv.ActivationMonitor(),
        r"no validation batch ran",
        DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), batch_size=4),
    ),
    (
        "no ReLU modules for guided backprop",
        lambda: lv.SaliencyMonitor(occlusion_window=4),
        r"no nn.ReLU modules",
        "gelu",
    ),
    (
        "a visualisation failing at run time",
        lambda: lv.FeatureVisMonitor(layers=["model.fc"], steps=1),
        r"switched off",
        None,
    ),
]


@pytest.mark.parametrize("what, make, match, extra", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_runtime_trouble_warns_once_and_training_finishes(tmp_path, pl_ns, what, make, match, extra):
    train, val = loaders(n=32)
    model = TinyCNN()
    if extra == "gelu":
        model.relu1, model.relu2 = nn.GELU(), nn.GELU()
    elif extra is not None:
        val = extra
    trainer = pl_ns.Trainer(
        callbacks=[make()], logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(make_module(pl_ns, model), train, val)
    import re

    assert sum(bool(re.search(match, str(w.message))) for w in record) == 1, [str(w.message) for w in record]
    assert trainer.current_epoch == 2


def test_the_matrix_is_large():
    assert len(CONSTRUCTION) + len(SETUP) + len(WARNINGS) >= 25
