"""Wrong configurations and inputs across the suite: each gives a clear message, and no training run is lost.

Construction errors happen before a Trainer exists; set-up errors happen in ``setup``, before the first step
(``global_step == 0``: nothing was trained, so nothing is lost); run-time trouble warns once and training finishes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_viz as lv

CONSTRUCTION = [
    (lambda: lv.FilterMonitor(every_n_epochs=0), ValueError, r"`every_n_epochs` must be a positive int"),
    (lambda: lv.FilterMonitor(on_error="ignore"), ValueError, r"`on_error` must be one of"),
    (lambda: lv.FilterMonitor(scale=0.0), ValueError, r"`scale` must be 'running_max' or a positive"),
    (lambda: lv.FilterMonitor(layers="conv1"), TypeError, r"`layers` must be a list of layer names"),
    (lambda: lv.FilterMonitor(max_filters=-1), ValueError, r"`max_filters`"),
    (lambda: lv.ActivationMonitor(max_batches=0), ValueError, r"`max_batches`"),
    (lambda: lv.ActivationMonitor(count_dead="yes"), TypeError, r"`count_dead`"),
    (lambda: lv.SaliencyMonitor(methods=["gradient", "shap"]), ValueError, r"`methods`: unknown name\(s\) \['shap'\]"),
    (lambda: lv.SaliencyMonitor(noise_level=-1), ValueError, r"`noise_level` must be in \[0.0, inf\], got -1"),
    (lambda: lv.SaliencyMonitor(occlusion_stride=0), ValueError, r"`occlusion_stride`"),
    (lambda: lv.SaliencyMonitor(probes="images"), TypeError, r"`probes` must be a lightning_viz.ProbeSet"),
    (lambda: lv.EmbeddingMonitor(reducer="mds"), ValueError, r"`reducer` must be one of"),
    (lambda: lv.EmbeddingMonitor(subset_size=1), ValueError, r"`subset_size` must be an int >= 2, got 1"),
    (lambda: lv.ExemplarMonitor(top_k=0), ValueError, r"`top_k` must be a positive int"),
    (lambda: lv.ExemplarMonitor(channels=[-1]), ValueError, r"`channels` must be non-empty non-negative"),
    (lambda: lv.FeatureVisMonitor(objective="entropy"), ValueError, r"`objective` must be one of"),
    (lambda: lv.FeatureVisMonitor(image_size=8), ValueError, r"`image_size` must be an int >= "),
    (lambda: lv.FeatureVisMonitor(lr=-0.1), ValueError, r"`lr` must be in \(0.0, inf\], got -0.1"),
    (lambda: lv.DiagnosisMonitor(dead_threshold=2.0), ValueError, r"`dead_threshold` must be in"),
    (lambda: lv.DiagnosisMonitor(overfit_patience=0), ValueError, r"`overfit_patience`"),
    (lambda: lv.ProbeSet(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), ValueError, r"float tensor of shape"),
    (lambda: lv.ProbeSet.auto(0), ValueError, r"`n` must be a positive int"),
    (lambda: lv.default_suite(filter={}), TypeError, r"unknown option\(s\) \['filter'\]"),
]


@pytest.mark.parametrize("make, error, match", CONSTRUCTION)
def test_construction_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


SETUP = [
    (
        lambda: lv.FilterMonitor(layers=["model.conv9"]),
        r"`layers`: the model has no layer named 'model.conv9'. Its "
        r"nn.Conv2d layers are: \['model.conv1', 'model.conv2'\]",
    ),
    (lambda: lv.FilterMonitor(layers=["model.fc"]), r"layer 'model.fc' is a Linear, not a nn.Conv2d"),
    (lambda: lv.ActivationMonitor(layers=["model.conv1"]), r"layer 'model.conv1' is a Conv2d, not a nn.ReLU"),
    (lambda: lv.SaliencyMonitor(gradcam_layer="model.fc"), r"`gradcam_layer`: layer 'model.fc' is a Linear"),
    (
        lambda: lv.SaliencyMonitor(probes=lv.ProbeSet(torch.zeros(2, 1, 16, 16))),
        r"`probes`: the images have 1 "
        r"channels, but the model's first conv layer expects 3",
    ),
    (
        lambda: lv.SaliencyMonitor(probes=lv.ProbeSet(torch.zeros(2, 3, 16, 16)), occlusion_window=20),
        r"`occlusion_window`=20 is larger than the probe images \(16x16\)",
    ),
    (lambda: lv.EmbeddingMonitor(layer="model.nope"), r"`layer`: the model has no layer named 'model.nope'"),
    (lambda: lv.ExemplarMonitor(layers=["model.conv2"], channels=[99]), r"`channels`: index 99 is out of range"),
    (lambda: lv.ExemplarMonitor(layers=["model.fc"]), r"whose output has no 2-D spatial map"),
    (lambda: lv.FeatureVisMonitor(channels=[99]), r"`channels`: index 99 is out of range"),
    (lambda: lv.FilterMonitor(), r"has no logger"),  # logger=False below
]


@pytest.mark.parametrize("make, match", SETUP)
def test_setup_errors_come_before_any_training(tmp_path, pl_ns, make, match):
    train, val = loaders(n=32)
    no_logger = match == r"has no logger"
    trainer = pl_ns.Trainer(
        callbacks=[make()],
        logger=False if no_logger else pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(make_module(pl_ns, TinyCNN()), train, val)
    assert trainer.global_step == 0  # failed fast: no training was lost


def _unlabelled_loader():
    data = torch.randn(16, 3, 16, 16)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    return DataLoader(Images(), batch_size=8)


WARNINGS = [
    (
        "subset larger than the data",
        lambda: lv.EmbeddingMonitor(reducer="pca", subset_size=10_000),
        r"using all of them",
        None,
    ),
    (
        "empty validation loader",
        lambda: lv.ActivationMonitor(),
        r"no validation batch ran",
        DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), batch_size=4),
    ),
    (
        "no ReLU modules for guided backprop",
        lambda: lv.SaliencyMonitor(occlusion_window=4),
        r"no nn.ReLU modules",
        "gelu",
    ),
    (
        "a visualisation failing at run time",
        lambda: lv.FeatureVisMonitor(layers=["model.fc"], steps=1),
        r"switched off",
        None,
    ),
]


@pytest.mark.parametrize("what, make, match, extra", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_runtime_trouble_warns_once_and_training_finishes(tmp_path, pl_ns, what, make, match, extra):
    train, val = loaders(n=32)
    model = TinyCNN()
    if extra == "gelu":
        model.relu1, model.relu2 = nn.GELU(), nn.GELU()
    elif extra is not None:
        val = extra
    trainer = pl_ns.Trainer(
        callbacks=[make()], logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(make_module(pl_ns, model), train, val)
    import re

    assert sum(bool(re.search(match, str(w.message))) for w in record) == 1, [str(w.message) for w in record]
    assert trainer.current_epoch == 2


def test_the_matrix_is_large():
    assert len(CONSTRUCTION) + len(SETUP) + len(WARNINGS) >= 25


# ---- §4 inputs: batches and models users have. None crashes training, changes it, or logs a wrong number. ----
class _TwoInputs(nn.Module):
    """An image and a second input (a per-sample domain id) that shifts the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn, self.domain = TinyCNN(), nn.Embedding(2, 4)

    def forward(self, x, domain):
        return self.cnn(x) + self.domain(domain)


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(-1))


