"""EmbeddingMonitor and its functional core."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import Events, make_module, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz import EmbeddingMonitor
from lightning_viz.functional import embedding as E


def _clusters(n_per: int = 40, classes: int = 4, dim: int = 16, spread: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(classes * n_per, dim, generator=gen)
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_knn_accuracy_and_silhouette_separated_vs_random_labels():
    x, y = _clusters()
    assert E.knn_accuracy(x, y) == 1.0
    assert E.silhouette(x, y) > 0.8
    random_labels = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert abs(E.knn_accuracy(x, random_labels) - 0.25) < 0.15
    assert abs(E.silhouette(x, random_labels)) < 0.15


def test_silhouette_matches_scikit_learn():
    from sklearn.metrics import silhouette_score

    x, y = _clusters(spread=1.0)
    assert E.silhouette(x, y) == pytest.approx(silhouette_score(x.numpy(), y.numpy(), metric="cosine"), abs=1e-4)


def test_nearest_neighbours_skip_the_query_itself():
    x, _ = _clusters(n_per=5, classes=2)
    idx, dist = E.nearest_neighbours(x[:1], x, k=3)
    assert 0 not in idx[0].tolist() and set(idx[0].tolist()) <= set(range(1, 5))
    assert (dist[0][1:] >= dist[0][:-1]).all()


def test_procrustes_undoes_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 2)).astype(np.float32)
    angle = 1.1
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (ref @ rot * 3.0 + 5.0) @ np.diag([1, -1])  # with a reflection
    assert np.allclose(E.procrustes_align(moved, ref), ref, atol=1e-4)


def test_subset_indices_fixed_and_seeded():
    assert E.subset_indices(100, 10, 0) == E.subset_indices(100, 10, 0)
    assert E.subset_indices(100, 10, 0) != E.subset_indices(100, 10, 1)
    assert E.subset_indices(5, 10, 0) == [0, 1, 2, 3, 4]


class Coder(nn.Module):
    """A fixed random projection of the mean colour: codes separate classes iff the classes differ in colour."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _planted(n: int = 120, random_labels: bool = False):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(n // 4)
    colours = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [-2.0, -2.0, 2.0]])
    x = colours[y].view(-1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 8, 8, generator=gen)
    if random_labels:
        y = y[torch.randperm(n, generator=gen)]
    return TensorDataset(x, y)


def _fit(pl_ns, tmp_path, monitor, data, model=None, **kw):
    loader = DataLoader(data, batch_size=32)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    kw = {**dict(max_epochs=2, limit_train_batches=1), **kw}
    trainer = pl_ns.Trainer(callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, **kw))
    module = make_module(pl_ns, model if model is not None else Coder(), lr=0.0)
    trainer.fit(module, loader, loader)
    return trainer, Events(str(tmp_path / "run"))


@pytest.mark.parametrize("random_labels, expected", [(False, 1.0), (True, 0.25)])
def test_planted_classes_knn_and_map(tmp_path, pl_ns, random_labels, expected):
    monitor = EmbeddingMonitor(reducer="pca", every_n_epochs=1, on_error="raise")
    _, events = _fit(pl_ns, tmp_path, monitor, _planted(random_labels=random_labels))
    knn = [v for _, v in events.scalars("embedding/knn_accuracy")]
    assert [s for s, _ in events.scalars("embedding/knn_accuracy")] == [0, 1, 2]
    assert all(abs(v - expected) < (0.02 if expected == 1.0 else 0.15) for v in knn)
    assert events.image_steps("embedding/map") == [0, 1, 2]
    assert events.image_steps("embedding/neighbours") == [0, 1, 2]
    labels = torch.tensor([int(d[1]) for d in _planted(random_labels=random_labels)])
    coords = torch.from_numpy(monitor._reference)
    if not random_labels:  # the 2-D map separates the classes too
        assert E.knn_accuracy(torch.cat([coords, torch.ones(len(coords), 1)], 1), labels) > 0.95


def test_umap_off_the_training_path_with_dataloader_workers(tmp_path, pl_ns):
    data = _planted()
    loader = DataLoader(data, batch_size=32, num_workers=2)
    monitor = EmbeddingMonitor(every_n_epochs=1, on_error="raise", subset_size=100)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl_ns.Trainer(
        callbacks=[monitor], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=2)
    )
    trainer.fit(make_module(pl_ns, Coder(), lr=0.0), loader, DataLoader(data, batch_size=32))
    assert trainer.current_epoch == 2  # workers started in every epoch, also after projections ran
    events = Events(str(tmp_path / "run"))
    assert events.image_steps("embedding/map") == [0, 2, 4]
    assert events.image_steps("embedding/map_filmstrip") == [0, 2, 4]
    blocked = [v for _, v in events.scalars("lightning_viz/seconds/embedding")]
    projection = [v for _, v in events.scalars("embedding/projection_seconds")]
    assert len(projection) == 3 and sum(blocked) < sum(projection)
    projections = monitor._projections
    assert not projections.pending and projections.workdir is None and not projections.running


