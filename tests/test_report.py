"""The HTML report as a page to share: headline, section order, charts with axes, escaping, self-contained."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

import pytest
import torch

from lightning_viz import report

FINDINGS = """### Findings after epoch 2 (step 30)

#### CRITICAL: dead filters (since epoch 1)

13 channels of `model.relu3` (20%) never fire on the validation data.

- dead fraction 20.0% at epoch 2
- look at: `activations/dead_fraction/model.relu3`

#### WARNING: overfitting (since epoch 2)

The validation loss rises while the training loss falls.

- gap 0.4
"""


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links.extend(v or "" for k, v in attrs if k in ("src", "href"))

    def handle_data(self, data):
        self.text.append(data)


def _run(run_dir, *, findings=FINDINGS, image_tags=("filters/conv1",), extra_scalars=()):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir))
    for epoch, (tl, vl, va) in enumerate([(2.3, 2.31, 0.11), (1.2, 1.4, 0.5), (0.61, 0.92, 0.75)]):
        step = 10 * (epoch + 1)
        w.add_scalar("train_loss_step", tl + 0.05, step)
        w.add_scalar("train_loss_epoch", tl, step)
        w.add_scalar("val_loss", vl, step)
        w.add_scalar("val/accuracy", va, step)
        w.add_scalar("epoch", epoch, step)
        w.add_scalar("activations/dead_fraction/model.relu3", 0.1 * epoch, step)
        w.add_scalar("lightning_viz/seconds/FilterMonitor", 0.25, step)
        for tag in extra_scalars:
            w.add_scalar(tag, 1.0 + epoch, step)
    for tag in image_tags:
        w.add_image(tag, torch.rand(3, 4, 4), 30)
    if findings is not None:
        w.add_text("diagnosis/findings", findings, 30)
    w.close()


def _page(tmp_path, **kwargs) -> str:
    _run(tmp_path / "logs" / "run", **kwargs)
    (path,) = report.write_reports(str(tmp_path / "logs"), str(tmp_path / "report.html"))
    return open(path, encoding="utf-8").read()


def _headline(page: str) -> str:
    return page[page.index('<section class="headline"') : page.index("</section>")]


def test_find_metric_by_name_patterns():
    tags = ["train_loss_step", "train_loss_epoch", "val_loss", "val/accuracy", "filters/loss/x", "epoch", "lr-SGD"]
    assert report.find_metric(tags, "train", "loss") == "train_loss_epoch"  # per epoch beats per step
    assert report.find_metric(tags, "val", "loss") == "val_loss"
    assert report.find_metric(tags, "val", "acc") == "val/accuracy"
    assert report.find_metric(tags, "train", "acc") is None
    assert report.find_metric(["loss", "validation_acc"], "train", "loss") == "loss"
    assert report.find_metric(["loss/train", "valid_top1"], "val", "acc") == "valid_top1"
    assert report.find_metric(["diagnosis/val_loss"], "val", "loss") is None  # ours, not the user's


def test_headline_says_final_losses_accuracy_epochs_and_verdict(tmp_path):
    head = _headline(_page(tmp_path))
    assert re.search(r"train loss</th><td><strong>0\.61</strong>.*train_loss_epoch at step 30", head)
    assert "validation loss</th><td><strong>0.92</strong>" in head
    assert "validation accuracy</th><td><strong>0.75</strong>" in head and "val/accuracy at step 30" in head
    assert "epochs</th><td><strong>3</strong>" in head
    assert "CRITICAL: dead filters (since epoch 1): 13 channels of <code>model.relu3</code>" in head
    assert "WARNING: overfitting (since epoch 2): The validation loss rises" in head
    assert "dead fraction 20.0%" not in head  # the evidence stays in the findings section


def test_headline_verdict_without_findings(tmp_path):
    head = _headline(_page(tmp_path, findings="**No problems found** after epoch 2 (step 30)."))
    assert "<li>No problems found after epoch 2 (step 30).</li>" in head
    assert report.verdict("") == [] and "no diagnosis in this run" in _headline(_page(tmp_path / "b", findings=None))


def test_sections_in_a_fixed_order_with_filmstrips_first(tmp_path):
    tags = [
        "zoo/thing",
        "featurevis/model.conv3",
        "saliency/grid",
        "exemplars/model.conv3",
        "filters/model.conv1",
        "filters/filmstrip/model.conv1",
        "embedding/map",
        "activations/maps/model.relu1",
        "custom",
    ]
    page = _page(tmp_path, image_tags=tags)
    headings = re.findall(r'<section class="images" id="images-([^"]+)">', page)
    assert headings == ["filters", "activations", "saliency", "embedding", "exemplars", "featurevis", "other", "zoo"]
    assert page.index("<h2>Feature visualisation</h2>") > page.index("<h2>Exemplars</h2>")
    assert page.index("filters/filmstrip/model.conv1 (step 30)") < page.index("filters/model.conv1 (step 30)")
    order = [page.index(x) for x in ('id="headline"', 'id="findings"', 'id="images-filters"', 'id="scalars"')]
    assert order == sorted(order)


def test_charts_have_axes_units_and_users_metrics_first(tmp_path):
    page = _page(tmp_path, extra_scalars=["filters/noise_score/model.conv1", "filters/noise_score/model.conv2"])
    svg = report.chart([(0, 2.3056), (5, 2.31), (12, 2.3194)])
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)
    assert ticks == ["2.306", "2.312", "2.319", "0", "12"]  # value range and step range, told apart
    assert '<line class="axis"' in svg
    mine, ours = page.index('id="scalars"'), page.index('id="monitor-scalars"')
    assert mine < page.index("val/accuracy:") < ours < page.index('title="activations/dead_fraction/model.relu3"')
    # ours: collapsed, one block per area, small multiples per group
    block = r'<details class="area"><summary>filters \(2 charts\)</summary>\s*<h3>filters/noise_score</h3>'
    assert re.search(block, page)
    assert "step · seconds" in page and "step · share" in page  # units where the name tells them


def test_report_escapes_hostile_names_and_stays_self_contained(tmp_path):
    hostile = "<script>alert(1)</script>"
    _run(tmp_path / "logs" / "<b>run</b>", image_tags=[f"filters/{hostile}"], extra_scalars=[hostile])
    (path,) = report.write_reports(str(tmp_path / "logs"), str(tmp_path / "report.html"))
    page = open(path, encoding="utf-8").read()
    parser = _Page()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;run&lt;/b&gt;" in page
    assert parser.links and all(link.startswith("data:image/png;base64,") for link in parser.links)
    assert "http" not in page and "//" not in page.replace("</", "")


def test_folder_run_gets_the_same_headline(tmp_path):
    run = tmp_path / "logs" / "exp"
    os.makedirs(run / "text")
    (run / "text" / "findings.md").write_text(FINDINGS)
    (run / "index.jsonl").write_text(
        json.dumps({"kind": "text", "tag": "diagnosis/findings", "step": 30, "file": "text/findings.md"}) + "\n"
    )
    rows = [
        {"step": 10 * (e + 1), "metrics": {"train_loss": 1.0 / (e + 1), "val_acc": 0.3 * e, "epoch": e}}
        for e in range(3)
    ]
    (run / "scalars.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (path,) = report.write_reports(str(tmp_path / "logs"), str(tmp_path / "report.html"))
    head = _headline(open(path, encoding="utf-8").read())
    assert (
        "train loss</th><td><strong>0.3333</strong>" in head
        and "validation accuracy</th><td><strong>0.6</strong>" in head
    )
    assert "epochs</th><td><strong>3</strong>" in head and "CRITICAL: dead filters" in head


@pytest.mark.parametrize(
    "epoch_points, findings, expected",
    [
        ([(10, 0.0), (71, 5.0)], "**No problems found** at the end of fit, epoch 6 (step 84).", 7),
        ([(10, 0.0), (71, 5.0)], "**No problems found** after epoch 5 (step 72).", 6),  # mid-run: the scalar decides
        ([], "### Findings at the end of fit, epoch 2 (step 30)", 3),
        ([(4, 0.0), (8, 1.0)], None, 2),
        ([], None, None),
    ],
)
def test_headline_epochs_count_the_last_epochs_that_logged_no_metric(epoch_points, findings, expected):
    from lightning_viz.report import epochs_run

    assert epochs_run(epoch_points, findings) == expected
