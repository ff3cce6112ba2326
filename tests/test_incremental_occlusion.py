"""Incremental occlusion: recomputing only the window's patch gives the same outputs as full forward passes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN
from torch import nn

from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal
from lightning_viz.functional._incremental import IncrementalOcclusion


def _full(model, x, **kw):
    return occ.occlusion(model, x, incremental=False, **kw)


def _incremental(model, x, **kw):
    """The incremental path, failing if its check against full passes rejected it (that would hide a wrong patch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return occ.occlusion(model, x, **{"incremental": True, **kw})


def _local_steps(model, x, window, stride):
    built = IncrementalOcclusion.build(model, x[:1], window, stride)
    assert built is not None, "the incremental path must be taken for this model"
    return [s.kind for s in built.steps], [n.name for n in built.frontier]


class Branchy(nn.Module):
    """Every supported local op in the first layers: dilation, rectangular padding, functional ReLU, a residual
    add of two branches, average pooling with padding, LeakyReLU and an unfolded BatchNorm; then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, (5, 3), stride=(2, 1), padding=(2, 1))
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(8, 8, 1)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.mp = nn.MaxPool2d(3, stride=1, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = torch.add(self.a(h), self.b(h))
        h = self.mp(self.pool(self.act(h)))
        return self.head(h.mean(dim=(2, 3)))


class Untraceable(TinyCNN):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return super().forward(x)
        return super().forward(-x)


class SharedInPlace(nn.Module):
    """An in-place ReLU on a tensor that is read again afterwards: the model then sees the ReLU'd values there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        a = self.relu(h)  # h itself is now ReLU'd too
        return self.head((h + self.conv2(a)).mean(dim=(2, 3)))


def _bn_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("window,stride", [(8, 4), (10, 6), (5, 3), (16, 16)])
def test_resnet18_incremental_equals_full_passes(window, stride):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = _bn_stats(resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 48, 48)
    fast = sal.inference_copy(model)
    for net in (fast, model):  # folded copy and the plain model (BatchNorm as its own step)
        kinds, _ = _local_steps(net, x, window, stride)
        assert kinds.count("window") >= 2 and (window == 16 or "add" in kinds)
        got = _incremental(net, x, window=window, stride=stride, max_batch_bytes=13 * x[0].numel() * 4)
        want = _full(net, x, window=window, stride=stride)
        assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.clean_logits, want.clean_logits) or torch.allclose(got.clean_logits, want.clean_logits)


def test_every_supported_op_gives_exact_patches():
    torch.manual_seed(0)
    model = _bn_stats(Branchy()).eval()
    x = torch.randn(3, 3, 23, 19)  # odd sizes: windows never end on the border
    kinds, frontier = _local_steps(model, x, 4, 3)
    assert kinds[:4] == ["input", "window", "pointwise", "pointwise"] and "add" in kinds
    got = _incremental(model, x, window=4, stride=3, baseline=0.7)
    want = _full(model, x, window=4, stride=3, baseline=0.7)
    assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-6)
    model.to(memory_format=torch.channels_last)  # weights channels-last: patches and maps follow that layout
    got = _incremental(model, x.contiguous(memory_format=torch.channels_last), window=4, stride=3, baseline=0.7)
    assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-6)


def test_matches_captum_on_the_incremental_path():
    captum_attr = pytest.importorskip("captum.attr")
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    _local_steps(model, x, 8, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="captum")
        expected = captum_attr.Occlusion(model).attribute(
            x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.0, target=t, perturbations_per_eval=49
        )
    result = _incremental(model, x, window=8, stride=4)
    assert torch.allclose(occ.occlusion_attribution(result, t, (32, 32)), expected[:, 0], atol=1e-4)


def test_models_it_cannot_split_run_full_passes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    untraceable = Untraceable().eval()
    assert IncrementalOcclusion.build(untraceable, x[:1], 4, 4) is None
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()  # nothing local to recompute
    assert IncrementalOcclusion.build(flat, x[:1], 4, 4) is None
    for model in (untraceable, flat):
        got = occ.occlusion(model, x, window=4, stride=4, incremental=True)
        assert torch.allclose(got.logits, _full(model, x, window=4, stride=4).logits)