def _read_projector(logdir):
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_plugin
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    with open(os.path.join(logdir, "projector_config.pbtxt")) as f:
        text_format.Merge(f.read(), config)
    out = []
    for e in config.embeddings:
        tensor = projector_plugin._read_tensor_tsv_file(os.path.join(logdir, e.tensor_path))
        with open(os.path.join(logdir, e.metadata_path)) as f:
            metadata = f.read().splitlines()
        from PIL import Image

        sprite = Image.open(os.path.join(logdir, e.sprite.image_path))
        out.append((e.tensor_name, tensor.shape, metadata, sprite.size, list(e.sprite.single_image_dim)))
    return out


def test_projector_files_for_every_step_also_after_resume(tmp_path, pl_ns):
    data = _planted()
    ckpt_dir = tmp_path / "ckpt"
    kw = dict(enable_checkpointing=True, limit_train_batches=1)
    mk = lambda: EmbeddingMonitor(reducer="pca", every_n_epochs=1, on_error="raise", subset_size=50)  # noqa: E731
    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)
    first = mk()
    trainer = pl_ns.Trainer(
        callbacks=[first, ckpt],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path, max_epochs=2, **kw),
    )
    trainer.fit(make_module(pl_ns, Coder(), lr=0.0), DataLoader(data, batch_size=32), DataLoader(data, batch_size=32))
    second = mk()
    trainer = pl_ns.Trainer(
        callbacks=[second, pl_ns.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir))],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path, max_epochs=4, **kw),
    )
    trainer.fit(
        make_module(pl_ns, Coder(), lr=0.0),
        DataLoader(data, batch_size=32),
        DataLoader(data, batch_size=32),
        ckpt_path=str(ckpt_dir / "last.ckpt"),
    )
    assert second._indices == first._indices and len(first._indices) == 50  # the same subset after resuming
    embeddings = _read_projector(str(tmp_path / "run" / "version_0"))
    names = [name for name, *_ in embeddings]
    assert names == [*(f"embedding: step {s:08d}" for s in (0, 1, 2, 3)), "embedding: latest (step 4)"]
    for _, shape, metadata, sprite_size, single in embeddings:
        assert shape == (50, 8)
        assert metadata[0] == "label\tpredicted" and len(metadata) == 51
        assert single == [8, 8] and sprite_size[0] == sprite_size[1] <= 8192 and sprite_size[0] >= 8 * 8


def test_sprite_respects_the_projector_limit():
    monitor = EmbeddingMonitor(sprite_size=64)
    side = monitor._thumb_size(20000)
    assert side * int(np.ceil(np.sqrt(20000))) <= 8192 and side >= 1


def test_no_labels_uncoloured_map_and_no_knn(tmp_path, pl_ns):
    data = _planted()

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i][0]

    module = make_module(pl_ns, Coder(), lr=0.0)
    type(module).validation_step = lambda self, batch, batch_idx: self(batch)  # images only
    monitor = EmbeddingMonitor(reducer="pca", every_n_epochs=1, on_error="raise")
    trainer = pl_ns.Trainer(
        callbacks=[monitor],
        logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=1),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(data, batch_size=32), DataLoader(Unlabelled(), batch_size=32))
    assert sum("the data has no labels" in str(w.message) for w in record) == 1
    events = Events(str(tmp_path / "run"))
    assert "embedding/knn_accuracy" not in events.tags["scalars"]
    assert events.image_steps("embedding/map") == [0, 1, 2]
    image = events.image("embedding/map")
    colourful = (np.abs(image[..., 0].astype(int) - image[..., 2].astype(int)) > 60).sum()
    assert colourful == 0  # grey points, no legend


def test_subset_larger_than_data_uses_all_and_warns(tmp_path, pl_ns):
    monitor = EmbeddingMonitor(reducer="pca", every_n_epochs=1, subset_size=5000, on_error="raise")
    with pytest.warns(UserWarning, match=r"`subset_size`=5000 but the data has 120 samples; using all of them"):
        _fit(pl_ns, tmp_path, monitor, _planted(), max_epochs=1)
    assert len(monitor._indices) == 120


