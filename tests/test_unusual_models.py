"""Saliency on unusual models, checked against Captum: models that edit their input in place, conv+BatchNorm
pairs that are not safe to fold, occlusion windows that do not tile the image, single-logit and multi-label heads."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import Events, TinyCNN, make_data, trainer_kwargs
from test_compat_matrix import classifier
from torch import nn
from torch.utils.data import DataLoader

from lightning_viz import ProbeSet, SaliencyMonitor, render
from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal
from lightning_viz.functional._incremental import IncrementalOcclusion

captum_attr = pytest.importorskip("captum.attr")


@pytest.fixture(autouse=True)
def _quiet_captum():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="captum")
        yield


def _bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


# ------------------------------------------------------------------------------ models that edit their input
def _in_view(x):
    x[:, :2].mul_(0.5)
    return x


def _write_channel(x):
    x[:, 0] = x[:, 1]
    return x


#: name -> (the in-place edit, the same edit out of place)
EDITS = {
    "sub_": (lambda x: x.sub_(0.5), lambda x: x - 0.5),
    "mul_": (lambda x: x.mul_(2.0), lambda x: x * 2.0),
    "clamp_": (lambda x: x.clamp_(-1.0, 1.0), lambda x: x.clamp(-1.0, 1.0)),
    "view": (_in_view, lambda x: torch.cat([x[:, :2] * 0.5, x[:, 2:]], dim=1)),
    "x[:, 0]=": (_write_channel, lambda x: torch.cat([x[:, 1:2], x[:, 1:]], dim=1)),
}


class EditsInput(nn.Module):
    def __init__(self, edit: str, in_place: bool = True) -> None:
        super().__init__()
        self.edit = EDITS[edit][0 if in_place else 1]
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.edit(x))))
        return self.fc(self.relu2(self.conv2(F.max_pool2d(x, 2))).mean(dim=(2, 3)))


def _pair(edit: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _bn_stats(EditsInput(edit))
    twin = EditsInput(edit, in_place=False).eval()
    twin.load_state_dict(model.state_dict())
    return model, twin


_X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
_T = torch.tensor([0, 2])


@pytest.mark.parametrize("edit", list(EDITS))
def test_models_that_edit_their_input_match_captum(edit):
    model, twin = _pair(edit)
    x = _X.clone()
    clean = lambda t: model(t.clone())  # noqa: E731 -- Captum's reference, with the input copied
    # gradient
    expected = captum_attr.Saliency(clean).attribute(x.clone(), target=_T, abs=True).amax(dim=1)
    assert torch.allclose(sal.gradient(model, x, _T), expected, atol=1e-6)
    # SmoothGrad with the same noise
    torch.manual_seed(5)
    expected = captum_attr.NoiseTunnel(captum_attr.Saliency(clean)).attribute(
        x.clone(), nt_type="smoothgrad", nt_samples=3, stdevs=0.3, target=_T, abs=True
    )
    torch.manual_seed(5)
    noise = torch.normal(0, torch.tensor(0.3).repeat((2 * 3, 3, 12, 12))).view(2, 3, 3, 12, 12)
    assert torch.allclose(sal.smoothgrad(model, x, _T, n=3, noise=noise, reduce=False), expected, atol=1e-6)
    # Grad-CAM
    expected = captum_attr.LayerGradCam(clean, model.conv2).attribute(x.clone(), target=_T, relu_attributions=True)
    assert torch.allclose(sal.grad_cam(model, x, _T, model.conv2, upsample=False), expected.squeeze(1), atol=1e-6)
    # occlusion: windows cut from the clean image, on both paths
    expected = captum_attr.Occlusion(clean).attribute(
        x.clone(), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=0.0, target=_T
    )[:, 0]
    for incremental in (True, False):
        result = occ.occlusion(model, x, window=4, stride=2, incremental=incremental)
        assert torch.allclose(occ.occlusion_attribution(result, _T, (12, 12)), expected, atol=1e-5), incremental
    # FullGrad, guided backprop (no Captum FullGrad): as on the same model editing a copy
    assert torch.allclose(sal.fullgrad(model, x, _T), sal.fullgrad(twin, x, _T), atol=1e-5)
    assert torch.allclose(sal.guided_backprop(model, x, _T), sal.guided_backprop(twin, x, _T), atol=1e-6)
    # and on the folded copy
    assert torch.allclose(
        sal.gradient(sal.inference_copy(model, example=x), x, _T), sal.gradient(twin, x, _T), atol=1e-5
    )
    assert torch.equal(x, _X)  # the caller's images are untouched


# ------------------------------------------------------------------------------------------ fold_batchnorm
class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn2(self.conv(torch.relu(self.bn1(self.conv(x))))).mean(dim=(2, 3)))


class ConvIntoResidual(nn.Module):
    """A conv whose output feeds a BatchNorm and a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


