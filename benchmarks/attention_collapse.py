"""Planted-fault benchmark of the attention rules (attention collapse, rank collapse): precision and recall.

Each run trains a small vision transformer for a few epochs on CPU with the :class:`AttentionMonitor`, then applies
:func:`~lightning_viz.diagnosis_attention.attention_collapse` and
:func:`~lightning_viz.diagnosis_attention.rank_collapse` to the records it published (as the diagnosis does at the end
of fit) and compares them with the plant:

===================  ==============================================================================================
plant                how
===================  ==============================================================================================
healthy              a pre-LN transformer with residual connections, Adam at a sensible learning rate; no finding
attention_collapse   the softmax temperature falls during training: the query weights are multiplied by a growing
                     factor at each epoch start (a callback in this benchmark), or once after the first epoch
rank_collapse        the residual connections are removed from every block (and in one model the LayerNorms too)
===================  ==============================================================================================

Models: a tiny ViT of ``nn.MultiheadAttention`` blocks (``custom``), timm's ``vit_tiny_patch16_224`` with a reduced
depth / width / image size (``timm``, ``pretrained=False``; no residual via timm's ``block_fn``), torchvision's
``VisionTransformer`` in a tiny configuration (``torchvision``; no residual by replacing its blocks' ``forward``). Data:
scikit-learn's digits upsampled to 32x32, or 32x32 crops of scikit-image's photos. Seeds 0-1 were looked at while the
thresholds were set; seeds 2-3 are held out and reported apart.

    python benchmarks/attention_collapse.py            # seeds 0-3 (a few minutes on 2 CPU cores)
    python benchmarks/attention_collapse.py --seeds 2 3
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import common  # noqa: E402

from lightning_viz.callbacks.attention_monitor import AttentionMonitor  # noqa: E402
from lightning_viz.diagnosis_attention import attention_collapse, rank_collapse  # noqa: E402
from lightning_viz.records import AttentionStats, TokenRankStats, bus_for  # noqa: E402

KINDS = ("attention_collapse", "rank_collapse")
#: Trainer settings of every run: CPU, nothing written but the event files, no sanity check.
QUIET_CPU = {"accelerator": "cpu", "enable_checkpointing": False, "enable_model_summary": False}
QUIET_CPU |= {"enable_progress_bar": False, "num_sanity_val_steps": 0}


# ------------------------------------------------------------------------------------------------------ models
class TinyViT(nn.Module):
    """Patch embedding, class token, ``depth`` blocks of ``nn.MultiheadAttention`` + MLP; optional residuals/norms."""

    def __init__(self, in_ch: int, classes: int, *, depth: int = 6, dim: int = 32, heads: int = 4, size: int = 32,
                 patch: int = 8, residual: bool = True, norm: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.residual = residual
        self.patch = nn.Conv2d(in_ch, dim, patch, stride=patch)
        tokens = (size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        make_norm = (lambda: nn.LayerNorm(dim)) if norm else nn.Identity
        self.norm1 = nn.ModuleList(make_norm() for _ in range(depth))
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.norm2 = nn.ModuleList(make_norm() for _ in range(depth))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(depth)
        )
        self.norm = make_norm()
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        for n1, attn, n2, mlp in zip(self.norm1, self.attn, self.norm2, self.mlp):
            h = n1(t)
            a = attn(h, h, h, need_weights=False)[0]
            t = t + a if self.residual else a
            m = mlp(n2(t))
            t = t + m if self.residual else m
        return self.head(self.norm(t)[:, 0])


def timm_vit(in_ch: int, classes: int, *, residual: bool = True, depth: int = 4) -> nn.Module:
    import timm
    from timm.models.vision_transformer import Block

    class NoResidualBlock(Block):
        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
            x = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask))
            return self.ls2(self.mlp(self.norm2(x)))

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        in_chans=in_ch,
        depth=depth,
        embed_dim=48,
        num_heads=3,
        num_classes=classes,
        block_fn=Block if residual else NoResidualBlock,
    )


def _no_residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = self.ln_1(x)
    h, _ = self.self_attention(h, h, h, need_weights=False)
    return self.mlp(self.ln_2(self.dropout(h)))


def torchvision_vit(in_ch: int, classes: int, *, residual: bool = True, depth: int = 4) -> nn.Module:
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=depth, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=classes
    )
    if in_ch != 3:
        model.conv_proj = nn.Conv2d(in_ch, 32, 8, stride=8)
    if not residual:
        for block in model.encoder.layers:
            block.forward = types.MethodType(_no_residual_forward, block)
    return model


def build(cfg: Config, in_ch: int, classes: int) -> nn.Module:
    residual = cfg.plant != "rank_collapse"
    if cfg.family == "custom":
        return TinyViT(in_ch, classes, residual=residual, norm=cfg.norm, depth=cfg.depth)
    if cfg.family == "timm":
        return timm_vit(in_ch, classes, residual=residual, depth=cfg.depth)
    return torchvision_vit(in_ch, classes, residual=residual, depth=cfg.depth)


def query_weights(model: nn.Module) -> list[torch.Tensor]:
    """The query projection weight and bias of every attention module (views into the parameters)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            d = m.embed_dim
            out += [m.in_proj_weight[:d], m.in_proj_bias[:d]]
        elif hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear):
            d = m.qkv.out_features // 3
            out += [m.qkv.weight[:d], *([m.qkv.bias[:d]] if m.qkv.bias is not None else [])]
    return out


