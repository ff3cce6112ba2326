"""Planted training-dynamics faults (issue #16) for ``benchmarks/diagnosis.py --dynamics``.

Each run trains a tiny model for a few seconds on CPU with one planted fault (or none), with the callbacks the
diagnosis reads in ``default_suite`` (ActivationMonitor, DynamicsMonitor, DiagnosisMonitor), and compares the
findings of the final panel (and of any epoch) with the plant. At least three plants per finding, on different
models and settings:

=====================  ==========================================================================================
finding                plants
=====================  ==========================================================================================
vanishing_gradients    deep sigmoid MLP (SGD); deep sigmoid CNN without BatchNorm; deep tanh MLP with a small
                       initialisation
exploding_gradients    an ``ExponentialLR`` whose gamma is > 1 (a typo for 0.x) without clipping: ResNet, a
                       narrower ResNet with gamma 3, a residual MLP (SGD). In plain ReLU nets the units die and the loss
                       blows up without the sampled gradients growing first: that is the divergence finding
                       (``benchmarks/diagnosis.py``)
unchanged_weights      a layer left out of the optimizer; an lr-0 param group; a layer used through ``.detach()``
batchnorm_mismatch     BatchNorm momentum 0.001 on inputs off zero (CNN, ResNet); BatchNorm buffers frozen at
                       their initial values (momentum 0) in an MLP; torchvision mobilenet_v3_small (``--mobilenet``)
saturated_activations  tanh MLP with 10x initial weights; tanh CNN with 10x weights; hardtanh MLP on unscaled
                       inputs
initial_loss           last layer's weights x100; unnormalised inputs (x40) into a CNN without BatchNorm; a last
                       bias that makes one class certain
oscillating_loss       a restart every other epoch to a learning rate far too high: SGD MLP, SGD CNN with
                       BatchNorm, Adam MLP
healthy                sensible settings: CNN+BN (SGD), MLP (Adam), ResNet (SGD, cosine), CNN (Adam), tanh MLP
                       with Xavier init (Adam), shallow sigmoid MLP (Adam), CNN+BN with SGDR warm restarts every 2
                       epochs (per step), MLP with batches of 4 (SGD: a noisy loss)
=====================  ==========================================================================================

Data: scikit-learn's 8x8 digits, standardised (75 % train, 25 % validation, split by the seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_viz
from lightning_viz import diagnosis_rules as R
from lightning_viz.callbacks.diagnosis_monitor import DiagnosisMonitor

KINDS = R.KINDS


# ------------------------------------------------------------------------------------------------------ models
def mlp(act: Callable[[], nn.Module], depth: int = 2, width: int = 32, bn: bool = False, bn_momentum=0.1):
    layers: list[nn.Module] = [nn.Flatten()]
    c = 64
    for _ in range(depth):
        layers += [nn.Linear(c, width), *([nn.BatchNorm1d(width, momentum=bn_momentum)] if bn else []), act()]
        c = width
    return nn.Sequential(*layers, nn.Linear(c, 10))


def cnn(act: Callable[[], nn.Module] = nn.ReLU, depth: int = 2, width: int = 16, bn: bool = False, bn_momentum=0.1):
    layers: list[nn.Module] = []
    c = 1
    for i in range(depth):
        bn_layer = [nn.BatchNorm2d(width, momentum=bn_momentum)] if bn else []
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=not bn), *bn_layer, act()]
        if i in (0, 1):
            layers.append(nn.MaxPool2d(2))
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class Block(nn.Module):
    def __init__(self, c: int, momentum: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, momentum=momentum)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, momentum=momentum)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def resnet(width: int = 12, momentum: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(),
        Block(width, momentum),
        nn.MaxPool2d(2),
        Block(width, momentum),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


class ResMLP(nn.Module):
    """An MLP with two residual blocks (Linear, BatchNorm, ReLU)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(64, width), nn.Linear(width, 10)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def scaled(model: nn.Module, factor: float, which: str = "hidden") -> nn.Module:
    """Multiply the weights of the hidden layers (or the ``"last"`` layer) by ``factor``."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in layers[-1:] if which == "last" else layers[:-1]:
            m.weight.mul_(factor)
    return model


def xavier(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def certain_bias(model: nn.Module) -> nn.Module:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.zero_()
        last.bias[0] = 12.0
    return model


class Detached(nn.Module):
    """An MLP whose middle layer feeds the head through ``.detach()``: its weights never get a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(64, 10)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x.flatten(1)))
        return self.out(torch.cat([h, self.act(self.mid(h)).detach()], dim=1))


# ------------------------------------------------------------------------------------------------------ module
@dataclass
class Plant:
    plant: str
    name: str
    build: Callable[[], nn.Module]
    lr: float
    epochs: int = 6
    optimiser: str = "sgd"
    schedule: str = "constant"  # "cosine", "exp" (gamma > 1), "restarts"
    gamma: float = 4.0
    input_scale: float = 1.0
    input_shift: float = 0.0
    optimise: str = "all"  # "skip_last_hidden", "lr0_first"
    batch_size: int = 32
    seed: int = 0
    expected: set[str] = field(default_factory=set)

    def label(self) -> str:
        return f"{self.plant}/{self.name}/s{self.seed}"


