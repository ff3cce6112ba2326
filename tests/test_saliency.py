"""Saliency methods: parity with Captum, a planted answer, safety on torchvision's ResNet, and SaliencyMonitor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN, fit_monitor
from torch import nn

from lightning_viz import ProbeSet, SaliencyMonitor, render
from lightning_viz._hooks import capture, hook_count, isolated
from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal
from lightning_viz.functional._autograd import gradient_context

captum_attr = pytest.importorskip("captum.attr")


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = TinyCNN(width=8).eval()
    with torch.no_grad():  # BatchNorm with non-trivial statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 16, 16, generator=gen), torch.tensor([0, 2, 1])


@pytest.fixture(autouse=True)
def _quiet_captum():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="captum")
        yield


def test_gradient_matches_captum(model, batch):
    x, t = batch
    expected = captum_attr.Saliency(model).attribute(x, target=t, abs=True).amax(dim=1)
    assert torch.allclose(sal.gradient(model, x, t), expected, atol=1e-6)


def test_smoothgrad_matches_captum_with_the_same_noise(model, batch):
    x, t = batch
    torch.manual_seed(5)
    expected = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=7, stdevs=0.3, target=t, abs=True
    )
    torch.manual_seed(5)  # Captum draws its noise this way, copies of an image consecutive
    noise = torch.normal(0, torch.tensor(0.3).repeat((3 * 7, 3, 16, 16))).view(3, 7, 3, 16, 16)
    ours = sal.smoothgrad(model, x, t, n=7, noise=noise, reduce=False, batch_size=5)
    assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("ours, theirs", [("guided_backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")])
def test_relu_rule_methods_match_captum(model, batch, ours, theirs):
    x, t = batch
    expected = getattr(captum_attr, theirs)(model).attribute(x, target=t)
    assert torch.allclose(getattr(sal, ours)(model, x, t), expected, atol=1e-6)


def test_grad_cam_matches_captum(model, batch):
    x, t = batch
    expected = captum_attr.LayerGradCam(model, model.conv2).attribute(x, target=t, relu_attributions=True)
    assert torch.allclose(sal.grad_cam(model, x, t, model.conv2, upsample=False), expected.squeeze(1), atol=1e-6)


def test_occlusion_matches_captum(model, batch):
    x, t = batch
    expected = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=0.0, target=t, perturbations_per_eval=8
    )
    result = occ.occlusion(model, x, window=4, stride=2, baseline=0.0, max_batch_bytes=7 * 3 * 16 * 16 * 4)
    assert torch.allclose(occ.occlusion_attribution(result, t, (16, 16)), expected[:, 0], atol=1e-5)


def test_fullgrad_completeness(model, batch):
    """For a piecewise-linear net, score = sum(grad_x * x) + sum over biases of (grad_out * b): FullGrad's premise."""
    x, t = batch
    scores = sal.target_scores(model(x), t)
    layers = [m for m in model.modules() if sal.effective_bias(m) is not None]
    with gradient_context(model):
        xb = x.clone().requires_grad_(True)
        with capture(layers) as captured:
            out = sal.target_scores(model(xb), t)
        outs = [o[-1] for o in captured]
        grads = torch.autograd.grad(out.sum(), [xb, *outs])
    total = (grads[0] * x).flatten(1).sum(1)
    for layer, g in zip(layers, grads[1:]):
        total += (g * sal.effective_bias(layer).view(1, -1, 1, 1)).flatten(1).sum(1)
    total += model.fc.bias[t]
    assert torch.allclose(total, scores, atol=1e-4)
    maps = sal.fullgrad(model, x, t)
    assert maps.shape == (3, 16, 16) and (maps >= 0).all()

    def normalised(v):  # |v| min-max scaled per image, as in the FullGrad paper's code
        flat = v.abs().flatten(1)
        flat = flat - flat.min(1, keepdim=True).values
        return (flat / (flat.max(1, keepdim=True).values + 1e-6)).view_as(v)

    expected = normalised(grads[0] * x).sum(1)
    for layer, g in zip(layers, grads[1:]):
        term = normalised(g * sal.effective_bias(layer).view(1, -1, 1, 1))
        expected += F.interpolate(term, size=(16, 16), mode="bilinear", align_corners=True).sum(1)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-5)