class Sharpen(pl.Callback):
    """The planted collapse: the query weights (so the attention logits) multiplied by ``factor`` at the start of each
    training epoch from the second on (``once``: only at the second): a softmax temperature that falls."""

    def __init__(self, factor: float, once: bool = False) -> None:
        self.factor, self.once = factor, once

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0 or (self.once and trainer.current_epoch > 1):
            return
        with torch.no_grad():
            for w in query_weights(pl_module):
                w.mul_(self.factor)


# -------------------------------------------------------------------------------------------------------- data
_DATA: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def dataset(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (name, seed)
    if key not in _DATA:
        if name == "digits":
            x, y = common.digits(size=32)
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:800]
            _DATA[key] = x[perm], y[perm]
        else:
            _DATA[key] = common.photo_patches(n_per_class=130, size=32, seed=seed)
    return _DATA[key]


class Module(common.Classifier):
    """The examples' classifier, with AdamW (transformers' usual optimiser)."""

    def configure_optimizers(self):  # noqa: D102
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)


@dataclass
class Config:
    plant: str
    family: str
    data: str
    lr: float
    epochs: int
    seed: int
    depth: int = 4
    norm: bool = True
    sharpen: float = 0.0
    once: bool = False
    expected: set[str] = field(default_factory=set)

    def name(self) -> str:
        extra = f"/x{self.sharpen:g}{'once' if self.once else ''}" if self.sharpen else ""
        norm = "" if self.norm else "/no-norm"
        setting = f"{self.data}/lr{self.lr:g}/e{self.epochs}{extra}/s{self.seed}"
        return f"{self.plant}/{self.family}/d{self.depth}{norm}/{setting}"


def run(cfg: Config, logdir: str) -> tuple[set[str], dict[str, float]]:
    """Train one planted run; returns the kinds found and a few numbers for the log."""
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    x, y = dataset(cfg.data, cfg.seed)
    classes = int(y.max()) + 1
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = len(x) // 5
    model = build(cfg, x.shape[1], classes)
    monitor = AttentionMonitor(methods=["rollout"], max_probes=4, max_head_layers=1, filmstrip_probes=1)
    callbacks: list = [monitor]
    if cfg.sharpen:
        callbacks.append(Sharpen(cfg.sharpen, cfg.once))
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        logger=TensorBoardLogger(logdir, name=cfg.name().replace("/", "_")),
        callbacks=callbacks,
        log_every_n_steps=10,
        **QUIET_CPU,
    )
    train = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(TensorDataset(x[perm[:n_val]], y[perm[:n_val]]), batch_size=256)
    trainer.fit(Module(model, lr=cfg.lr), loader, val_loader)
    bus = bus_for(trainer)
    attention = {s: bus.history(AttentionStats, s) for s in bus.latest(AttentionStats)}
    ranks = {s: bus.history(TokenRankStats, s) for s in bus.latest(TokenRankStats)}
    found = {f.kind for f in (attention_collapse(attention), rank_collapse(ranks)) if f is not None}
    last = list(bus.latest(AttentionStats).values())
    keys = [math.exp(h) for r in last for h in r.head_entropy]
    first = [math.exp(h) for s in attention for h in attention[s][0].head_entropy]
    deep = sorted(bus.latest(TokenRankStats).values(), key=lambda r: r.order)[-1]
    numbers = {
        "keys0": sum(first) / len(first),
        "keys": sum(keys) / len(keys),
        "min_keys": min(keys),
        "residual": math.nan if deep.relative_residual is None else deep.relative_residual,
        "erank": math.nan if deep.effective_rank is None else deep.effective_rank,
        "loss": float(trainer.callback_metrics.get("train_loss", math.nan)),
    }
    return found, numbers


