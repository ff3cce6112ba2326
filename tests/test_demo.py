"""The demo, shortened: its event files hold the filter images at step 0 and at every logged epoch."""

from __future__ import annotations

import os

from conftest import Events


def test_demo_writes_filter_images_and_scalars(demo_logs):
    tmp_path, stdout = demo_logs
    assert f"lightning-viz board {tmp_path}/" in stdout
    events = Events(str(tmp_path / "photos"))
    assert events.image_steps("filters/model.conv1") == [0, 4, 8, 12]
    assert events.image_steps("filters/filmstrip/model.conv1") == [0, 4, 8, 12]
    for stat in ("weight_norm", "noise_score", "distance_from_init"):
        assert [s for s, _ in events.scalars(f"filters/{stat}/model.conv1")] == [0, 4, 8, 12]
    for site in ("model.relu1", "model.relu2", "model.relu3"):
        assert [s for s, _ in events.scalars(f"activations/dead_fraction/{site}")] == [4, 8, 12]
    assert events.image_steps("activations/maps/model.relu1") == [4, 8, 12]
    assert "| `model.relu3` |" in events.text("activations/dead_channels")[-1][1]
    assert events.image_steps("saliency/grid") == [0, 8]  # every 2 epochs by default
    assert events.image_steps("saliency/filmstrip/probe_00") == [0, 8]
    assert events.image_steps("embedding/map") == [0, 12]  # every 3 epochs by default
    assert [s for s, _ in events.scalars("embedding/knn_accuracy")] == [0, 12]
    # the demo asks for exemplars and feature visualisation every 4 epochs: the baseline only, in 3 epochs
    assert events.image_steps("exemplars/model.conv3") == [0]
    assert events.image_steps("featurevis/model.conv3") == [0]
    assert os.path.exists(tmp_path / "photos" / "version_0" / "projector_config.pbtxt")
    assert [s for s, _ in events.text("diagnosis/findings")] == [4, 8, 12]
