"""What a new user ran into on setups the other tests don't use (each test failed before its fix)."""

from __future__ import annotations

from conftest import Events, loaders, make_module, trainer_kwargs

import lightning_viz
from lightning_viz import SaliencyMonitor


def test_saliency_declares_its_work_with_the_default_occlusion_stride():
    # occlusion_stride=None (the default: 4, or a ViT's patch) crashed the budget's estimate with a TypeError
    units = SaliencyMonitor()._budget_units()
    assert units is not None and units > 0


def test_default_suite_with_saliency_at_its_defaults_trains_to_the_end(tmp_path, pl_ns):
    suite = lightning_viz.default_suite(featurevis={"steps": 2}, embedding={"reducer": "pca"})
    train, val = loaders()
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(callbacks=suite, logger=logger, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(make_module(pl_ns), train, val)
    assert trainer.current_epoch == 3  # it raised a TypeError at the step-0 views
    assert "filters/model.conv1" in Events(str(tmp_path / "run")).tags["images"]


def test_a_trained_view_written_at_the_last_word_is_not_said_to_be_left_out():
    # a costlier monitor's smallest call that cannot fit anyway must not hold the filters back, and the end-of-fit
    # line names only what was really left out (it once listed the filters' view although that view was written)
    from lightning_viz._budget import Budget

    now = [0.0]
    budget = Budget(0.05, clock=lambda: now[0])
    budget.join("filters", 1, {}, label="filters")
    budget.join("big", 1, {"steps": (64, 8)}, label="big")
    budget.start_fit(2, fresh=True)
    budget.epoch_start(0)
    now[0] += 4.0
    budget.epoch_end(0)
    budget.charge("filters", 0.045, epoch=1)  # 1.1 % of an epoch: not cheap enough to keep its cadence
    budget.charge("big", 0.3, scale=0.0, epoch=1)
    budget.epoch_start(1)
    now[0] += 4.0
    budget.epoch_end(1)
    # 0.4 - 0.345 = 0.055 s left: big's smallest call (0.3 s) cannot fit, so no room is kept for it and the filters run
    assert budget.plan(1) == {"filters": 1.0}
    assert budget.last_word("big", 1) is None
    assert budget.dropped == ["the trained network's big"]


def test_at_the_largest_budget_the_left_out_line_does_not_say_raise_it(caplog):
    # `budget` is at most 1.0: "Raise `budget`" was advice the user could not follow; `budget=None` they can
    import logging
    from types import SimpleNamespace

    from lightning_viz import FilterMonitor
    from lightning_viz._budget import Budget

    lines = {}
    for share in (1.0, 0.05):
        budget = Budget(share)
        budget.drop("the trained network's saliency")
        monitor = FilterMonitor(budget=budget)
        with caplog.at_level(logging.INFO, logger="lightning_viz"):
            caplog.clear()
            monitor.on_fit_end(SimpleNamespace(progress_bar_callback=None, is_global_zero=True), None)
        lines[share] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines[1.0]) == 1 and "Raise `budget`" not in lines[1.0][0] and "`budget=None`" in lines[1.0][0]
    assert len(lines[0.05]) == 1 and "Raise `budget`" in lines[0.05][0] and "`budget=None`" in lines[0.05][0]


def test_a_resumed_fit_between_validations_still_knows_the_validation_loss(tmp_path, pl_ns, recwarn):
    # check_val_every_n_epoch=2, resumed after a validation: the first resumed epoch has none, and the diagnosis
    # said "no validation loss among the logged metrics (looked for `val_loss`, ...)" though `val_loss` was logged
    from lightning_viz import DiagnosisMonitor

    train, val = loaders()
    kwargs = trainer_kwargs(tmp_path, check_val_every_n_epoch=2)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    first = pl_ns.Trainer(callbacks=[DiagnosisMonitor()], logger=logger, **{**kwargs, "max_epochs": 2})
    first.fit(make_module(pl_ns), train, val)
    first.save_checkpoint(str(tmp_path / "last.ckpt"))
    monitor = DiagnosisMonitor()
    second = pl_ns.Trainer(callbacks=[monitor], logger=logger, **{**kwargs, "max_epochs": 3})
    second.fit(make_module(pl_ns), train, val, ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.current_epoch == 3
    said = [str(w.message) for w in recwarn if "no validation loss" in str(w.message)]
    assert not said, said
    panel = Events(str(tmp_path / "run")).text("diagnosis/findings")[-1][1]
    assert "no validation loss" not in panel


def test_the_report_renders_the_findings_tables_as_tables():
    # the dead-filters finding carries a Markdown table; the report showed its rows as raw "| a | b |" paragraphs
    from lightning_viz.report import markdown_to_html

    page = markdown_to_html(
        "Dead filters in 2 layer(s).\n\n- look at: `x`\n\n| site | dead now |\n|---|---:|\n"
        "| `conv1` | 3 of 8 <b> |\n| `conv2` | 1 of 16 |\n\nChecks switched off:"
    )
    assert "|---" not in page and "| site" not in page
    assert "<table>" in page and page.count("<tr>") == 3
    assert "<th>site</th>" in page and "<td><code>conv1</code></td>" in page
    assert "3 of 8 &lt;b&gt;" in page  # escaped, as everything else
    assert page.index("</ul>") < page.index("<table>") < page.index("</table>") < page.index("Checks switched off")
