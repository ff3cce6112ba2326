"""Sink.projector: TensorBoard projector files, and a config that lists every step across writers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from lightning_viz import render
from lightning_viz._projection_worker import write_tensor_tsv
from lightning_viz.sinks import Sink


def _config(log_dir: str):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as f:
        text_format.Merge(f.read(), config)
    return config


def _write(log_dir: str, step: int, n: int = 10, thumbs: bool = True) -> str | None:
    writer = SummaryWriter(log_dir)
    try:
        sink = Sink(writer, [], is_global_zero=True)
        features = torch.randn(n, 4, generator=torch.Generator().manual_seed(step))
        labels = [f"c{i % 3}" for i in range(n)]
        thumbnails = torch.rand(n, 3, 6, 6) if thumbs else None
        tsv = sink.projector(features, labels, None, thumbnails, step, "embedding")
        if tsv is not None:
            write_tensor_tsv(tsv, features.numpy())
        return tsv
    finally:
        writer.close()


def test_metadata_sprite_and_tensor_path_of_one_step(tmp_path):
    tsv = _write(str(tmp_path), 3)
    assert tsv == os.path.join(str(tmp_path), "embedding", "00000003", "tensors.tsv")
    config = _config(str(tmp_path))
    (info,) = config.embeddings
    assert info.tensor_name == "embedding: latest (step 3)" and info.tensor_path == "embedding/00000003/tensors.tsv"
    with open(tmp_path / info.metadata_path) as f:
        rows = f.read().splitlines()
    assert rows[0] == "label\tpredicted" and rows[1:4] == ["c0\t?", "c1\t?", "c2\t?"] and len(rows) == 11
    sprite = Image.open(tmp_path / info.sprite.image_path)
    assert sprite.size == (4 * 6, 4 * 6) and list(info.sprite.single_image_dim) == [6, 6]
    assert np.loadtxt(tsv, delimiter="\t").shape == (10, 4)


def test_config_lists_every_step_also_after_a_second_writer_process(tmp_path):
    log_dir = str(tmp_path)
    _write(log_dir, 0)
    _write(log_dir, 1)
    _write(log_dir, 1)  # a step written again replaces its entry instead of repeating it
    code = "import sys; from test_sinks_projector import _write; _write(sys.argv[1], 2)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    subprocess.run([sys.executable, "-c", code, log_dir], check=True, env=env)
    _write(log_dir, 3, thumbs=False)
    config = _config(log_dir)
    names = [e.tensor_name for e in config.embeddings]
    assert names == [*(f"embedding: step {s:08d}" for s in range(3)), "embedding: latest (step 3)"]
    assert sorted(names)[0] == "embedding: latest (step 3)"  # the projector sorts by name and opens the first
    assert config.embeddings[3].sprite.image_path == ""  # no thumbnails, no sprite
    assert not os.path.exists(os.path.join(log_dir, "projector_config.pbtxt.tmp"))


def test_sprite_of_many_samples_stays_within_the_projector_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "SPRITE_LIMIT", 64)  # TensorBoard's 8192, scaled down to keep the test fast
    n = 50
    side = render.sprite_tile_side(n, 32)
    writer = SummaryWriter(str(tmp_path))
    try:
        Sink(writer, [], is_global_zero=True).projector(torch.zeros(n, 2), None, None, torch.rand(n, 3, side, side), 0)
    finally:
        writer.close()
    (info,) = _config(str(tmp_path)).embeddings
    width, height = Image.open(tmp_path / info.sprite.image_path).size
    assert side == 8 and width == height == 8 * side <= 64


def test_no_tensorboard_no_files(tmp_path):
    sink = Sink(None, [], is_global_zero=True)
    assert sink.projector(torch.zeros(3, 2), None, None, None, 0) is None
    assert os.listdir(tmp_path) == []