def plan(seeds: list[int]) -> list[Config]:
    out: list[Config] = []
    for s in seeds:
        out += [
            # healthy: pre-LN, residuals, AdamW at a sensible learning rate
            Config("healthy", "custom", "photos", 1e-3, 5, s, depth=6),
            Config("healthy", "timm", "digits", 1e-3, 5, s),
            Config("healthy", "torchvision", "photos", 2e-3, 5, s),
            Config("healthy", "timm", "photos", 3e-3, 5, s, depth=6),
            # attention collapse: a softmax temperature that falls during training
            Config("attention_collapse", "custom", "digits", 1e-3, 5, s, sharpen=3.0),
            Config("attention_collapse", "timm", "photos", 1e-3, 5, s, sharpen=6.0),
            Config("attention_collapse", "timm", "digits", 5e-2, 5, s),
            Config("attention_collapse", "torchvision", "digits", 1e-3, 4, s, sharpen=30.0, once=True),
            # rank collapse: no residual connections (and no LayerNorm)
            Config("rank_collapse", "custom", "photos", 1e-3, 4, s, depth=6),
            Config("rank_collapse", "custom", "digits", 1e-3, 4, s, depth=6, norm=False),
            Config("rank_collapse", "timm", "digits", 1e-3, 4, s, depth=6),
            Config("rank_collapse", "torchvision", "photos", 1e-3, 4, s, depth=6),
        ]
    for cfg in out:
        cfg.expected = set() if cfg.plant == "healthy" else {cfg.plant}
    return out


def report(title: str, results: list[tuple[set[str], set[str]]]) -> None:
    print(f"\n{title}: {len(results)} runs")
    print(f"{'finding':<20}{'precision':>10}{'recall':>8}{'planted':>9}{'false +':>9}")
    for kind in KINDS:
        tp = sum(1 for e, f in results if kind in e and kind in f)
        fp = sum(1 for e, f in results if kind not in e and kind in f)
        fn = sum(1 for e, f in results if kind in e and kind not in f)
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / (tp + fn) if tp + fn else math.nan
        print(f"{kind:<20}{precision:>10.2f}{recall:>8.2f}{tp + fn:>9}{fp:>9}")
    healthy = [f for e, f in results if not e]
    print(f"healthy runs: {len(healthy)}; with a finding: {sum(bool(f) for f in healthy)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--only", default=None, help="only runs whose name contains this")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning_viz", "pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    results: list[tuple[int, set[str], set[str]]] = []  # (seed, planted, found)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        for cfg in plan(args.seeds):
            if args.only and args.only not in cfg.name():
                continue
            t = time.perf_counter()
            found, n = run(cfg, logdir)
            ok = "ok " if found == cfg.expected else "BAD"
            print(
                f"{ok} {time.perf_counter() - t:5.1f}s {cfg.name():<58} keys {n['keys0']:5.2f}->{n['keys']:5.2f} "
                f"(min {n['min_keys']:4.2f}) residual {n['residual']:.3g} erank {n['erank']:4.2f} "
                f"loss {n['loss']:.3f} found={sorted(found)}"
            )
            results.append((cfg.seed, cfg.expected, found))
    parts = {"design (seeds 0-1)": range(2), "held out (seeds 2+)": range(2, 10**6), "all planted runs": range(10**6)}
    for title, seeds in parts.items():
        if any(seed in seeds for seed, _, _ in results):
            report(title, [(e, f) for seed, e, f in results if seed in seeds])
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
