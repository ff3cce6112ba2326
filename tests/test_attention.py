"""Attention weights recomputed from a transformer's inputs, rollout, entropy; AttentionMonitor; the token axis."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_monitor, loaders
from torch import nn

from lightning_viz import ActivationMonitor, render
from lightning_viz._hooks import hook_count
from lightning_viz.callbacks.attention_monitor import AttentionMonitor
from lightning_viz.functional import activations as Act
from lightning_viz.functional import attention as A
from lightning_viz.records import ActivationStats, AttentionStats, bus_for


class TinyViT(nn.Module):
    """Patch embedding (8x8 on 16x16 images: 4 patches), class token, ``depth`` pre-norm blocks, class-token head."""

    def __init__(self, depth: int = 2, dim: int = 16, heads: int = 2, classes: int = 4, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=batch_first) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            h = norm(t) if self.batch_first else norm(t).transpose(0, 1)
            out, _ = attn(h, h, h, need_weights=False)
            t = t + (out if self.batch_first else out.transpose(0, 1))
            t = t + mlp(t)
        return self.head(t[:, 0])


def _mha_inputs(model: TinyViT, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [a.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for a in model.attns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("batch_first", [True, False])
def test_recomputed_weights_equal_need_weights_and_output_is_bit_identical(batch_first):
    torch.manual_seed(0)
    model = TinyViT(batch_first=batch_first).eval()
    x = torch.randn(3, 3, 16, 16)
    modules = A.attention_modules(model)
    assert list(modules) == ["attns.0", "attns.1"]
    for grad in (False, True):  # without autograd nn.MultiheadAttention takes its fused fast path
        with torch.set_grad_enabled(grad):
            reference_out = model(x)
            with A.capture_attention(modules) as captured:
                out = model(x)
        assert torch.equal(out, reference_out) and hook_count(model) == 0
    for attn, h in zip(model.attns, _mha_inputs(model, x)):
        _, expected = attn(h, h, h, need_weights=True, average_attn_weights=False)
        name = f"attns.{list(model.attns).index(attn)}"
        assert captured[name].shape == (3, 2, 5, 5)
        torch.testing.assert_close(captured[name], expected, rtol=1e-5, atol=1e-6)


def test_recomputed_weights_follow_masks_and_separate_projections():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True).eval()
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    mask = torch.tensor([[False, True, False, False]] * 3)
    padding = torch.tensor([[False, False, False, True], [False, False, False, False]])
    with A.capture_attention({"a": mha}) as captured:
        _, expected = mha(q, k, v, attn_mask=mask, key_padding_mask=padding, average_attn_weights=False)
    torch.testing.assert_close(captured["a"], expected, rtol=1e-5, atol=1e-6)
    assert float(captured["a"][..., 1].abs().max()) == 0.0 and float(captured["a"][0, ..., 3].abs().max()) == 0.0


def test_gradients_equal_an_unfused_reference():
    torch.manual_seed(1)
    model = TinyViT(depth=1).eval()
    x, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    weights, grads, scores = A.attention_gradients(model, A.attention_modules(model), x, target)
    torch.testing.assert_close(scores, model(x), rtol=1e-5, atol=1e-6)
    # the same model written out by hand, with the attention weights as an explicit tensor
    mha = model.attns[0]
    t = model.patch(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls.expand(2, -1, -1), t], dim=1) + model.pos
    h = model.norms[0](t)
    q, k, v = (F.linear(h, w, b) for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    q, k, v = (z.view(2, 5, 2, 8).transpose(1, 2) for z in (q, k, v))
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1)
    attn.retain_grad()
    t = t + mha.out_proj((attn @ v).transpose(1, 2).reshape(2, 5, 16))
    t = t + model.mlps[0](t)
    model.head(t[:, 0]).gather(1, target.view(-1, 1)).sum().backward()
    torch.testing.assert_close(weights["attns.0"], attn.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["attns.0"], attn.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def _rollout_by_loops(layers: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout, written out: per layer 0.5 * mean-head attention + 0.5 * I, rows renormalised,
    multiplied onto the product of the layers before."""
    n, heads, t, _ = layers[0].shape
    out = torch.zeros(n, t, t, dtype=torch.float64)
    for b in range(n):
        result = [[1.0 if i == j else 0.0 for j in range(t)] for i in range(t)]
        for attn in layers:
            mixed = [[0.0] * t for _ in range(t)]
            for i in range(t):
                row = [0.5 * sum(float(attn[b, h, i, j]) for h in range(heads)) / heads for j in range(t)]
                row[i] += 0.5
                row = [v / sum(row) for v in row]
                for j in range(t):
                    mixed[i][j] = sum(row[m] * result[m][j] for m in range(t))
            result = mixed
        out[b] = torch.tensor(result)
    return out


