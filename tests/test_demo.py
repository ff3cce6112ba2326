"""The demo, shortened: its event files hold the filter images at step 0 and at every logged epoch."""

from __future__ import annotations

import os
import shlex

from conftest import Events


def test_demo_prints_a_board_command_that_works_in_a_fresh_shell(demo_logs):
    tmp_path, stdout = demo_logs
    lines = stdout.splitlines()
    opened = lines.index(f"TensorBoard logs written to {tmp_path / 'photos' / 'version_0'}. Open them with:")
    command = shlex.split(lines[opened + 2])
    # an absolute path to the script (a fresh shell has no venv on its PATH) and to the log dir
    assert os.path.isabs(command[0]) and os.access(command[0], os.X_OK), command
    assert command[-2:] == ["board", str(tmp_path)]


def test_demo_logs_the_graph_and_the_custom_scalars_layout(demo_logs):
    tmp_path, _ = demo_logs
    events = Events(str(tmp_path / "photos"))
    assert events.tags["graph"]  # TensorBoardLogger(log_graph=True) with the module's example_input_array
    assert "custom_scalars__config__" in events.tags["tensors"]


def test_demo_writes_filter_images_and_scalars(demo_logs):
    tmp_path, stdout = demo_logs
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


def test_demo_prints_no_warning_of_ours_and_says_what_the_baseline_does(demo_logs):
    ours = [line for line in demo_logs.stderr.splitlines() if "lightning_viz" in line and "Warning" in line]
    assert ours == [], ours  # a warning is said only when the user can act on it: the demo gives none
    told = demo_logs[1] + demo_logs.stderr
    assert "lightning_viz: drawing the untrained network's views" in told  # the step-0 work is not silent