class SumIntoBatchNorm(nn.Module):
    """A BatchNorm applied to the sum of two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.a(x) + self.b(x)).mean(dim=(2, 3)))


class SharedBatchNorm(nn.Module):
    """One BatchNorm after each of two convs (each conv called once): folding it into both is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.b(torch.relu(self.bn(self.a(x))))).mean(dim=(2, 3)))


def _batchnorms_called(model: nn.Module) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_module" and "bn" in str(n.target))


@pytest.mark.parametrize(
    "make, folded",
    [(SharedConv, 0), (ConvIntoResidual, 0), (SumIntoBatchNorm, 0), (SharedBatchNorm, 2), (TinyCNN, 2)],
    ids=["shared-conv", "conv-into-residual", "sum-into-bn", "shared-bn", "conv-bn-relu"],
)
def test_fold_batchnorm_folds_only_safe_pairs(make, folded):
    torch.manual_seed(0)
    model = _bn_stats(make())
    x = torch.randn(2, 3, 8, 8)
    before = _batchnorms_called(torch.fx.symbolic_trace(model))
    copy = sal.fold_batchnorm(model, example=x)
    assert before - _batchnorms_called(copy) == folded
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to say: the copy is exact
            assert torch.allclose(sal.inference_copy(model, example=x)(x), model(x), atol=1e-5)


def test_a_wrong_fold_falls_back_to_the_unfolded_copy(monkeypatch):
    """Were the shared conv folded anyway (the old rule), the check on the probes catches it."""
    torch.manual_seed(0)
    model, x = _bn_stats(SharedConv()), torch.randn(2, 3, 8, 8)
    unsafe = lambda gm, keep: [(n.args[0], n) for n in gm.graph.nodes if str(n.target).startswith("bn")]  # noqa: E731
    monkeypatch.setattr(sal, "_foldable_pairs", unsafe)
    with pytest.raises(sal.FoldingError, match="differs by up to"):
        sal.fold_batchnorm(model, example=x)
    with pytest.warns(UserWarning, match="not folded .*FoldingError"):
        copy = sal.inference_copy(model, example=x)
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-6)


class Untraceable(TinyCNN):
    def forward(self, x):
        return super().forward(x) if x.sum() > -1e9 else -super().forward(x)  # data-dependent control flow


def test_a_model_that_cannot_be_traced_is_copied_unfolded_and_says_so():
    model, x = _bn_stats(Untraceable()), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="Untraceable are not folded"):
        copy = sal.inference_copy(model)
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-6)


# ---------------------------------------------------------------------- occlusion windows that don't tile
@pytest.mark.parametrize("h, w, window, stride", [(30, 30, 8, 4), (17, 23, 5, 3), (17, 23, 6, 4), (14, 19, 4, 3)])
def test_occlusion_windows_that_do_not_tile_match_captum(h, w, window, stride):
    torch.manual_seed(0)
    model = _bn_stats(TinyCNN(width=4))
    x, t = torch.randn(2, 3, h, w), torch.tensor([1, 3])
    expected = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.5, target=t,
        perturbations_per_eval=64,
    )[:, 0]  # fmt: skip
    tops, lefts = occ.occlusion_grid(h, w, window, stride)
    assert tops[-1] + window >= h and lefts[-1] + window >= w  # every pixel covered
    for incremental in (True, False):
        result = occ.occlusion(model, x, window=window, stride=stride, baseline=0.5, incremental=incremental)
        got = occ.occlusion_attribution(result, t, (h, w))
        assert torch.allclose(got, expected, atol=1e-5), incremental
    # the incremental path itself, with the truncated windows, equals full passes
    built = IncrementalOcclusion.build(model, x[:1], window, stride, max_area=1.0)
    assert built is not None
    built.prepare(x)
    pos = [(i, tp, lf) for i in range(2) for tp in tops for lf in lefts]
    image, top, left = (torch.tensor(v) for v in zip(*pos))
    occluded = x[image].clone()
    for b, (_, tp, lf) in enumerate(pos):
        occluded[b, :, tp : tp + window, lf : lf + window] = 0.5
    with torch.no_grad():
        assert torch.allclose(built.forward(image, top, left, window, 0.5), model(occluded), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- heads
class OneLogit(TinyCNN):
    def __init__(self) -> None:
        super().__init__(num_classes=1)


def test_a_single_logit_head_explains_the_log_odds_as_captum_does():
    """Captum explains class c of the two-column output (-logit, logit); so do we, from the single logit."""
    torch.manual_seed(0)
    model = _bn_stats(OneLogit())
    two = lambda t: (lambda logit: torch.cat([-logit, logit], dim=1))(model(t))  # noqa: E731
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 1])
    expected = captum_attr.Saliency(two).attribute(x, target=t, abs=True).amax(dim=1)
    assert torch.allclose(sal.gradient(model, x, t), expected, atol=1e-6)
    expected = captum_attr.LayerGradCam(two, model.conv2).attribute(x, target=t, relu_attributions=True)
    assert torch.allclose(sal.grad_cam(model, x, t, model.conv2, upsample=False), expected.squeeze(1), atol=1e-6)
    expected = captum_attr.Occlusion(two).attribute(x, sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), target=t)
    result = occ.occlusion(model, x, window=4, stride=4)
    assert torch.allclose(occ.occlusion_attribution(result, t, (16, 16)), expected[:, 0], atol=1e-5)
    # the occlusion probability is the sigmoid's, the top class `logit > 0`
    p1 = result.logits.squeeze(-1).sigmoid()
    assert torch.allclose(result.probability(torch.tensor([0, 1, 1])), torch.stack([1 - p1[0], p1[1], p1[2]]))
    assert torch.equal(result.top_class(), (result.logits.squeeze(-1) > 0).long())
    with pytest.raises(ValueError, match="classes 0 and 1"):
        sal.gradient(model, x, torch.tensor([0, 1, 2]))


