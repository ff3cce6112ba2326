"""The main job: train the example CNN with the full lightning_viz suite on offline data, log to TensorBoard.

python examples/demo.py --logdir runs                  # bundled photos (offline), a few minutes on 2 CPU cores
python examples/demo.py --data digits                   # scikit-learn digits (offline)
python examples/demo.py --data cifar10                  # real CIFAR-10 (downloads: needs internet)
python examples/demo.py --epochs 3 --limit-batches 0.3  # a short run (about a minute)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import lightning_viz  # noqa: E402


def suite_options(class_names: list[str], limit: float = 1.0) -> dict:
    """The demo's monitor options: every monitor logs often enough that a short run shows evolution, each is sized
    smaller than its default, and the demo states its budget: on its tiny epochs (seconds each) one visualization
    call may cost up to one epoch of training (``max_overhead=1.0``; the default warns above 10 %; no limit when
    ``--limit-batches`` makes epochs of a fraction of a second), so it prints no cost warning of ours. It keeps the
    fixed cadences (``budget=None``): a showcase whose pictures do not depend on how busy the machine is; a training
    run of your own leaves the default budget on."""
    return {
        "budget": None,
        # with --limit-batches an epoch lasts a fraction of a second: no call could stay within a share of it
        "max_overhead": 1.0 if limit == 1.0 and isinstance(limit, float) else float("inf"),
        "saliency": {"smoothgrad_samples": 8, "max_probes": 4},
        "embedding": {"class_names": class_names},  # its subset: up to 1000 samples, all of a smaller set
        # every 4 epochs instead of 5 and 10, so a short demo shows their evolution too; smaller, so each stays cheap
        "exemplars": {"every_n_epochs": 4, "max_channels": 8, "max_samples": 600},
        "featurevis": {"every_n_epochs": 4, "max_channels": 8, "steps": 24},
    }


def board_command(logdir: str) -> str:
    """A ``lightning-viz board`` command that works as printed in a fresh shell: the script's absolute path (it lives
    beside this Python, e.g. in ``.venv/bin``, which a fresh shell does not have on its PATH) and the log dir's."""
    script = os.path.join(os.path.dirname(sys.executable), "lightning-viz")
    command = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "lightning_viz.cli"]
    return shlex.join([*command, "board", os.path.abspath(logdir)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--data", choices=["photos", "digits", "cifar10"], default="photos")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit-batches", type=float, default=1.0, help="share (or number) of batches per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="run name under LOGDIR (default: the data set's name)")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True)
    train, val, in_channels, num_classes = common.load(args.data, seed=args.seed)
    train_loader, val_loader = common.loaders(train, val, seed=args.seed)
    example = torch.zeros(1, *train[0][0].shape)
    module = common.Classifier(common.DemoCNN(in_channels, num_classes), example_input=example)
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    # the validation set has few (large) batches: a share of it is at least one batch
    val_limit = max(limit, 1 / len(val_loader)) if isinstance(limit, float) else limit
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        # log_graph: TensorBoard's Graphs tab shows the model, traced with the module's `example_input_array`
        logger=TensorBoardLogger(args.logdir, name=args.name or args.data, log_graph=True),
        callbacks=lightning_viz.default_suite(**suite_options(list(train.classes), args.limit_batches)),
        limit_train_batches=limit,
        limit_val_batches=val_limit,
        log_every_n_steps=10,
        accelerator="cpu",
        deterministic=True,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_loader, val_loader)
    make = "  (or, in this repository: make board)" if os.path.normpath(args.logdir) == "runs" else ""
    print(
        f"\nTensorBoard logs written to {trainer.logger.log_dir}. Open them with:\n\n"
        f"    {board_command(args.logdir)}\n{make}\n"
    )


if __name__ == "__main__":
    main()