def test_bad_layer_fails_at_setup(tmp_path, pl_ns):
    with pytest.raises(ValueError, match=r"`layer`: the model has no layer named 'model.nope'"):
        _fit(pl_ns, tmp_path, EmbeddingMonitor(layer="model.nope"), _planted())


def test_feature_layer_output_not_a_tensor(tmp_path, pl_ns):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Model(Coder):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            x, _ = self.pair(x)
            return super().forward(x)

    with pytest.raises(TypeError, match="the feature layer.s output must be a tensor; it returned none"):
        _fit(pl_ns, tmp_path, EmbeddingMonitor(layer="model.pair", on_error="raise"), _planted(), model=Model())
    with pytest.warns(UserWarning, match="switched off.*output must be a tensor"):
        trainer, _ = _fit(pl_ns, tmp_path / "warn", EmbeddingMonitor(layer="model.pair"), _planted(), model=Model())
    assert trainer.current_epoch == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"reducer": "mds"}, ValueError, r"`reducer` must be one of \['umap', 'tsne', 'pca'\], got 'mds'"),
        ({"subset_size": 1}, ValueError, r"`subset_size` must be an int >= 2"),
        ({"num_neighbours": 0}, ValueError, r"`num_neighbours`"),
        ({"layer": 3}, TypeError, r"`layer` must be a layer name"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbeddingMonitor(**kwargs)


def test_codes_are_captured_from_the_trainers_validation_pass(tmp_path, pl_ns):
    """With an unshuffled validation loader, logged epochs add no forward pass: the codes come from validation."""
    data = _planted()
    monitor = EmbeddingMonitor(reducer="pca", every_n_epochs=1, on_error="raise", subset_size=50)
    passes = []
    original = monitor._features

    def counting(pl_module, images):
        passes.append(len(images))
        return original(pl_module, images)

    monitor._features = counting
    _, events = _fit(pl_ns, tmp_path, monitor, data, max_epochs=2)
    probes = len(monitor.probes)
    # the subset is taken during the first validation pass: the step-0 view (initial weights) and that epoch's view
    # compute the 50 codes of the kept images; after that only the probes of the neighbour strips
    assert sum(n for n in passes if n != probes) == 100
    assert [s for s, _ in events.scalars("embedding/knn_accuracy")] == [0, 1, 2]
    assert all(v == 1.0 for _, v in events.scalars("embedding/knn_accuracy"))  # same codes, same quality (lr=0)
    assert not monitor._capture.attached
    # a shuffled validation loader: no running index, so the monitor reads the subset itself
    shuffled = EmbeddingMonitor(reducer="pca", every_n_epochs=1, on_error="raise", subset_size=50)
    logger = pl_ns.loggers.TensorBoardLogger(str(tmp_path / "s"), name="run", version=0)
    trainer = pl_ns.Trainer(
        callbacks=[shuffled], logger=logger, **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1)
    )
    trainer.fit(
        make_module(pl_ns, Coder(), lr=0.0),
        DataLoader(data, batch_size=32),
        DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
    )
    assert shuffled._capture.epoch is None


def test_projection_client_polls_without_blocking_waits_at_the_end_and_leaves_nothing():
    from lightning_viz._projection_worker import ProjectionClient

    client = ProjectionClient("pca", seed=0)
    assert list(client.finished()) == [] and not client.running  # nothing started before the first job
    x, _ = _clusters(n_per=10, classes=2)
    for step in (0, 1):
        client.submit(x.numpy(), context=step)
    workdir = client.workdir
    assert client.running and os.path.isdir(workdir)
    done = list(client.finished(wait=True))
    assert [p.context for p in done] == [0, 1] and all(p.error is None and p.coords.shape == (20, 2) for p in done)
    child = client._child
    client.close()
    assert child.returncode is not None  # reaped: no zombie
    assert not client.running and client.pending == 0 and client.workdir is None and not os.path.exists(workdir)


def test_projection_client_kill_and_a_dead_child():
    from lightning_viz._projection_worker import ProjectionClient

    x, _ = _clusters(n_per=10, classes=2)
    client = ProjectionClient("umap", seed=0)
    client.submit(x.numpy(), context="slow")
    child, workdir = client._child, client.workdir
    client.close(kill=True)  # the run is failing: no waiting for the map
    assert child.returncode is not None and not os.path.exists(workdir) and client.pending == 0
    client.submit(x.numpy(), context="lost")  # a new child for a new job
    client._child.kill()
    client._child.wait()
    (failed,) = list(client.finished())
    assert failed.coords is None and "the umap worker process exited with" in failed.error
    assert not client.running
    client.close()