def test_rollout_equals_a_loop_reference_and_rows_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    layers = [torch.rand(2, 3, 4, 4, generator=gen).softmax(-1) for _ in range(3)]
    rollout = A.attention_rollout(layers)
    torch.testing.assert_close(rollout.double(), _rollout_by_loops(layers), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 4))


def test_gradient_rollout_equals_a_loop_reference():
    gen = torch.Generator().manual_seed(0)
    layers = [torch.rand(1, 2, 3, 3, generator=gen).softmax(-1) for _ in range(2)]
    grads = [torch.randn(1, 2, 3, 3, generator=gen) for _ in range(2)]
    expected = torch.eye(3, dtype=torch.float64)
    for attn, grad in zip(layers, grads):
        bar = torch.zeros(3, 3, dtype=torch.float64)
        for i in range(3):
            for j in range(3):
                bar[i, j] = sum(max(0.0, float(grad[0, h, i, j] * attn[0, h, i, j])) for h in range(2)) / 2
        expected = expected + bar @ expected
    torch.testing.assert_close(A.gradient_rollout(layers, grads)[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_entropy_and_top_key_share_tell_uniform_from_collapsed():
    uniform = torch.full((2, 3, 5, 5), 0.2)
    collapsed = torch.zeros(2, 3, 5, 5)
    collapsed[..., 0] = 1.0
    assert A.attention_entropy(uniform).tolist() == pytest.approx([math.log(5)] * 3)
    assert A.attention_entropy(collapsed).tolist() == [0.0, 0.0, 0.0]
    assert A.top_key_share(uniform).tolist() == pytest.approx([0.2] * 3)
    assert A.top_key_share(collapsed).tolist() == [1.0, 1.0, 1.0]


def test_patch_grid_finds_prefix_tokens():
    assert A.patch_grid(17, 32, 32) == (1, 4, 4)
    assert A.patch_grid(16, 32, 32) == (0, 4, 4)
    assert A.patch_grid(5, 16, 16) == (1, 2, 2)
    assert A.patch_grid(7, 16, 16) == (3, 2, 2) and A.patch_grid(3, 64, 16) is None
    maps = A.patch_map(torch.arange(25.0).view(1, 5, 5), 1, 2, 2)
    assert maps.tolist() == [[[1.0, 2.0], [3.0, 4.0]]]
    tile = render.token_overlay(torch.zeros(3, 16, 16), torch.tensor([[0.0, 1.0], [0.0, 0.0]]), scale=1.0)
    assert tile.shape == (3, 16, 16) and float(tile[:, :8, 8:].mean()) > float(tile[:, 8:, :8].mean())


# -------------------------------------------------------------------------------------------- the monitor
def _fit(pl_ns, tmp_path, monitor, model, **trainer_overrides):
    train, val = loaders(size=16)
    return fit_monitor(pl_ns, tmp_path, monitor, model, train=train, val=val, **trainer_overrides)


def test_attention_monitor_logs_heads_rollout_filmstrips_and_entropy(tmp_path, pl_ns):
    torch.manual_seed(0)
    model = TinyViT()
    hooks = hook_count(model)
    monitor = AttentionMonitor(on_error="raise", max_probes=3, tile_size=16)
    module, events = _fit(pl_ns, tmp_path, monitor, model)
    images = events.tags["images"]
    assert {"attention/rollout", "attention/heads/model.attns.0", "attention/heads/model.attns.1"} <= set(images)
    assert {"attention/filmstrip/probe_00", "attention/filmstrip/probe_01"} <= set(images)
    assert events.image_steps("attention/rollout") == [0, 4, 8]
    grid = events.image("attention/heads/model.attns.0")
    assert grid.shape[0] >= 3 * 16 and 3 * 16 < grid.shape[1] <= render.CARD_WIDTH  # 3 probes; input + 2 heads
    strip = events.image("attention/filmstrip/probe_00")
    assert strip.shape[0] > 3 * 10  # three logged epochs stacked
    entropy = events.scalars("attention/entropy/model.attns.1")
    assert [s for s, _ in entropy] == [0, 4, 8] and all(0 < v <= math.log(5) + 1e-6 for _, v in entropy)
    stats = bus_for(module.trainer).latest(AttentionStats)
    assert set(stats) == {"model.attns.0", "model.attns.1"}
    assert stats["model.attns.0"].heads == 2 and stats["model.attns.0"].tokens == 5
    assert 0 < stats["model.attns.0"].normalized_entropy <= 1
    assert hook_count(model) == hooks


def test_attention_monitor_state_keeps_probes_and_filmstrips(tmp_path, pl_ns):
    torch.manual_seed(0)
    monitor = AttentionMonitor(on_error="raise", max_probes=2, tile_size=16)
    _fit(pl_ns, tmp_path, monitor, TinyViT())
    resumed = AttentionMonitor(max_probes=2, tile_size=16)
    resumed.load_state_dict(monitor.state_dict())
    assert torch.equal(resumed.probes.images, monitor.probes.images)
    assert [label for label, _ in resumed._filmstrips[0].frames] == ["init", "ep 0", "ep 1"]
    assert resumed.state_key == monitor.state_key


def test_attention_monitor_changes_no_weight(tmp_path, pl_ns):
    def run(monitor, sub: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = TinyViT()
        _fit(pl_ns, tmp_path / sub, monitor, model)
        return [p.detach().clone() for p in model.parameters()]

    with_monitor = run(AttentionMonitor(on_error="raise", max_probes=2, tile_size=16), "a")
    without = run(pl_ns.Callback(), "b")
    assert all(torch.equal(a, b) for a, b in zip(with_monitor, without))


def test_attention_monitor_configuration_errors_and_models_without_attention(tmp_path, pl_ns):
    with pytest.raises(ValueError, match="`methods`"):
        AttentionMonitor(methods=["lrp"])
    with pytest.raises(ValueError, match="`head_fusion`"):
        AttentionMonitor(head_fusion="median")
    with pytest.raises(ValueError, match=r"`layers`: \['model.nope'\] are not supported attention modules"):
        _fit(pl_ns, tmp_path, AttentionMonitor(layers=["model.nope"]), TinyViT(), max_epochs=1)
    with warnings.catch_warnings(record=True) as record:  # a CNN: the monitor steps aside without a word
        warnings.simplefilter("always")
        _, events = _fit(pl_ns, tmp_path / "cnn", AttentionMonitor(), None, max_epochs=1)
    assert not any("AttentionMonitor" in str(w.message) for w in record)
    assert not [tag for tag in events.tags["images"] + events.tags["scalars"] if tag.startswith("attention/")]


# ------------------------------------------------------------------------------------------ the token axis
class PlantedTokens(nn.Module):
    """16 tokens of width 8 -> Linear(8, 64) -> ReLU -> Linear; hidden units 0, 4, ..., 60 can never fire."""

    DEAD = list(range(0, 64, 4))

    def __init__(self, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)  # 16x16 images -> 16 tokens of width 8
        self.fc1 = nn.Linear(8, 64)
        self.act = activation()
        self.fc2 = nn.Linear(64, 4)
        with torch.no_grad():
            self.fc1.weight[self.DEAD] = 0.0
            self.fc1.bias[self.DEAD] = -10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc2(self.act(self.fc1(tokens))).mean(dim=1)


def test_token_model_reports_dead_hidden_units_not_tokens(tmp_path, pl_ns):
    module, events = _fit(pl_ns, tmp_path, ActivationMonitor(on_error="raise"), PlantedTokens())
    stats = bus_for(module.trainer).latest(ActivationStats)["model.act"]
    assert stats.channels == 64 and stats.dead_count == 16
    assert list(stats.dead_channels) == PlantedTokens.DEAD
    assert [v for _, v in events.scalars("activations/dead_count/model.act")] == [16, 16]


def test_gelu_after_linear_reports_sparsity_per_hidden_unit(tmp_path, pl_ns):
    module, events = _fit(pl_ns, tmp_path, ActivationMonitor(on_error="raise"), PlantedTokens(nn.GELU))
    stats = bus_for(module.trainer).latest(ActivationStats)["model.act"]
    assert stats.channels == 64 and stats.dead_count is None and stats.sparsity >= 16 / 64
    assert "activations/dead_count/model.act" not in events.tags["scalars"]


def test_channel_layouts_follow_the_producing_layer():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(2), nn.Linear(7, 5), nn.Dropout(), nn.GELU()
    )
    layouts = Act.channel_layouts(model, ["2", "4", "6"])
    assert layouts == {"2": Act.Layout(1, 8), "4": Act.Layout(-1, 5), "6": Act.Layout(-1, 5)}
    assert Act.Layout(-1, 8).axis_for(torch.zeros(2, 8, 4, 4)) == 1  # a LayerNorm2d-like (N, C, H, W) output
    assert Act.Layout(-1, 8).axis_for(torch.zeros(2, 8, 8)) == -1  # as many tokens as units: the layer decides
    maps = Act.site_maps(model[:3], {"2": model[2]}, torch.randn(1, 3, 6, 6), layouts)
    assert maps[("2", 0)].shape == (8, 4, 4)
    stats = Act.ChannelStats(channel_axis=-1)
    stats.update(torch.relu(torch.randn(4, 10, 6)))
    assert stats.num_channels == 6