def test_head_outputs():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 4.0]])
    probs, pred = sal.head_outputs(logits)
    assert torch.allclose(probs, logits.softmax(1)) and pred.tolist() == [0, 2]
    probs, pred = sal.head_outputs(logits, "multilabel")
    assert torch.allclose(probs, logits.sigmoid()) and pred.tolist() == [0, 2]
    result = occ.OcclusionResult(logits.view(2, 1, 1, 3), logits, [0], [0], 1)  # a multi-label occlusion map
    assert torch.allclose(
        result.probability(torch.tensor([1, 2]), "multilabel").flatten(), logits.sigmoid()[:, 1:].diag()
    )
    probs, pred = sal.head_outputs(torch.tensor([[1.5], [-0.2]]))
    assert pred.tolist() == [1, 0] and torch.allclose(probs[:, 1], torch.tensor([1.5, -0.2]).sigmoid())
    assert torch.allclose(probs.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="`head`='sigmoid' is a binary head with one logit"):
        sal.head_outputs(logits, "sigmoid")
    with pytest.raises(ValueError, match="`head`='softmax' needs at least two outputs"):
        sal.head_outputs(logits[:, :1], "softmax")
    with pytest.raises(ValueError, match="`head` must be one of"):
        SaliencyMonitor(head="logits")


def _binary_module(pl_ns, model: nn.Module):
    return classifier(pl_ns, model, "bce", lr=0.05)


def test_monitor_on_a_single_logit_binary_classifier(tmp_path, pl_ns, monkeypatch):
    seen: list[tuple[list[str], list[str]]] = []  # (column titles, row captions) of each saliency grid drawn
    real = render.saliency_panel
    monkeypatch.setattr(
        render,
        "saliency_panel",
        lambda t, titles, rows, **kw: seen.append((list(titles), list(rows))) or real(t, titles, rows, **kw),
    )
    data = make_data(48, classes=2)
    probes = ProbeSet(data.tensors[0][:4], data.tensors[1][:4].tolist())
    monitor = SaliencyMonitor(
        probes=probes, occlusion_window=4, occlusion_stride=4, smoothgrad_samples=2, tile_size=24, every_n_epochs=1,
        on_error="raise",  # a method that failed would raise here instead of switching off
    )  # fmt: skip
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    module = _binary_module(pl_ns, OneLogit())
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(make_data(16, classes=2, seed=1), batch_size=16))
    grid = Events(str(tmp_path / "run")).image("saliency/grid")
    assert grid.shape[1] <= render.CARD_WIDTH
    titles, captions = seen[-1]
    assert len(titles) == 1 + 6 + 2  # input, six maps, occlusion probability and top class: no method switched off
    module.eval()
    with torch.no_grad():
        logit = module(probes.images).squeeze(1)
    pred = (logit > 0).long()
    p = torch.where(pred == 1, logit.sigmoid(), 1 - logit.sigmoid())
    expected = []
    for i, (y, c) in enumerate(zip(probes.labels.tolist(), pred.tolist())):
        expected.append(f"p{i}: true {y}, pred {c} {float(p[i]):.2f}")
        if c != y:
            expected.append(f"p{i}: pred {c} {float(p[i]):.2f} (explained)")
    assert captions == expected


def test_monitor_head_that_does_not_fit_the_model_fails_at_setup(tmp_path, pl_ns):
    probes = ProbeSet(torch.randn(2, 3, 16, 16), [0, 1])
    monitor = SaliencyMonitor(probes=probes, head="sigmoid", methods=["gradient"])
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match="`head`='sigmoid'.*4 outputs.*'multilabel'"):
        trainer.fit(_binary_module(pl_ns, TinyCNN()), DataLoader(make_data(16), batch_size=16))