def test_batchnorm_without_running_statistics_is_not_local():
    """In eval mode it still normalises with the batch's statistics: a patch would not be exact, so the split stops."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4 * 64, 3)
    ).eval()
    x = torch.randn(3, 3, 8, 8)
    built = IncrementalOcclusion.build(model, x[:1], 2, 2)
    assert built is not None and [s.kind for s in built.steps] == ["input", "window"]
    got = _incremental(model, x, window=2, stride=2)
    assert torch.allclose(got.logits, _full(model, x, window=2, stride=2).logits, atol=1e-6)


def test_an_in_place_op_on_a_shared_tensor_ends_the_local_layers():
    torch.manual_seed(0)
    model = SharedInPlace().eval()
    x = torch.randn(2, 3, 12, 12)
    kinds, frontier = _local_steps(model, x, 3, 3)
    assert kinds == ["input", "window"] and frontier == ["conv"]
    got = _incremental(model, x, window=3, stride=3)
    assert torch.allclose(got.logits, _full(model, x, window=3, stride=3).logits, atol=1e-6)


class ReadsItsShape(nn.Module):
    """Reads the input's size before its first layer, as many models do (`x.view(x.size(0), -1)` style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        n = x.shape[0]
        h = self.pool(F.relu(self.conv(x)))
        return self.fc(h.reshape(n, -1)) + x.mean()  # the raw input is read again at the end


def test_size_queries_do_not_end_the_local_layers():
    torch.manual_seed(0)
    model = ReadsItsShape().eval()
    x = torch.randn(2, 3, 12, 12)
    kinds, frontier = _local_steps(model, x, 3, 3)
    assert kinds == ["input", "window", "pointwise", "window"] and frontier == ["x", "pool"]
    got = _incremental(model, x, window=3, stride=3, baseline=0.5)
    assert torch.allclose(got.logits, _full(model, x, window=3, stride=3, baseline=0.5).logits, atol=1e-6)


def test_a_wrong_patch_is_caught_and_full_passes_are_used(monkeypatch):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    _local_steps(model, x, 4, 4)
    real = IncrementalOcclusion.forward
    monkeypatch.setattr(IncrementalOcclusion, "forward", lambda self, *a: real(self, *a) + 1.0)
    with pytest.warns(occ.IncrementalMismatchWarning, match="using full forward passes"):
        got = occ.occlusion(model, x, window=4, stride=4, incremental=True)
    assert torch.allclose(got.logits, _full(model, x, window=4, stride=4).logits)


def test_a_layer_map_uses_full_passes():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    got = occ.occlusion(model, x, window=4, stride=4, layer=model.conv2)
    want = _full(model, x, window=4, stride=4, layer=model.conv2)
    assert got.layer_total is not None and torch.allclose(got.layer_total, want.layer_total)
    assert torch.allclose(got.logits, want.logits)


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    occ.occlusion(model, torch.randn(2, 3, 16, 16), window=4, stride=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_no_graph_is_built_for_a_model_that_wants_gradients():
    torch.manual_seed(0)
    model = TinyCNN().eval()  # parameters require grad, as in training
    with torch.inference_mode():  # as in Lightning's validation loop
        for incremental in (True, False):
            result = occ.occlusion(model, torch.randn(2, 3, 16, 16), window=4, stride=4, incremental=incremental)
            assert not result.logits.requires_grad and not result.clean_logits.requires_grad


@pytest.mark.parametrize("make", [Branchy, TinyCNN], ids=["branchy", "tiny"])
def test_patches_are_exact_through_every_local_layer(make):
    """With no area limit the patch runs through all local layers (pooling with -inf padding included)."""
    torch.manual_seed(0)
    model = _bn_stats(make()).eval()
    x = torch.randn(2, 3, 23, 19)
    built = IncrementalOcclusion.build(model, x[:1], 5, 2, max_area=1.0)
    assert built is not None and built.steps[-1].node.name in ("mp", "relu2")
    clean = built.prepare(x)
    assert torch.allclose(clean, model(x))
    tops, lefts = occ.occlusion_grid(23, 19, 5, 2)
    pos = [(i, t, lf) for i in range(2) for t in tops for lf in lefts]
    image, top, left = (torch.tensor(v) for v in zip(*pos))
    got = built.forward(image, top, left, 5, -0.5)
    occluded = x[image].clone()
    for b, (_, t, lf) in enumerate(pos):
        occluded[b, :, t : t + 5, lf : lf + 5] = -0.5
    with torch.no_grad():
        assert torch.allclose(got, model(occluded), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "images, stride, traced", [(1, 4, False), (1, 1, False), (2, 1, True), (4, 2, False), (4, 1, True)]
)
def test_auto_traces_the_model_only_where_enough_positions_pay_for_it(monkeypatch, images, stride, traced):
    # A smallest call (one probe, windows side by side) on a short run: tracing and checking the patch cost about
    # twice the full passes it would save, so "auto" runs full passes below INCREMENTAL_MIN_POSITIONS positions.
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(images, 3, 16, 16)
    builds = []
    real = IncrementalOcclusion.build
    monkeypatch.setattr(IncrementalOcclusion, "build", lambda *a, **k: builds.append(1) or real(*a, **k))
    got = occ.occlusion(model, x, window=4, stride=stride)
    positions = images * len(range(0, 16 - 4 + 1, stride)) ** 2
    assert (positions >= occ.INCREMENTAL_MIN_POSITIONS) == traced and bool(builds) == traced
    want = _full(model, x, window=4, stride=stride)
    assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5)
