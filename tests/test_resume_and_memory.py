"""A resumed run continues the same evidence; repeated calls don't grow memory."""

from __future__ import annotations

import os

import torch
from conftest import Events, TinyCNN, loaders, make_module, trainer_kwargs

import lightning_viz

FAST = dict(featurevis={"steps": 4}, embedding={"reducer": "pca"})


def test_resume_continues_with_the_same_probes_state_and_steps(tmp_path, pl_ns):
    train, val = loaders(n=48)
    ckpt_dir = tmp_path / "ckpt"
    kw = trainer_kwargs(tmp_path, enable_checkpointing=True)

    def trainer(callbacks, epochs, checkpoint):
        return pl_ns.Trainer(
            callbacks=[*callbacks, checkpoint],
            logger=pl_ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
            **{**kw, "max_epochs": epochs},
        )

    first = lightning_viz.default_suite(every_n_epochs=1, **FAST)
    trainer(first, 2, pl_ns.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)).fit(
        make_module(pl_ns, TinyCNN()), train, val
    )
    second = lightning_viz.default_suite(every_n_epochs=1, **FAST)
    trainer(second, 4, pl_ns.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir))).fit(
        make_module(pl_ns, TinyCNN()), train, val, ckpt_path=str(ckpt_dir / "last.ckpt")
    )
    by_type = lambda suite, kind: next(cb for cb in suite if isinstance(cb, kind))  # noqa: E731
    for kind in (lightning_viz.SaliencyMonitor, lightning_viz.EmbeddingMonitor, lightning_viz.ActivationMonitor):
        a, b = by_type(first, kind).probes, by_type(second, kind).probes
        assert torch.equal(a.images, b.images), kind.__name__
    assert (
        by_type(second, lightning_viz.EmbeddingMonitor)._indices
        == by_type(first, lightning_viz.EmbeddingMonitor)._indices
    )
    events = Events(str(tmp_path / "run" / "version_0"))
    for tag in (
        "filters/model.conv1",
        "saliency/grid",
        "embedding/map",
        "featurevis/model.conv2",
        "exemplars/model.conv2",
    ):
        steps = events.image_steps(tag)
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 12, (tag, steps)
    assert [s for s, _ in events.scalars("diagnosis/findings")] == [3, 6, 9, 12]
    diagnosis = by_type(second, lightning_viz.DiagnosisMonitor)
    assert [e for e, _ in diagnosis._history["train_loss"]] == [1, 2, 3, 4]  # history carried over the resume
    with open(tmp_path / "run" / "version_0" / "projector_config.pbtxt") as f:
        config = f.read()
    for step in (0, 3, 6, 9):
        assert f'tensor_name: "embedding: step {step:08d}"' in config
    assert 'tensor_name: "embedding: latest (step 12)"' in config


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_after_100_calls_of_each_monitor(tmp_path):
    import types

    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz.sinks import Sink

    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 4, (64,)))
    trainer = types.SimpleNamespace(
        global_step=0,
        sanity_checking=False,
        current_epoch=0,
        is_global_zero=True,
        world_size=1,
        should_stop=False,
        max_epochs=1000,
        val_dataloaders=DataLoader(data, batch_size=32),
        train_dataloader=None,
        callbacks=[],
        callback_metrics={"train_loss": torch.tensor(1.0), "val_loss": torch.tensor(1.0)},
    )
    suite = lightning_viz.default_suite(
        saliency={"occlusion_window": 4, "smoothgrad_samples": 2, "max_probes": 2},
        embedding={"reducer": "pca", "subset_size": 32},
        exemplars={"max_samples": 32, "top_k": 2, "max_channels": 2},
        featurevis={"steps": 1, "max_channels": 2, "image_size": 24},
    )
    trainer.callbacks = suite
    writer = SummaryWriter(str(tmp_path))
    growth = {}
    try:
        for monitor in suite:
            monitor._sink = Sink(writer, [], is_global_zero=True)
            monitor._resolve(trainer, model)
            if isinstance(monitor, lightning_viz.ActivationMonitor):
                monitor._start(trainer)
                for i, (x, _) in enumerate(DataLoader(data, batch_size=32)):
                    monitor._batch(i)
                    model(x)
                monitor._recorder.detach()
            first = None
            for call in range(100):
                trainer.global_step += 1
                monitor._run(trainer, model, epochs_done=trainer.global_step)
                if call == 0:
                    first = _rss_bytes()
            if isinstance(monitor, lightning_viz.EmbeddingMonitor):
                monitor._release(model)
            growth[type(monitor).__name__] = (_rss_bytes() - first) / first
            assert not monitor._disabled, monitor._disabled
    finally:
        writer.close()
    assert all(g < 0.10 for g in growth.values()), growth
