"""Attention collapse and rank collapse (issue #19): the measurements, the rules, and a planted run end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Events, loaders, make_module, trainer_kwargs
from torch import nn

from lightning_viz.callbacks.attention_monitor import AttentionMonitor
from lightning_viz.callbacks.diagnosis_monitor import DiagnosisMonitor
from lightning_viz.diagnosis_attention import attention_collapse, rank_collapse
from lightning_viz.functional import attention as A
from lightning_viz.records import AttentionStats, TokenRankStats, bus_for


# ------------------------------------------------------------------------------------------------ measurements
def test_token_rank_tells_collapsed_tokens_from_distinct_ones():
    same = torch.randn(1, 1, 8).expand(2, 6, 8).clone()
    residual, rank = A.token_rank(same)
    assert torch.allclose(residual, torch.zeros(2), atol=1e-6) and torch.allclose(rank, torch.ones(2))
    distinct = torch.eye(6).repeat(2, 1, 1)  # six orthogonal tokens of equal norm
    residual, rank = A.token_rank(distinct)
    assert torch.allclose(residual, torch.full((2,), math.sqrt(5 / 6)))
    assert torch.allclose(rank, torch.full((2,), 6.0))
    residual, rank = A.token_rank(torch.zeros(1, 4, 3))
    assert residual.item() == 0 and rank.item() == 0
    bad = torch.ones(1, 4, 3)
    bad[0, 0, 0] = math.nan
    assert all(math.isnan(v.item()) for v in A.token_rank(bad))


def test_token_blocks_find_the_blocks_of_timm_and_torchvision():
    timm = pytest.importorskip("timm")
    import torchvision

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=4)
    assert A.token_blocks(vit, A.attention_modules(vit)) == {"blocks.0.attn": "blocks.0", "blocks.1.attn": "blocks.1"}
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    blocks = A.token_blocks(tv, A.attention_modules(tv))
    assert blocks["encoder.layers.encoder_layer_1.self_attention"] == "encoder.layers.encoder_layer_1"
    with torch.no_grad(), A.capture_tokens(tv, A.attention_modules(tv)) as tokens:
        tv(torch.randn(3, 3, 32, 32))
    assert {tuple(t.shape) for t in tokens.values()} == {(3, 17, 16)}


# ------------------------------------------------------------------------------------------------------- rules
def _attention(name: str, entropies: list[list[float]], tokens: int = 17) -> list[AttentionStats]:
    """One layer's history: per epoch, the entropy of each head (nats)."""
    return [
        AttentionStats(
            step=10 * e,
            epoch=e,
            subject=name,
            heads=len(h),
            tokens=tokens,
            entropy=sum(h) / len(h),
            normalized_entropy=sum(h) / len(h) / math.log(tokens),
            head_entropy=tuple(h),
            top_key_share=0.9 if max(h) < 0.5 else 0.1,
        )
        for e, h in enumerate(entropies)
    ]


def test_attention_collapse_fires_when_most_heads_fall_to_one_token():
    uniform = math.log(17)
    falling = [[uniform] * 4, [2.0] * 4, [0.3, 0.2, 0.1, 2.5], [0.1, 0.1, 0.05, 2.5]]
    history = {f"blocks.{i}.attn": _attention(f"blocks.{i}.attn", falling) for i in range(3)}
    finding = attention_collapse(history)
    assert finding is not None and finding.kind == "attention_collapse"
    assert finding.severity == "warning"  # 9 of 12 heads: 75% < 80%
    assert finding.since_epoch == 2
    assert "9 of 12 heads in 3 of 3 layers" in finding.summary
    assert "attention/normalized_entropy/blocks.0.attn" in finding.tags
    assert any("qk-norm" in r for r in finding.remedies) and any("learning rate" in r for r in finding.remedies)
    assert finding.table[1][1] == "3 of 4"
    everywhere = {n: _attention(n, [[uniform] * 4, [0.05] * 4]) for n in ("a", "b")}
    assert attention_collapse(everywhere).severity == "critical"


def test_attention_collapse_stays_silent_on_healthy_or_initially_peaked_attention():
    uniform = math.log(17)
    healthy = {n: _attention(n, [[uniform] * 4, [2.6, 2.4, 1.9, 2.7], [2.5, 2.2, 1.2, 2.6]]) for n in ("a", "b")}
    assert attention_collapse(healthy) is None
    some = {"a": _attention("a", [[uniform] * 4, [0.1, 0.1, 2.5, 2.5]]), "b": _attention("b", [[uniform] * 4] * 2)}
    assert attention_collapse(some) is None  # a quarter of the heads: not "most"
    peaked = {n: _attention(n, [[0.2] * 4, [0.1] * 4]) for n in ("a", "b")}
    assert attention_collapse(peaked) is None  # judged against its own initial level
    assert attention_collapse({"a": _attention("a", [[0.0] * 4])}) is None  # one record: no history yet


