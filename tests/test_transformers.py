"""Vision transformers (timm, torchvision) under FilterMonitor, ActivationMonitor and AttentionMonitor.

Tiny configurations: 32x32 images, two blocks. timm is in the ``test`` extra; without it its cases skip.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import Events, loaders, make_module, trainer_kwargs
from torch import nn

import lightning_viz
from lightning_viz import ActivationMonitor, FilterMonitor
from lightning_viz._hooks import hook_count, isolated
from lightning_viz.callbacks.attention_monitor import AttentionMonitor
from lightning_viz.functional import attention as A
from lightning_viz.functional import filters
from lightning_viz.functional import saliency as sal
from lightning_viz.records import (
    ActivationStats,
    AttentionStats,
    EmbeddingQuality,
    ExemplarStats,
    FeatureVisStats,
    FilterStats,
    bus_for,
)


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


# ------------------------------------------------------------------------------------- the acceptance matrix
def _timm(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


#: name -> builder; ViTs with their patch embedding, the Grad-CAM layer (the last attention's input), the MLP
#: activation of the last block and the head, all found by data flow.
MATRIX = {
    "vit_tiny_patch16_224": lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "deit_tiny_patch16_224": lambda: _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "swin_tiny_patch4_window7_224": lambda: _timm(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=24
    ),
    "convnext_atto": lambda: _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "resnet18": lambda: _timm("resnet18", channels=(16, 32, 64, 128), stem_width=16),  # the layout, an eighth wide
    "torchvision_vit_b_16": torchvision_vit,
}
VITS = {
    "vit_tiny_patch16_224": ("patch_embed.proj", "blocks.1.norm1", "blocks.1.mlp.act", "head"),
    "deit_tiny_patch16_224": ("patch_embed.proj", "blocks.1.norm1", "blocks.1.mlp.act", "head"),
    "torchvision_vit_b_16": (
        "conv_proj",
        "encoder.layers.encoder_layer_1.ln_1",
        "encoder.layers.encoder_layer_1.mlp.1",
        "heads.head",
    ),
}
FAST_SUITE = dict(
    every_n_epochs=2,  # two epochs of training, each monitor logs once, at the end
    log_baseline=False,
    on_error="raise",
    filters={"max_filters": 8},
    activations={"max_batches": 2},
    saliency={
        "smoothgrad_samples": 2,
        "max_probes": 2,
        "tile_size": 16,
        "methods": ["gradient", "gradcam", "occlusion"],
    },
    embedding={"reducer": "pca", "subset_size": 24, "projector": False},
    exemplars={"max_samples": 24, "max_channels": 4, "top_k": 2, "tile_size": 16},
    featurevis={"steps": 3, "max_channels": 2, "tile_size": 16},
    attention={"max_probes": 2, "tile_size": 16},
)


@pytest.mark.parametrize("name", list(MATRIX))
def test_default_suite_on_transformers_and_modern_backbones(tmp_path, pl_ns, name):
    torch.manual_seed(0)
    model = MATRIX[name]()
    hooks = hook_count(model)
    suite = lightning_viz.default_suite(**FAST_SUITE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Swin's window attention is not supported: said once, not tested here
        module, events = _fit(pl_ns, tmp_path / "with", suite, model, n=24, max_epochs=2)
    bus = bus_for(module.trainer)
    monitors = {type(cb).__name__: cb for cb in suite}
    images, scalars = set(events.tags["images"]), set(events.tags["scalars"])
    model.eval()

    # filters: the first conv called (a ViT's patch embedding)
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert f"filters/model.{first_conv}" in images
    # activations: per hidden unit (or channel), never per token or position
    stats = bus.latest(ActivationStats)
    assert stats
    for site, record in stats.items():
        layer = model.get_submodule(site.removeprefix("model.").split("#")[0])
        assert record.channels in _widths_before(model, layer), site
    # saliency: a Grad-CAM map shaped like the image and not constant, from the layer the data flow chose
    saliency = monitors["SaliencyMonitor"]
    assert "saliency/grid" in images and "gradcam" not in saliency._disabled
    x = saliency.probes.images[:2]
    with isolated(module, grad=True):
        cam = sal.grad_cam(
            module,
            x,
            torch.tensor([0, 1]),
            module.get_submodule(saliency._gradcam_name),
            grid=saliency._gradcam_view[0],
            channels_last=saliency._gradcam_view[1],
        )
    assert cam.shape == (2, 32, 32) and float(cam.std()) > 0
    # embedding: the input of the head, found by data flow; k-NN quality logged
    embedding = monitors["EmbeddingMonitor"]
    assert "embedding/knn_accuracy" in scalars and bus.latest(EmbeddingQuality)
    assert isinstance(embedding._module, nn.Linear) and embedding._module.out_features == 4
    # exemplars and feature visualisation: images per channel / hidden unit
    exemplars = bus.latest(ExemplarStats)
    assert len(exemplars) == 1 and any(t.startswith("exemplars/") for t in images)
    assert any(t.startswith("featurevis/") for t in images) and bus.latest(FeatureVisStats)
    assert {"diagnosis/findings", "diagnosis/divergence"} <= scalars

    if name in VITS:
        patch, gradcam, hidden, head = VITS[name]
        assert f"filters/model.{patch}" in images
        assert saliency._gradcam_name == f"model.{gradcam}" and saliency._gradcam_view[0] is not None
        assert saliency._window == saliency._stride == 8  # occlusion windows are the 8x8 patches
        assert embedding._module is model.get_submodule(head)
        (subject, record), *_ = exemplars.items()
        assert subject == f"model.{hidden}"
        boxes = record.boxes.view(-1, 4)
        assert ((boxes[:, 2] - boxes[:, 0]) == 8).all() and ((boxes[:, 3] - boxes[:, 1]) == 8).all()
        assert set(bus.latest(FeatureVisStats)) == {f"model.{hidden}"}
        assert bus.latest(AttentionStats) and "attention/rollout" in images
    else:
        assert not bus.latest(AttentionStats)
    assert hook_count(model) == hooks
    weights = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    bare = MATRIX[name]()
    _fit(pl_ns, tmp_path / "without", [], bare, n=24, max_epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(weights, bare.parameters()))


# ------------------------------------------------------------------------------- default layers by data flow
class AuxHeadNet(nn.Module):
    """The real head and last conv are registered *before* an auxiliary branch that is called last but whose output
    never reaches the logits: registration order would pick the auxiliary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
        self.aux_conv = nn.Conv2d(8, 6, 1)
        self.aux = nn.Linear(6, 4)
        self.aux_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        logits = self.head(torch.relu(self.conv2(a)).mean((2, 3)))
        self.aux_logits = self.aux(self.aux_conv(a).mean((2, 3)))  # e.g. an auxiliary loss's head
        return logits


