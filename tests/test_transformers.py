"""Vision transformers (timm, torchvision) under FilterMonitor, ActivationMonitor and AttentionMonitor.

Tiny configurations: 32x32 images, two blocks. timm is in the ``test`` extra; without it its cases skip.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import Events, loaders, make_module, trainer_kwargs
from torch import nn

from lightning_viz import ActivationMonitor, FilterMonitor
from lightning_viz._hooks import hook_count
from lightning_viz.callbacks.attention_monitor import AttentionMonitor
from lightning_viz.functional import attention as A
from lightning_viz.functional import filters
from lightning_viz.records import ActivationStats, AttentionStats, FilterStats, bus_for


def torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    )


def timm_vit(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, img_size=32, depth=2, num_classes=4)


# name -> (builder, patch embedding, GELU site, hidden units, attention layers, heads, tokens)
MODELS = {
    "torchvision_vit_b_16": (
        torchvision_vit,
        "conv_proj",
        "encoder.layers.encoder_layer_0.mlp.1",
        64,
        ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"],
        2,
        17,
    ),
    "vit_tiny_patch16_224": (
        lambda: timm_vit("vit_tiny_patch16_224"),
        "patch_embed.proj",
        "blocks.0.mlp.act",
        768,
        ["blocks.0.attn", "blocks.1.attn"],
        3,
        5,
    ),
    "deit_tiny_patch16_224": (
        lambda: timm_vit("deit_tiny_patch16_224"),
        "patch_embed.proj",
        "blocks.1.mlp.act",
        768,
        ["blocks.0.attn", "blocks.1.attn"],
        3,
        5,
    ),
}


def _fit(pl_ns, tmp_path, callbacks, model, n: int = 32, **overrides):
    train, val = loaders(n=n, size=32)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **overrides))
    module = make_module(pl_ns, model, lr=0.01)
    trainer.fit(module, train, val)
    return module, Events(str(tmp_path / "run"))


def _suite():
    return [
        FilterMonitor(on_error="raise", max_filters=16),
        ActivationMonitor(on_error="raise", max_batches=2),
        AttentionMonitor(on_error="raise", max_probes=2, tile_size=16),
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_vision_transformer_under_filter_activation_and_attention_monitors(tmp_path, pl_ns, name):
    build, patch, gelu, units, layers, heads, tokens = MODELS[name]
    torch.manual_seed(0)
    model = build()
    hooks = hook_count(model)
    module, events = _fit(pl_ns, tmp_path / "with", _suite(), model)
    weights = [p.detach().clone() for p in model.parameters()]
    bus = bus_for(module.trainer)

    # the patch embedding's 16x16 (or 8x8) kernels as RGB tiles, with a noise score of an untrained layer near 1
    grid = events.image(f"filters/model.{patch}")
    kernel = module.model.get_submodule(patch).kernel_size[0]
    tile = kernel * -(-32 // kernel)  # upsampled to at least `min_tile_pixels`=32
    assert grid.shape == (2 * (tile + 1) + 1, 8 * (tile + 1) + 1, 3)  # 16 filters, one RGB tile each
    assert not (grid[..., 0] == grid[..., 1]).all()  # colour, not grey
    baseline = bus.history(FilterStats, f"model.{patch}")[0]
    assert baseline.epoch == 0 and 0.8 < baseline.noise_score < 1.2

    # the MLP's GELU counted per hidden unit, sparsity instead of dead units
    stats = bus.latest(ActivationStats)[f"model.{gelu}"]
    assert stats.channels == units and stats.dead_count is None and 0 < stats.sparsity < 1
    assert f"activations/sparsity/model.{gelu}" in events.tags["scalars"]

    # attention: per-head maps, rollout, filmstrips, entropy per layer
    images = set(events.tags["images"])
    assert {"attention/rollout", "attention/filmstrip/probe_00", "attention/filmstrip/probe_01"} <= images
    assert {f"attention/heads/model.{layer}" for layer in layers} <= images
    assert events.image_steps("attention/rollout") == [0, 2, 4]
    for layer in layers:
        assert len(events.scalars(f"attention/entropy/model.{layer}")) == 3
    attention = bus.latest(AttentionStats)
    assert set(attention) == {f"model.{layer}" for layer in layers}
    assert all(s.heads == heads and s.tokens == tokens for s in attention.values())
    model.eval()
    maps = A.attention_maps(model, A.attention_modules(model), torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(A.attention_rollout(list(maps.values())).sum(-1), torch.ones(2, tokens))
    assert hook_count(model) == hooks

    # the same training without the monitors: bit-identical weights
    torch.manual_seed(0)
    bare = build()
    _fit(pl_ns, tmp_path / "without", [], bare)
    assert all(torch.equal(a, b) for a, b in zip(weights, bare.parameters()))


def test_timm_attention_recomputed_from_inputs_equals_the_unfused_path():
    model = timm_vit("vit_tiny_patch16_224").eval()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    modules = A.attention_modules(model)
    assert all(m.fused_attn for m in modules.values())  # the model as built runs scaled_dot_product_attention
    output = model(x)
    weights, grads, scores = A.attention_gradients(model, modules, x, target)
    with torch.no_grad(), A.capture_attention(modules):
        assert torch.equal(model(x), output)  # reading hooks leave the fused output bit-identical
    torch.testing.assert_close(scores, output, rtol=1e-5, atol=1e-5)

    # the unfused reference: timm's own `attn` tensor, captured at its attention dropout
    unfused: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            unfused[name] = out

        return hook

    handles = [m.attn_drop.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        for m in modules.values():
            m.fused_attn = False
        model(x).gather(1, target.view(-1, 1)).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for m in modules.values():
            m.fused_attn = True
    for name in modules:
        torch.testing.assert_close(weights[name], unfused[name].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[name], unfused[name].grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_noise_score_is_meaningful_for_16x16_kernels():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, 16, 16, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blobs = torch.stack([torch.exp(-((yy - 8 + i % 5) ** 2 + (xx - 8) ** 2) / 18.0) for i in range(16)])
    edges = torch.stack([torch.tanh((xx - 4 - i % 8) / 2.0) for i in range(16)])
    smooth = torch.cat([blobs, edges]).unsqueeze(1).expand(-1, 3, -1, -1)
    assert float(filters.noise_score(noise).mean()) == pytest.approx(1.0, abs=0.05)
    assert float(filters.noise_score(smooth).max()) < 0.3


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))),
        (
            "swin_tiny_patch4_window7_224",
            dict(img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=24),
        ),
    ],
)
def test_modern_backbones_smoke(tmp_path, pl_ns, name, kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs)
    monitors = [FilterMonitor(on_error="raise", max_filters=8), ActivationMonitor(on_error="raise", max_batches=1)]
    module, events = _fit(pl_ns, tmp_path, monitors, model, n=16, max_epochs=1, limit_train_batches=1)
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert f"filters/model.{first_conv}" in events.tags["images"]
    stats = bus_for(module.trainer).latest(ActivationStats)
    assert stats
    for site, record in stats.items():
        layer = model.get_submodule(site.removeprefix("model.").split("#")[0])
        assert record.channels in _widths_before(model, layer), site  # hidden units, never a spatial size


def _widths_before(model: nn.Module, layer: nn.Module) -> set[int]:
    widths = set()
    for m in model.modules():
        if m is layer:
            break
        for attribute in ("out_features", "out_channels"):
            if hasattr(m, attribute):
                widths = {getattr(m, attribute)}
    return widths