def _ranks(residuals: list[list[float]]) -> dict[str, list[TokenRankStats]]:
    """Per block, its history; ``residuals[epoch][block]``."""
    layers = len(residuals[0])
    return {
        f"blocks.{b}.attn": [
            TokenRankStats(
                step=10 * e,
                epoch=e,
                subject=f"blocks.{b}.attn",
                order=b,
                layers=layers,
                site=f"blocks.{b}",
                tokens=17,
                dim=32,
                relative_residual=r[b],
                effective_rank=1.0 + 10 * r[b],
            )
            for e, r in enumerate(residuals)
        ]
        for b in range(layers)
    }


def test_rank_collapse_fires_on_collapsed_deep_blocks():
    finding = rank_collapse(_ranks([[0.9, 0.3, 1e-3, 1e-4, 1e-5, 1e-6]] * 3))
    assert finding is not None and finding.kind == "rank_collapse" and finding.severity == "critical"
    assert finding.since_epoch == 0
    assert finding.tags[0] == "attention/token_residual/blocks.4.attn"
    assert "`blocks.0.attn`: 0.9" in finding.evidence[1]
    assert any("residual" in r and "skip" in r for r in finding.remedies)
    later = rank_collapse(_ranks([[0.9, 0.8, 0.7, 0.6, 0.5, 0.5], [0.9, 0.6, 0.2, 0.1, 0.03, 0.03]]))
    assert later is not None and later.severity == "warning" and later.since_epoch == 1


def test_rank_collapse_stays_silent_on_distinct_tokens():
    assert rank_collapse(_ranks([[0.95, 0.8, 0.6, 0.5, 0.4, 0.35]] * 3)) is None
    assert rank_collapse(_ranks([[0.9, 0.01, 0.01, 0.01, 0.3, 0.4]])) is None  # shallow blocks only: not the deep ones
    assert rank_collapse({}) is None


# ------------------------------------------------------------------------------------------------- end to end
class TinyViT(nn.Module):
    """16x16 images, 4x4 patches (16 tokens + class token), ``depth`` pre-LN blocks; ``residual`` can be removed."""

    def __init__(self, depth: int = 4, dim: int = 16, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, 2, batch_first=True) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            h = norm(t)
            a = attn(h, h, h, need_weights=False)[0]
            t = t + a if self.residual else a
            t = t + mlp(t) if self.residual else mlp(t)
        return self.head(t[:, 0])


def _fit(pl_ns, tmp_path, model: nn.Module, sharpen: float = 0.0, epochs: int = 3):
    class Sharpen(pl_ns.Callback):
        """The plant: query weights times ``sharpen`` at each epoch start after the first (temperature falls)."""

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                return
            with torch.no_grad():
                for attn in model.attns:
                    attn.in_proj_weight[: attn.embed_dim].mul_(sharpen)
                    attn.in_proj_bias[: attn.embed_dim].mul_(sharpen)

    monitor = AttentionMonitor(on_error="raise", methods=["rollout"], max_probes=2, tile_size=16, max_head_layers=1)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    callbacks = [monitor, DiagnosisMonitor(on_error="raise")] + ([Sharpen()] if sharpen else [])
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, max_epochs=epochs))
    train, val = loaders(n=48, size=16)
    trainer.fit(make_module(pl_ns, model, lr=0.01), train, val)
    bus = bus_for(trainer)
    attention = {s: bus.history(AttentionStats, s) for s in bus.latest(AttentionStats)}
    ranks = {s: bus.history(TokenRankStats, s) for s in bus.latest(TokenRankStats)}
    return attention_collapse(attention), rank_collapse(ranks), Events(str(tmp_path / "run"))


def test_planted_attention_collapse_is_found_end_to_end(tmp_path, pl_ns):
    torch.manual_seed(0)
    collapse, rank, events = _fit(pl_ns, tmp_path, TinyViT(), sharpen=8.0)
    assert collapse is not None and collapse.severity == "critical" and rank is None  # residuals keep the rank
    entropy = events.scalars("attention/normalized_entropy/model.attns.3")
    assert entropy[0][1] > 0.8 and entropy[-1][1] < 0.2  # what the finding's tag shows
    assert collapse.tags[0] in events.tags["scalars"]
    panel = events.text("diagnosis/findings")[-1][1]  # the DiagnosisMonitor applies the rule to the same records
    assert "attention_collapse" in panel.lower().replace(" ", "_") or "attention collapse" in panel.lower(), panel


def test_planted_rank_collapse_is_found_end_to_end(tmp_path, pl_ns):
    torch.manual_seed(0)
    collapse, rank, events = _fit(pl_ns, tmp_path, TinyViT(residual=False), epochs=2)
    assert rank is not None and rank.kind == "rank_collapse" and collapse is None
    residual = events.scalars("attention/token_residual/model.attns.3")
    assert [s for s, _ in residual] == [0, 3, 6] and residual[-1][1] < 0.01
    assert events.scalars("attention/effective_rank/model.attns.3")[-1][1] < 1.1
    assert rank.tags[0] in events.tags["scalars"]
    panel = events.text("diagnosis/findings")[-1][1]
    assert "rank collapse" in panel.lower() or "rank_collapse" in panel, panel