class Module(pl.LightningModule):
    def __init__(self, model: nn.Module, plant: Plant, steps: int) -> None:
        super().__init__()
        self.model, self.plant, self.steps = model, plant, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.plant.input_scale + self.plant.input_shift)

    def training_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # noqa: D102
        p = self.plant
        layers = [m for m in self.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        params: list = list(self.model.parameters())
        if p.optimise == "skip_last_hidden":
            skip = {id(q) for q in layers[-2].parameters()}
            params = [q for q in params if id(q) not in skip]
        elif p.optimise == "lr0_first":
            first = {id(q) for q in layers[0].parameters()}
            params = [
                {"params": [q for q in params if id(q) in first], "lr": 0.0},
                {"params": [q for q in params if id(q) not in first]},
            ]
        if p.optimiser == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=p.lr)
        else:
            opt = torch.optim.SGD(params, lr=p.lr, momentum=0.9)
        if p.schedule == "warm_restarts":  # intended: SGDR, a restart to a sensible peak every 2 epochs, per step
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2 * self.steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if p.schedule == "cosine":
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.epochs)}
        if p.schedule == "exp":  # stepped per epoch: gamma > 1 (meant 0.x) multiplies the lr every epoch
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, p.gamma)}
        if p.schedule == "restarts":  # a restart to a peak far too high every other epoch, a tiny lr in between
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch % 2 == 0 else 0.01)
            return {"optimizer": opt, "lr_scheduler": sched}
        return opt


class Recorder(DiagnosisMonitor):
    """The DiagnosisMonitor, keeping the kinds it raised at any epoch."""

    def _announce(self, trainer, findings, epoch):  # noqa: D102
        self.any_epoch = getattr(self, "any_epoch", set()) | {f.kind for f in findings}
        super()._announce(trainer, findings, epoch)


_DIGITS: list[tuple[torch.Tensor, torch.Tensor]] = []


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    if not _DIGITS:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        _DIGITS.append(((x - 0.5) / 0.5, torch.tensor(data.target)))
    return _DIGITS[0]


def quiet_trainer(logdir: str, name: str, callbacks: list, **kwargs) -> pl.Trainer:
    """A CPU Trainer for a short planted run: no checkpoints, progress bar, summary or sanity check."""
    return pl.Trainer(
        logger=TensorBoardLogger(logdir, name=name.replace("/", "_")),
        callbacks=callbacks,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        **kwargs,
    )


def run(p: Plant, logdir: str) -> tuple[set[str], set[str], Recorder]:
    """Train one planted run; returns (kinds in the final panel, kinds raised at any epoch, the monitor)."""
    pl.seed_everything(p.seed, workers=False, verbose=False)
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(p.seed))
    n_val = len(x) // 4
    train = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    val = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
    loader = DataLoader(train, batch_size=p.batch_size, shuffle=True, generator=torch.Generator().manual_seed(p.seed))
    diagnosis = Recorder()
    callbacks = [lightning_viz.ActivationMonitor(max_batches=4), lightning_viz.DynamicsMonitor(), diagnosis]
    trainer = quiet_trainer(logdir, p.label(), callbacks, max_epochs=p.epochs)
    trainer.fit(Module(p.build(), p, len(loader)), loader, DataLoader(val, batch_size=256))
    return {f.kind for f in diagnosis.findings}, getattr(diagnosis, "any_epoch", set()), diagnosis