def _second(batch):
    return (batch[0], batch[1]), batch[2]


# case: (sample layout, model, Trainer/suite options); layouts read by `_Samples` and `_InputModule`
INPUT_CASES = {
    "dict image/label": ("dict", TinyCNN, {}),
    "dict pixel_values/labels": ("hf", TinyCNN, {}),
    "(path, image, label)": ("path", TinyCNN, {}),
    "second input, input_fn": ("two", _TwoInputs, {"input_fn": _second}),
    "second input, viz_input method": ("two", _TwoInputs, {"viz_input": True}),
    "second input, not said": ("two", _TwoInputs, {}),
    "bf16-true": ("tuple", TinyCNN, {"precision": "bf16-true"}),
    "16-true": ("tuple", TinyCNN, {"precision": "16-true"}),
    "single logit, float targets": ("binary", lambda: TinyCNN(num_classes=1), {}),
    "no conv: feature vectors": ("flat", _Flat, {}),
    "no conv: Conv1d sequences": ("seq", _Seq, {}),
}


class _Samples(torch.utils.data.Dataset):
    def __init__(self, layout: str, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        shape = {"flat": (12,), "seq": (3, 16)}.get(layout, (3, 16, 16))
        self.layout, self.x = layout, torch.randn(n, *shape, generator=gen)
        self.y = torch.randint(0, 2 if layout == "binary" else 4, (n,), generator=gen)
        self.domain = (torch.arange(n) + 1) % 2  # never equal to the labels: taking it for them would show

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        return {
            "dict": lambda: {"image": x, "label": y, "id": i},
            "hf": lambda: {"pixel_values": x, "labels": y},
            "path": lambda: (f"images/{i:04d}.png", x, y),
            "two": lambda: (x, self.domain[i], y),
            "binary": lambda: (x, y.float()),
        }.get(self.layout, lambda: (x, y))()


def _input_module(pl_ns, layout: str, model: nn.Module, viz_input: bool):
    class InputModule(pl_ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(*inputs)

        def loss(self, batch):
            if layout in ("dict", "hf"):
                x, y = (
                    batch["image" if layout == "dict" else "pixel_values"],
                    batch["label" if layout == "dict" else "labels"],
                )
                return F.cross_entropy(self(x).float(), y)
            if layout == "path":
                return F.cross_entropy(self(batch[1]), batch[2])
            if layout == "two":
                return F.cross_entropy(self(batch[0], batch[1]), batch[2])
            if layout == "binary":
                return F.binary_cross_entropy_with_logits(self(batch[0]).squeeze(1), batch[1])
            return F.cross_entropy(self(batch[0]).float(), batch[1])

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    if viz_input:
        InputModule.viz_input = lambda self, batch: _second(batch)
    return InputModule()


def _fit_inputs(pl_ns, tmp_path, case: str, with_suite: bool):
    layout, build, options = INPUT_CASES[case]
    options = dict(options)
    precision, viz_input = options.pop("precision", "32-true"), options.pop("viz_input", False)
    torch.manual_seed(0)
    module = _input_module(pl_ns, layout, build(), viz_input)
    val_data = _Samples(layout, 16, 1)
    train = DataLoader(_Samples(layout, 16, 0), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    suite = []
    if with_suite:
        cheap = {"featurevis": {"steps": 2, "max_channels": 2}, "exemplars": {"top_k": 2, "max_channels": 2}}
        suite = lv.default_suite(
            budget=None, embedding={"reducer": "pca"}, saliency={"smoothgrad_samples": 2}, **cheap, **options
        )
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0) if with_suite else False
    trainer = pl_ns.Trainer(
        callbacks=suite, logger=logger, **trainer_kwargs(tmp_path, precision=precision, max_epochs=1)
    )
    trainer.fit(module, train, DataLoader(val_data, batch_size=8))
    assert trainer.current_epoch == 1  # training finished
    return module, suite, val_data


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_inputs_users_have_neither_crash_nor_change_training_nor_mislabel(tmp_path, pl_ns, case):
    plain, _, _ = _fit_inputs(pl_ns, tmp_path / "plain", case, with_suite=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, suite, val_data = _fit_inputs(pl_ns, tmp_path, case, with_suite=True)
    said = [str(w.message) for w in record]
    for key, value in plain.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), f"{case}: the suite changed {key}"

    hints = [m for m in said if "cannot call your model with the image alone" in m]
    if case == "second input, not said":  # the cause and the fix, once for all monitors
        assert len(hints) == 1 and "`input_fn=" in hints[0] and "viz_input" in hints[0], said
    else:
        assert not hints and not [m for m in said if "switched off" in m or "do not match" in m], said
    aside = [m for m in said if "not applicable to this run" in m]
    assert len(aside) <= 1, aside
    if case.startswith("no conv"):
        assert "FilterMonitor" in aside[0] and "input_fn" in aside[0]  # why, and what would make them apply

    # the probes' labels are the samples' own: never a second input or an index taken for the label
    saliency = next(m for m in suite if isinstance(m, lv.SaliencyMonitor))
    if saliency.probes.is_resolved:
        images, labels = saliency.probes.images, saliency.probes.labels
        # the Trainer hands bf16/fp16 batches under "bf16-true"/"16-true"
        samples = val_data.x.to(next(module.parameters()).dtype).to(images.dtype)
        rows = [int((samples == image).flatten(1).all(1).nonzero()[0]) for image in images]
        if case == "second input, not said":
            assert labels is None  # (x, domain, y): which one is the label cannot be told
        else:
            assert labels is not None and labels.tolist() == val_data.y[rows].tolist(), case
    events = Events(str(tmp_path / "run"))
    if not case.startswith(("no conv", "second input, not said")):
        for prefix in ("filters/", "saliency/grid", "embedding/", "exemplars/", "featurevis/", "activations/maps/"):
            assert any(t.startswith(prefix) for t in events.tags["images"]), (case, prefix)


def test_the_default_rule_reads_the_batches_users_have_and_names_the_fix_when_it_cannot():
    from lightning_viz._data import read_batch
    from lightning_viz._inputs import default_input_fn

    x, y, m = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 1, 0])
    cases = {
        "tensor": (x, None),
        "(x, y)": ((x, y), y),
        "[x, y]": ([x, y], y),
        "(path, image, label)": ((["a.png"] * 4, x, y), y),
        "(index, image, label)": ((torch.arange(4), x, y), y),  # an index tensor is not the input
        "dict image/label": ({"image": x, "label": y, "id": torch.arange(4)}, y),
        "dict pixel_values/labels": ({"pixel_values": x, "labels": y}, y),
        "(x, second input, y): which is the label?": ((x, m, y), None),
        "binary 0./1. targets": ((x, y.float().clamp(max=1)), y.clamp(max=1)),
        "multi-label rows are no class labels": ((x, torch.ones(4, 3)), None),
    }
    for what, (batch, labels) in cases.items():
        images, got, _, problem = read_batch(batch)
        assert problem is None and torch.equal(images, x), what
        assert (got is None) if labels is None else torch.equal(got, labels), what
    for batch, cause in [
        ({"pixels": x}, r"keys \['pixels'\] has none of the input keys"),
        ((["a.png"] * 4, y), r"has no floating-point tensor"),
        (42, r"neither a tensor, a dict nor a tuple"),
    ]:
        with pytest.raises(TypeError, match=cause):
            default_input_fn(batch)
        assert read_batch(batch)[0] is None
    assert (
        "input_fn" in read_batch((torch.randn(4, 12), y))[3]
        or "not a batch of images" in read_batch((torch.randn(4, 12), y))[3]
    )
    with pytest.raises(TypeError, match=r"`input_fn` must be a callable or None, got str"):
        lv.SaliencyMonitor(input_fn="image")
    with pytest.raises(TypeError, match=r"`input_fn` must be a callable or None"):
        lv.default_suite(input_fn=3)


def test_our_inputs_meet_a_bf16_model_and_the_hooks_go():
    from lightning_viz._inputs import model_inputs

    model = TinyCNN().to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with model_inputs(model):
        out = model(x)
        (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(RuntimeError):
        model(x)  # without us: the dtype mismatch the monitors used to hit
