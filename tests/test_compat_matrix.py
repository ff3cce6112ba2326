"""The compatibility matrix: ``default_suite()`` on the models Lightning users have.

Each model trains two epochs with the whole suite. It must finish; each monitor either writes its key output (with
values in it) or is named in the one "not applicable" line; no monitor is switched off by an error; and the trained
weights are bit-identical to those of the same run without the suite.

Torchvision's ImageNet models run at 32x32 with 4 classes (reduced ViT), on two tiny batches per epoch.
"""

from __future__ import annotations

import math
import re
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import Events, TinyCNN, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_viz as lv


def tv():
    return pytest.importorskip("torchvision.models")


class MLP(nn.Module):
    """Feature vectors (N, 24), no conv layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv1dNet(nn.Module):
    """Sequences (N, 3, 32): Conv1d layers only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv1d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv1d(8, 16, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean(-1))


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    )


# name: (builder, input shape of one sample, loss); each case takes 3-8 s on 2 CPU cores (both fits), so the whole
# matrix runs by default
MODELS = {
    "resnet18": (lambda: tv().resnet18(num_classes=4), (3, 32, 32), "ce"),
    "mobilenet_v3_small": (lambda: tv().mobilenet_v3_small(num_classes=4), (3, 32, 32), "ce"),
    "efficientnet_b0": (lambda: tv().efficientnet_b0(num_classes=4), (3, 32, 32), "ce"),
    "densenet121": (lambda: tv().densenet121(num_classes=4), (3, 32, 32), "ce"),
    "vgg11_bn": (lambda: tv().vgg11_bn(num_classes=4), (3, 32, 32), "ce"),
    "convnext_tiny": (lambda: tv().convnext_tiny(num_classes=4), (3, 32, 32), "ce"),
    "vit_b_16_reduced": (_vit, (3, 32, 32), "ce"),
    "mlp": (MLP, (24,), "ce"),
    "conv1d": (Conv1dNet, (3, 32), "ce"),
    "single_logit": (lambda: TinyCNN(num_classes=1), (3, 16, 16), "bce"),
}

# What the matrix is not about, made cheaper: these machines have 2 shared CPU cores.
CHEAPER = {
    "embedding": {"reducer": "pca"},
    "featurevis": {"steps": 4, "max_channels": 4},
    "exemplars": {"max_channels": 4, "top_k": 2},
    "saliency": {"smoothgrad_samples": 2},
}
# Known failures, each a monitor switched off with a warning while training goes on (add one here only with its
# cause; none today: FeatureVis optimises at a fixed input size, ExemplarMonitor boxes a unit without a path as the
# whole image).
KNOWN: dict[str, tuple[str, ...]] = {}  # model -> monitors known to fail on it (none today)

# The output a user looks for first, per monitor (an image tag or a scalar tag starting so).
KEY_OUTPUT = {
    "FilterMonitor": "filters/",
    "ActivationMonitor": "activations/sparsity/",
    "SaliencyMonitor": "saliency/grid",
    "EmbeddingMonitor": "embedding/",
    "ExemplarMonitor": "exemplars/",
    "FeatureVisMonitor": "featurevis/",
    "DynamicsMonitor": "dynamics/",
    "AttentionMonitor": "attention/",
    "DiagnosisMonitor": "diagnosis/",
}
#: Models with attention: the AttentionMonitor writes on them, and steps aside without a word on the others.
WITH_ATTENTION = {"vit_b_16_reduced"}


def classifier(pl_ns, model: nn.Module, loss: str = "ce", lr: float = 0.01):
    """A LightningModule training ``model`` on ``(x, y)`` batches: softmax cross-entropy (``"ce"``) or, for a
    single-logit binary classifier, the sigmoid's (``"bce"``: the targets are read as 0./1.)."""

    class Classifier(pl_ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

        def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if loss == "bce":
                return F.binary_cross_entropy_with_logits(self(x).squeeze(1), y.float())
            return F.cross_entropy(self(x), y)

        def training_step(self, batch, batch_idx):
            return self._loss(*batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self._loss(*batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return Classifier()


def _data(shape: tuple[int, ...], loss: str, n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    y = torch.randint(0, 2 if loss == "bce" else 4, (n,), generator=gen)
    return TensorDataset(x, y.float() if loss == "bce" else y)  # a binary classifier's targets are 0./1.


def _fit(pl_ns, tmp_path, name: str, callbacks: list) -> dict[str, torch.Tensor]:
    build, shape, loss = MODELS[name]
    torch.manual_seed(0)
    module = classifier(pl_ns, build(), loss)
    train = DataLoader(_data(shape, loss, 8, 0), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_data(shape, loss, 8, 1), batch_size=8)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0) if callbacks else False
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, limit_val_batches=1))
    trainer.fit(module, train, val)
    assert trainer.current_epoch == 2  # it finished
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _has_values(events: Events, prefix: str) -> bool:
    images = [t for t in events.tags["images"] if t.startswith(prefix)]
    scalars = [t for t in events.tags["scalars"] if t.startswith(prefix)]
    if any(events.image(t).size and events.image(t).std() > 0 for t in images):
        return True  # an image with something drawn on it
    return any(all(math.isfinite(v) for _, v in events.scalars(t)) and events.scalars(t) for t in scalars)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_suite_on_the_models_users_have(tmp_path, pl_ns, name):
    started = time.perf_counter()
    without = _fit(pl_ns, tmp_path / "plain", name, [])
    # budget=None: every monitor runs on every model at its own cadence (a budget would leave the expensive ones out
    # of a 2-epoch run of 2 batches, and the matrix would not see them fail); the budget's choices: tests/test_budget.py
    suite = lv.default_suite(budget=None, **CHEAPER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_suite = _fit(pl_ns, tmp_path, name, suite)
    said = [str(w.message) for w in caught]
    assert with_suite.keys() == without.keys()
    changed = [k for k in without if not torch.equal(with_suite[k], without[k])]
    assert not changed, f"{name}: the suite changed the training of {changed[:5]}"

    failed = [m for m in said if "switched off" in m or "cannot call your model" in m or "do not match" in m]
    failed = [m for m in failed if not any(m.startswith(f"{known}:") for known in KNOWN.get(name, ()))]
    assert not failed, failed
    aside = [m for m in said if "not applicable to this run" in m]
    assert len(aside) <= 1, aside  # one line for all of them
    events = Events(str(tmp_path / "run"))
    for monitor in suite:
        monitor_name = type(monitor).__name__
        stepped_aside = bool(aside) and re.search(rf"\b{monitor_name}\b(?!'s)", aside[0]) is not None  # not a part
        known = monitor_name in KNOWN.get(name, ())
        if monitor_name == "AttentionMonitor" and name not in WITH_ATTENTION:
            assert not _has_values(events, "attention/"), name  # nothing to show on a model without attention
            continue
        assert known or stepped_aside or _has_values(events, KEY_OUTPUT[monitor_name]), (name, monitor_name, aside)
    print(f"{name}: {time.perf_counter() - started:.1f} s")
