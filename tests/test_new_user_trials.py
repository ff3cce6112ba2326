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
