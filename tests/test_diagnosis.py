"""DiagnosisMonitor, its rules, the planted-fault scenarios, and the HTML report."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs

from lightning_viz import ActivationMonitor, DiagnosisMonitor, FilterMonitor
from lightning_viz import diagnosis as D
from lightning_viz.report import markdown_to_html, write_reports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import scenarios  # noqa: E402


# --------------------------------------------------------------------------------------------------- rules
def test_dead_filter_rule_since_and_severity():
    history = [(1, 0.05), (2, 0.25), (3, 0.3), (4, 0.6)]
    finding = D.dead_filters("relu", history, {4: 12}, threshold=0.2, critical=0.5)
    assert finding.since_epoch == 2 and finding.severity == "critical" and "12 channels" in finding.summary
    assert "activations/dead_fraction/relu" in finding.tags
    assert D.dead_filters("relu", [(1, 0.1)], {1: 1}, threshold=0.2, critical=0.5) is None
    assert D.dead_filters("relu", history[:3], {3: 5}, threshold=0.2, critical=0.5).severity == "warning"


def test_overfitting_rule():
    train = [(e, 1.0 / e) for e in range(1, 8)]
    val = [(1, 1.0), (2, 0.8), (3, 0.7), (4, 0.75), (5, 0.8), (6, 0.9), (7, 1.0)]
    finding = D.overfitting(train, val, patience=2, tolerance=0.02)
    assert finding.since_epoch == 4 and "risen for 4 epoch(s)" in finding.summary
    # a validation loss that still improves, or a plateau within tolerance, is not over-fitting
    assert D.overfitting(train, [(e, 1.0 / e) for e in range(1, 8)], patience=2, tolerance=0.02) is None
    assert D.overfitting(train, val[:3] + [(4, 0.705), (5, 0.71)], patience=2, tolerance=0.02) is None
    # training loss rising too: that is not over-fitting
    assert D.overfitting([(e, float(e)) for e in range(1, 8)], val, patience=2, tolerance=0.02) is None


def test_undertraining_and_divergence_rules():
    falling = [(1, 2.0), (2, 1.5), (3, 1.0)]
    level = [(1, 2.0), (2, 0.5), (3, 0.12), (4, 0.11), (5, 0.1)]
    kw = dict(slope=0.05, noise_threshold=0.8, distance_threshold=0.1)
    assert D.undertraining(falling, noise_score=0.3, distance=1.0, final=True, **kw).severity == "warning"
    assert D.undertraining(level, noise_score=0.3, distance=1.0, final=True, **kw) is None
    noisy = D.undertraining(level, noise_score=0.95, distance=0.02, final=False, **kw)
    assert noisy.severity == "info" and "filters are still noisy" in noisy.summary
    assert D.divergence(3, loss_finite=False, weights_finite=True, weight_norm=1, initial_norm=1, factor=10)
    assert D.divergence(3, loss_finite=True, weights_finite=True, weight_norm=50, initial_norm=1, factor=10)
    assert D.divergence(3, loss_finite=True, weights_finite=True, weight_norm=5, initial_norm=1, factor=10) is None


def test_markdown_panel_and_html_escape():
    finding = D.dead_filters("<script>alert(1)</script>", [(1, 0.9)], {1: 9}, threshold=0.2, critical=0.5)
    text = D.to_markdown([finding], epoch=1, step=10)
    assert "CRITICAL: dead filters (since epoch 1)" in text
    page = markdown_to_html(text)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert D.to_markdown([], 2, 20).startswith("**No problems found**")


# ---------------------------------------------------------------------------------------------- scenarios
@pytest.fixture(scope="module")
def scenario_runs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("scenarios")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        findings = {name: scenarios.run(name, str(logdir)) for name in scenarios.SCENARIOS}
    return logdir, findings


@pytest.mark.parametrize(
    "name, expected",
    [
        ("healthy", set()),
        ("high-lr", {"dead_filters"}),
        ("overfit", {"overfitting"}),
        ("undertrained", {"undertraining"}),
    ],
)
def test_each_scenario_produces_its_finding(scenario_runs, name, expected):
    _, findings = scenario_runs
    assert {f.kind for f in findings[name]} == expected


def test_findings_are_written_as_text_and_scalars(scenario_runs):
    logdir, _ = scenario_runs
    events = Events(str(logdir / "overfit"))
    text = events.text("diagnosis/findings")
    assert "over-fitting" in text[-1][1] and "`val_loss`" in text[-1][1]
    flags = events.scalars("diagnosis/overfitting")
    assert flags[0][1] == 0.0 and flags[-1][1] == 1.0
    healthy = Events(str(logdir / "healthy"))
    assert all(v == 0 for _, v in healthy.scalars("diagnosis/findings"))


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.text = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_one_self_contained_page_per_run(scenario_runs, tmp_path):
    logdir, _ = scenario_runs
    paths = write_reports(str(logdir), str(tmp_path / "report.html"))
    assert len(paths) == 4
    page = _Page()
    page.feed(open(next(p for p in paths if "high-lr" in p), encoding="utf-8").read())
    text = " ".join(page.text)
    assert "CRITICAL: dead filters" in text and "never fire on the validation data" in text
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(link.startswith("data:") for link in page.links) and page.scripts == 0
    assert "activations/dead_history/model.4" in text


def test_report_escapes_what_it_reads(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "<b>run</b>"))
    writer.add_scalar("<script>alert(1)</script>", 1.0, 0)
    writer.add_text("diagnosis/findings", "**No problems found** <img src=x onerror=alert(1)>", 0)
    writer.close()
    (path,) = write_reports(str(tmp_path), str(tmp_path / "out.html"))
    content = open(path, encoding="utf-8").read()
    assert "<script>" not in content and "&lt;script&gt;alert(1)&lt;/script&gt;" in content
    assert "<img src=x" not in content and "&lt;b&gt;run&lt;/b&gt;" in content


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_opens_in_a_real_browser(scenario_runs, tmp_path):
    logdir, _ = scenario_runs
    (path,) = write_reports(str(logdir / "overfit"), str(tmp_path / "overfit.html"))
    out = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            f"file://{path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "WARNING: overfitting" in out.stdout and "data:image/png;base64," in out.stdout


def test_cli_report(scenario_runs, tmp_path):
    logdir, _ = scenario_runs
    out = subprocess.run(
        [sys.executable, "-m", "lightning_viz.cli", "report", str(logdir / "healthy"), "-o", str(tmp_path / "h.html")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "No problems found" in open(tmp_path / "h.html", encoding="utf-8").read()
    missing = subprocess.run(
        [sys.executable, "-m", "lightning_viz.cli", "report", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no TensorBoard event files" in missing.stderr


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dead_threshold": 0}, ValueError, r"`dead_threshold` must be in \(0.0, 1.0\], got 0"),
        ({"dead_threshold": 1.5}, ValueError, r"`dead_threshold`"),
        ({"dead_threshold": 0.6, "dead_critical": 0.5}, ValueError, r"`dead_critical` \(0.5\) must be at least"),
        ({"overfit_patience": 0}, ValueError, r"`overfit_patience`"),
        ({"explode_factor": 1}, ValueError, r"`explode_factor` must be in \(1.0, inf\]"),
        ({"val_loss": ""}, ValueError, r"`val_loss` must be a non-empty metric name"),
        ({"val_loss": 3}, TypeError, r"`val_loss` must be the name of a logged metric"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiagnosisMonitor(**kwargs)


def test_no_validation_loop_disables_overfitting_once(tmp_path, pl_ns):
    module = make_module(pl_ns, TinyCNN())
    type(module).validation_step = pl_ns.LightningModule.validation_step
    train, _ = loaders()
    diagnosis = DiagnosisMonitor()
    trainer = pl_ns.Trainer(
        callbacks=[diagnosis, FilterMonitor(), ActivationMonitor()],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)),
        **trainer_kwargs(tmp_path, max_epochs=3),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train)
    assert sum("over-fitting is not diagnosed" in str(w.message) for w in record) == 1
    # placed before the monitors it reads, it still diagnosed every epoch, at that epoch's step
    assert diagnosis._defer and [e for e, _ in diagnosis._history["train_loss"]] == [1, 2, 3]
    events = Events(str(tmp_path / "lightning_logs" / "version_0"))
    assert [s for s, _ in events.scalars("diagnosis/findings")] == [4, 8, 12]


def test_metric_names_are_arguments(tmp_path, pl_ns):
    module = make_module(pl_ns, TinyCNN())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("valid/xent", torch.nn.functional.cross_entropy(self(x), y), on_epoch=True)

    type(module).validation_step = validation_step
    train, val = loaders()
    diagnosis = DiagnosisMonitor(val_loss="valid/xent")
    trainer = pl_ns.Trainer(
        callbacks=[diagnosis], logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert not any("over-fitting is not diagnosed" in str(w.message) for w in record)
    assert [e for e, _ in diagnosis._history["val_loss"]] == [1, 2]
    assert any("no ActivationMonitor" in str(w.message) for w in record)