class RegionModel(nn.Module):
    """The logits depend only on the 6x6 square at the top left: the input is masked before anything else."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 24, 24)
        mask[..., :6, :6] = 1
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x * self.mask)).mean(dim=(2, 3)))


def _inside_share(maps: torch.Tensor, size: int) -> float:
    maps = maps.abs().flatten(1) if maps.ndim == 3 else maps.abs().sum(1).flatten(1)
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[:size, :size] = True
    return float(maps[:, inside.flatten()].sum() / maps.sum())


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "guided_backprop", "deconvnet", "gradcam", "fullgrad"])
def test_every_method_finds_the_planted_region(method):
    torch.manual_seed(0)
    model = RegionModel().eval()
    x = torch.rand(4, 3, 24, 24) + 0.1
    t = model(x).argmax(1)
    if method == "gradcam":
        maps = sal.grad_cam(model, x, t, model.conv)
    elif method == "smoothgrad":
        maps = sal.smoothgrad(model, x, t, n=8, generator=torch.Generator().manual_seed(0))
    else:
        maps = getattr(sal, method)(model, x, t)
    assert maps.abs().sum() > 0
    assert _inside_share(maps, 6 + 1) > 0.95  # +1 pixel: the bilinear upsampling of Grad-CAM / FullGrad terms


def test_occlusion_finds_the_planted_region():
    torch.manual_seed(0)
    model = RegionModel().eval()
    x = torch.rand(2, 3, 24, 24) + 0.1
    t = model(x).argmax(1)
    result = occ.occlusion(model, x, window=4, stride=2)
    drop = occ.occlusion_attribution(result, t, (24, 24))
    assert _inside_share(drop, 6 + 4) > 0.99
    prob = result.probability(t)
    assert torch.allclose(prob[:, -1, -1], model(x).softmax(1).gather(1, t.view(-1, 1)).squeeze(1))


def test_fast_copy_gives_the_same_maps():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    fast = sal.inference_copy(model)
    assert isinstance(fast, torch.fx.GraphModule) and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert torch.allclose(sal.gradient(fast, x, t), sal.gradient(model, x, t), rtol=1e-3, atol=1e-6)
    assert torch.allclose(sal.guided_backprop(fast, x, t), sal.guided_backprop(model, x, t), rtol=1e-3, atol=1e-6)
    a = occ.occlusion(fast, x, window=8, stride=8).logits
    assert torch.allclose(a, occ.occlusion(model, x, window=8, stride=8).logits, rtol=1e-3, atol=1e-4)
    cl = sal.inference_copy(model, channels_last=True)
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(sal.gradient(cl, x, t), sal.gradient(model, x, t), rtol=1e-3, atol=1e-6)


def test_grad_cam_on_the_copy_keeps_its_layer_unfolded():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    with torch.no_grad():
        model.layer4[1].bn2.running_mean.uniform_(-0.5, 0.5)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    fast = sal.inference_copy(model, keep=["layer4.1.conv2"])
    bns = [name for name, m in fast.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == ["layer4.1.bn2"]  # every other BatchNorm is folded away
    layer = fast.get_submodule("layer4.1.conv2")
    assert torch.allclose(
        sal.grad_cam(fast, x, t, layer), sal.grad_cam(model, x, t, model.layer4[1].conv2), rtol=1e-3, atol=1e-6
    )


def test_resnet18_every_method_runs_and_the_model_is_unchanged():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.layer2.eval()  # mixed modes must come back as they were
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = {
        "modules": [type(m) for m in model.modules()],
        "inplace": [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)],
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": hook_count(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([3, 4])
    with isolated(model, grad=True):
        fast = sal.inference_copy(model)
        maps = {
            "gradient": sal.gradient(fast, x, t),
            "smoothgrad": sal.smoothgrad(fast, x, t, n=4, generator=torch.Generator().manual_seed(0)),
            "guided": sal.guided_backprop(model, x, t),
            "deconvnet": sal.deconvnet(model, x, t),
            "gradcam": sal.grad_cam(model, x, t, model.layer4[1].conv2),
            "fullgrad": sal.fullgrad(model, x, t),
        }
        result = occ.occlusion(model, x, window=16, stride=16, layer=model.layer3)
    for name, value in maps.items():
        assert torch.isfinite(value).all() and value.abs().sum() > 0, name
    assert result.layer_total.shape == (2, 4, 4)
    assert [type(m) for m in model.modules()] == before["modules"]
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == before["inplace"]
    assert [m.training for m in model.modules()] == before["training"]
    assert all(p.grad is g for p, g in zip(model.parameters(), before["grads"]))
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert hook_count(model) == before["hooks"]
    assert all("forward" not in m.__dict__ for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before["state"][key]), key


def test_relu_rules_warn_without_relu_modules():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).eval()
    with pytest.warns(UserWarning, match="no nn.ReLU modules"):
        sal.guided_backprop(model, torch.randn(1, 3, 16, 16), torch.tensor([0]))


def test_methods_work_inside_inference_mode(model, batch):
    x, t = batch
    with torch.inference_mode():
        g = sal.gradient(model, x, t)
        cam = sal.grad_cam(model, x, t, model.conv2)
    assert g.abs().sum() > 0 and cam.shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- the monitor
_fit = fit_monitor


def test_monitor_grid_rows_columns_and_filmstrips(tmp_path, pl_ns):
    probes = ProbeSet(torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), [0, 1, 2])
    monitor = SaliencyMonitor(
        probes=probes,
        occlusion_window=4,
        occlusion_stride=4,
        tile_size=32,
        every_n_epochs=1,
        filmstrip_probes=3,
        on_error="raise",
    )
    module, events = _fit(pl_ns, tmp_path, monitor)
    assert events.image_steps("saliency/grid") == [0, 4, 8]
    grid = events.image("saliency/grid")
    module.eval()
    with torch.no_grad():
        mismatches = int((module(probes.images).argmax(1) != probes.labels).sum())
    # rows of 32-pixel tiles (the input column at x = 17), one per probe and class explained
    inked = (grid[:, 17] < 250).any(axis=1)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, inked.astype(int), 0])).reshape(-1, 2), axis=1).ravel()
    assert (runs == 32).sum() == 3 + mismatches
    columns = 1 + 6 + 2  # input, six maps, occlusion probability and top class
    assert grid.shape[1] == render.CARD_WIDTH >= 1 + columns * (32 + 1)  # sized for TensorBoard's card
    for probe in range(3):
        steps = events.image_steps(f"saliency/filmstrip/probe_{probe:02d}")
        assert steps == [0, 4, 8]
    strip_first, strip_last = (events.image("saliency/filmstrip/probe_00", i) for i in (0, -1))
    grown = strip_last.shape[0] - strip_first.shape[0]
    assert grown % 2 == 0 and grown // 2 >= 21  # a row of (two-thirds size) tiles per logged epoch, under one header


def test_monitor_says_once_when_incremental_occlusion_falls_back(tmp_path, pl_ns, monkeypatch):
    from lightning_viz.functional._incremental import IncrementalOcclusion

    real = IncrementalOcclusion.forward
    monkeypatch.setattr(IncrementalOcclusion, "forward", lambda self, *a: real(self, *a) + 1.0)  # a wrong patch
    # 6 probes x 13 x 13 positions: enough for the incremental path (functional.occlusion.INCREMENTAL_MIN_POSITIONS)
    monitor = SaliencyMonitor(
        methods=["occlusion"], occlusion_window=4, occlusion_stride=1, every_n_epochs=1, on_error="raise"
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, events = _fit(pl_ns, tmp_path, monitor)
    said = [str(w.message) for w in record if "full forward passes" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("SaliencyMonitor:")
    assert events.image_steps("saliency/grid") == [0, 4, 8]  # the maps are still drawn, from full passes


def test_monitor_chooses_probes_from_the_validation_data(tmp_path, pl_ns):
    monitor = SaliencyMonitor(
        methods=["gradient", "occlusion"], occlusion_window=8, max_probes=2, every_n_epochs=1, on_error="raise"
    )
    _, events = _fit(pl_ns, tmp_path, monitor, max_epochs=1)
    assert events.image_steps("saliency/grid") == [0, 4]
    assert monitor.probes.is_resolved and len(monitor.probes) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"methods": ["gradient", "lrp"]}, ValueError, r"unknown name\(s\) \['lrp'\]; available: \['gradient'"),
        ({"methods": "gradient"}, TypeError, r"`methods` must be a list"),
        ({"methods": []}, ValueError, r"`methods` is empty"),
        ({"smoothgrad_samples": 0}, ValueError, r"`smoothgrad_samples`"),
        ({"noise_level": -0.1}, ValueError, r"`noise_level` must be in \[0.0, inf\]"),
        ({"probes": torch.zeros(2, 3, 8, 8)}, TypeError, r"`probes` must be a lightning_viz.ProbeSet"),
        ({"gradcam_layer": 3}, TypeError, r"`gradcam_layer` must be a layer name"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SaliencyMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"probes": ProbeSet(torch.zeros(2, 1, 16, 16))},
            r"`probes`: the images have 1 channels, but the model's first",
        ),
        ({"probes": ProbeSet(torch.zeros(2, 3, 16, 16)), "occlusion_window": 32}, r"`occlusion_window`=32 is larger"),
        ({"gradcam_layer": "model.fc"}, r"`gradcam_layer`: layer 'model.fc' is a Linear, not a nn.Conv2d"),
        ({"gradcam_layer": "model.conv9"}, r"`gradcam_layer`: the model has no layer named 'model.conv9'"),
        ({"occlusion_layer": "model.nope"}, r"`occlusion_layer`: the model has no layer named 'model.nope'"),
    ],
)
def test_bad_input_fails_at_setup(tmp_path, pl_ns, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(pl_ns, tmp_path, SaliencyMonitor(**kwargs))


def test_probe_dtype_and_shape_errors():
    with pytest.raises(ValueError, match=r"float tensor of shape \(N, C, H, W\)"):
        ProbeSet(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"float tensor of shape \(N, C, H, W\)"):
        ProbeSet(torch.zeros(3, 16, 16))


def test_probes_the_model_cannot_take(tmp_path, pl_ns):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 4))
    monitor = SaliencyMonitor(probes=ProbeSet(torch.zeros(2, 3, 8, 8)), occlusion_window=4)
    with pytest.raises(ValueError, match=r"`probes`: the model cannot take the probe images of shape \(2, 3, 8, 8\)"):
        _fit(pl_ns, tmp_path, monitor, model=model)


class _ReusedInplaceReLU(nn.Module):
    """One inplace ReLU module applied three times, a residual addition, and a negative-slope path: the rules must
    apply at every call and never edit a tensor autograd saved."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.relu(self.a(x))
        h = self.relu(self.b(h) + h)
        return self.head(self.relu(self.b(h) - 0.1).mean((2, 3)))