# ------------------------------------------------------------------------------------------------------- plan
def plan(seeds: list[int]) -> list[Plant]:
    out: list[Plant] = []
    for s in seeds:
        block = [
            # healthy
            Plant("healthy", "cnn_bn-sgd", lambda: cnn(bn=True), 0.05),
            Plant("healthy", "mlp-adam", lambda: mlp(nn.ReLU, width=64), 1e-3, optimiser="adam"),
            Plant("healthy", "resnet-sgd-cosine", lambda: resnet(), 0.05, schedule="cosine"),
            Plant("healthy", "cnn-adam", lambda: cnn(), 2e-3, optimiser="adam", epochs=10),
            Plant("healthy", "tanh_mlp-xavier-adam", lambda: xavier(mlp(nn.Tanh)), 1e-3, optimiser="adam"),
            Plant("healthy", "sigmoid_mlp-adam", lambda: mlp(nn.Sigmoid, depth=1, width=64), 3e-3, optimiser="adam"),
            Plant("healthy", "cnn_bn-sgd-warm_restarts", lambda: cnn(bn=True), 0.05, schedule="warm_restarts",
                  epochs=8),
            Plant("healthy", "mlp-sgd-batch4", lambda: mlp(nn.ReLU), 0.01, batch_size=4, epochs=8),
            # vanishing gradients
            Plant("vanishing_gradients", "deep_sigmoid_mlp", lambda: mlp(nn.Sigmoid, depth=10), 0.05),
            Plant("vanishing_gradients", "deep_sigmoid_cnn", lambda: cnn(nn.Sigmoid, depth=6, width=8), 0.02),
            Plant("vanishing_gradients", "deep_tanh_mlp-small_init", lambda: scaled(mlp(nn.Tanh, 8), 0.3), 0.02),
            # exploding gradients: ExponentialLR(gamma > 1)
            Plant("exploding_gradients", "resnet-sgd-exp_lr", lambda: resnet(), 0.01, schedule="exp", epochs=8),
            Plant("exploding_gradients", "resnet8-sgd-exp_lr3", lambda: resnet(width=8), 0.02, schedule="exp",
                  gamma=3.0, epochs=8),
            Plant("exploding_gradients", "resmlp-sgd-exp_lr", ResMLP, 0.01, schedule="exp", epochs=8),
            # unchanged weights
            Plant("unchanged_weights", "mlp-left_out", lambda: mlp(nn.ReLU), 0.05, optimise="skip_last_hidden"),
            Plant("unchanged_weights", "cnn-lr0_group", lambda: cnn(), 2e-3, optimiser="adam", optimise="lr0_first"),
            Plant("unchanged_weights", "mlp-detached", Detached, 0.05),
            # BatchNorm mismatch
            Plant("batchnorm_mismatch", "cnn_bn-momentum1e-3", lambda: cnn(bn=True, bn_momentum=1e-3), 0.05,
                  input_shift=4.0),
            Plant("batchnorm_mismatch", "resnet-momentum1e-3", lambda: resnet(momentum=1e-3), 0.05, input_shift=3.0),
            Plant("batchnorm_mismatch", "mlp_bn-frozen_buffers", lambda: mlp(nn.ReLU, bn=True, bn_momentum=0.0),
                  1e-3, optimiser="adam", input_scale=4.0, input_shift=3.0),
            # saturated activations
            Plant("saturated_activations", "tanh_mlp-x10", lambda: scaled(mlp(nn.Tanh), 10.0), 0.01),
            Plant("saturated_activations", "tanh_cnn-x10", lambda: scaled(cnn(nn.Tanh), 10.0), 0.01),
            Plant("saturated_activations", "hardtanh_mlp-x20_inputs", lambda: mlp(nn.Hardtanh), 1e-3,
                  optimiser="adam", input_scale=20.0),
            # loss at initialisation off chance
            Plant("initial_loss", "mlp-last_x100", lambda: scaled(mlp(nn.ReLU), 100.0, "last"), 1e-3,
                  optimiser="adam"),
            Plant("initial_loss", "cnn-x40_inputs", lambda: cnn(), 1e-4, optimiser="adam", input_scale=40.0),
            Plant("initial_loss", "mlp-certain_bias", lambda: certain_bias(mlp(nn.ReLU)), 0.01),
            # oscillating loss: a cyclic learning rate with far too high peaks
            Plant("oscillating_loss", "mlp-sgd-restarts", lambda: mlp(nn.ReLU), 0.15, schedule="restarts", epochs=8),
            Plant("oscillating_loss", "cnn_bn-sgd-restarts", lambda: cnn(bn=True), 0.3, schedule="restarts",
                  epochs=8),
            Plant("oscillating_loss", "mlp-adam-restarts", lambda: mlp(nn.ReLU), 0.05, optimiser="adam",
                  schedule="restarts", epochs=8),
        ]  # fmt: skip
        for p in block:
            p.seed, p.expected = s, set() if p.plant == "healthy" else {p.plant}
        out += block
    return out


# ----------------------------------------------------------------------------------------------------- scoring
def score(results: list[tuple[set[str], set[str], set[str]]], which: int) -> dict[str, tuple[float, float, int]]:
    """Precision and recall per new finding; ``which`` = 1 for the final panel, 2 for any epoch."""
    table = {}
    for kind in KINDS:
        tp = sum(1 for r in results if kind in r[0] and kind in r[which])
        fp = sum(1 for r in results if kind not in r[0] and kind in r[which])
        fn = sum(1 for r in results if kind in r[0] and kind not in r[which])
        table[kind] = (tp / (tp + fp) if tp + fp else math.nan, tp / (tp + fn) if tp + fn else math.nan, tp + fn)
    return table


def report(title: str, results: list[tuple[set[str], set[str], set[str]]]) -> None:
    print(f"\n{title}: {len(results)} runs")
    print(f"| {'finding':<22}| P final | R final | P any | R any | planted |")
    print("|" + "---|" * 6)
    final, anytime = score(results, 1), score(results, 2)
    for kind in KINDS:
        p1, r1, n = final[kind]
        p2, r2, _ = anytime[kind]
        print(f"| {kind:<22}| {p1:7.2f} | {r1:7.2f} | {p2:5.2f} | {r2:5.2f} | {n:7} |")
    healthy = [r for r in results if not r[0]]
    new = set(KINDS)
    print(
        f"healthy runs: {len(healthy)}; with a new finding in the final panel: "
        f"{sum(bool(r[1] & new) for r in healthy)}; at some epoch: {sum(bool(r[2] & new) for r in healthy)}"
    )