def test_default_layers_follow_the_data_flow_not_the_registration_order(tmp_path, pl_ns):
    from lightning_viz import EmbeddingMonitor, ExemplarMonitor
    from lightning_viz._layers import trace_data_flow

    torch.manual_seed(0)
    model = AuxHeadNet().eval()
    flow = trace_data_flow(model, torch.randn(1, 3, 16, 16))
    assert (flow.head(), flow.last_of((nn.Conv2d,)), flow.grid) == ("head", "conv2", None)
    assert [c.name for c in flow.calls if not c.connected] == ["aux_conv", "aux"]
    assert hook_count(model) == 0 and all(p.grad is None for p in model.parameters())

    embedding = EmbeddingMonitor(reducer="pca", projector=False, subset_size=16, every_n_epochs=1, on_error="raise")
    exemplars = ExemplarMonitor(max_samples=16, max_channels=2, top_k=2, every_n_epochs=1, on_error="raise")
    module, events = _fit(pl_ns, tmp_path, [embedding, exemplars], AuxHeadNet(), n=16, max_epochs=1)
    assert embedding._module is module.model.head  # its input, the pooled conv2 features, is the code
    assert set(bus_for(module.trainer).latest(ExemplarStats)) == {"model.conv2"}
    assert "embedding/knn_accuracy" in events.tags["scalars"]


def test_vision_transformer_patch_grid_is_read_from_the_model():
    from lightning_viz._layers import trace_data_flow

    timm = pytest.importorskip("timm")
    for kwargs, prefix in [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)]:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=8, depth=1,
                                  num_classes=4, **kwargs).eval()  # fmt: skip
        flow = trace_data_flow(model, torch.randn(1, 3, 32, 48))
        assert (flow.grid.prefix, flow.grid.rows, flow.grid.cols) == (prefix, 4, 6), kwargs
        assert flow.head() == "head" and flow.patch_embedding == "patch_embed.proj"
        x = torch.randn(2, 3, 32, 48)
        grid, channels_last = flow.view_of(flow.spatial_layer())
        cam = sal.grad_cam(model, x, torch.tensor([0, 2]), model.get_submodule(flow.spatial_layer()), grid=grid)
        assert cam.shape == (2, 32, 48) and float(cam.std()) > 0


def test_feature_visualisation_at_a_fixed_input_size(tmp_path, pl_ns):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_viz import FeatureVisMonitor

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 28, 40, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 40, 4))
    monitor = FeatureVisMonitor(steps=3, max_channels=2, tile_size=16, every_n_epochs=1, on_error="raise")
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(make_module(pl_ns, flat), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    record = bus_for(trainer).latest(FeatureVisStats)["model.0"]
    assert record.channels == (0, 3) and torch.isfinite(record.final_objective).all()
    assert "featurevis/model.0" in Events(str(tmp_path / "run")).tags["images"]