@pytest.mark.parametrize("make", [TinyCNN, _ReusedInplaceReLU], ids=["tiny", "reused-inplace"])
@pytest.mark.parametrize("rules", [("plain", "guided", "deconvnet"), ("deconvnet", "plain"), ("guided",)])
def test_one_forward_pass_serves_every_relu_rule(make, rules):
    # gradient, guided backprop and deconvnet from one forward pass per batch (several backward passes over its graph):
    # each equals its method run alone, in any order or subset, in chunks smaller than the batch
    torch.manual_seed(0)
    model = make().eval()
    x, target = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        got = sal.relu_rule_gradients(model, x, target, rules, batch_size=2)
    finally:
        handle.remove()
    assert len(forwards) == 3  # 5 images in batches of 2: one forward pass per batch, whatever the rules
    alone = {
        "plain": sal.input_gradient(model, x, target, batch_size=2),
        "guided": sal.guided_backprop(model, x, target, batch_size=2),
        "deconvnet": sal.deconvnet(model, x, target, batch_size=2),
    }
    assert set(got) == set(rules)
    for rule in rules:
        assert torch.allclose(got[rule], alone[rule], atol=1e-6), rule
    assert not torch.allclose(alone["guided"], alone["deconvnet"])  # the rules differ on these models
    assert all("forward" not in m.__dict__ for m in model.modules()) and all(p.grad is None for p in model.parameters())


def test_relu_rules_on_a_model_without_relu_modules_warn_and_give_the_plain_gradient():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    model(x)
    with pytest.warns(UserWarning, match="deconvnet, guided: the model has no nn.ReLU"):
        got = sal.relu_rule_gradients(model, x, target, ["plain", "guided", "deconvnet"])
    assert torch.equal(got["guided"], got["plain"]) and torch.equal(got["deconvnet"], got["plain"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sal.relu_rule_gradients(model, x, target, ["plain"])  # nothing to say for the plain gradient alone
