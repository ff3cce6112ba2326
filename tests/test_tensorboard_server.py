"""End to end: a real TensorBoard server on loopback serves our tags from the demo's log directory."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from lightning_viz.cli import board_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **params) -> object:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


@pytest.fixture(scope="module")
def server(demo_logs):
    logdir, _ = demo_logs
    port = _free_port()
    # our own `board` command line; --load_fast=false keeps the server in-process Python (no Rust data server),
    # --reload_interval=0 loads everything once
    cmd = board_command(str(logdir), port=port, extra=["--load_fast=false", "--reload_interval=0"])
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                runs = _get(base, "/data/runs")
                tags = _get(base, "/data/plugin/scalars/tags")
                if runs and any("filters/noise_score/model.conv1" in t for t in tags.get(runs[0], {})):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TensorBoard did not come up: {process.stderr.read()[-2000:]!r}")
            time.sleep(0.5)
        yield base, runs[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_scalars(server):
    base, run = server
    tags = _get(base, "/data/plugin/scalars/tags")[run]
    for tag in (
        "filters/noise_score/model.conv1",
        "activations/dead_fraction/model.relu1",
        "embedding/knn_accuracy",
        "diagnosis/findings",
        "lightning_viz/seconds/saliency",
    ):
        assert tag in tags
    points = _get(base, "/data/plugin/scalars/scalars", run=run, tag="filters/noise_score/model.conv1")
    assert [p[1] for p in points] == [0, 4, 8, 12]


def test_images_every_logged_epoch(server):
    base, run = server
    tags = _get(base, "/data/plugin/images/tags")[run]
    for tag in (
        "filters/model.conv1",
        "activations/maps/model.relu1",
        "saliency/grid",
        "embedding/map",
        "exemplars/model.conv3",
        "featurevis/model.conv3",
    ):
        assert tag in tags, tag
    images = _get(base, "/data/plugin/images/images", run=run, tag="filters/model.conv1", sample=0)
    assert [i["step"] for i in images] == [0, 4, 8, 12]
    png = _get(base, "/data/plugin/images/individualImage?" + images[-1]["query"].split("?")[-1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_and_histograms(server):
    base, run = server
    text_tags = _get(base, "/data/plugin/text/tags")[run]
    assert any(t.startswith("diagnosis/findings") for t in text_tags)
    histogram_tags = _get(base, "/data/plugin/histograms/tags")[run]
    assert "activations/firing_rate/model.relu1" in histogram_tags
    assert "filters/per_filter/noise_score/model.conv1" in histogram_tags


def test_projector(server):
    base, run = server
    runs = _get(base, "/data/plugin/projector/runs")
    assert run in runs
    info = _get(base, "/data/plugin/projector/info", run=run)
    names = [e["tensorName"] for e in info["embeddings"]]
    assert names == ["embedding: step 00000000", "embedding: latest (step 12)"]
    tensor = _get(base, "/data/plugin/projector/tensor", run=run, name=names[-1], num_rows=5)
    assert isinstance(tensor, bytes) and len(tensor) == 5 * 64 * 4  # float32 rows of the 64-d code
    metadata = _get(base, "/data/plugin/projector/metadata", run=run, name=names[-1], num_rows=3)
    assert metadata.decode().splitlines()[0] == "label\tpredicted"
