"""The main job: train the example CNN with the full lightning_viz suite on offline data, log to TensorBoard.

python examples/demo.py --logdir runs                  # bundled photos (offline), a few minutes on 2 CPU cores
python examples/demo.py --data digits                   # scikit-learn digits (offline)
python examples/demo.py --data cifar10                  # real CIFAR-10 (downloads: needs internet)
"""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import lightning_viz  # noqa: E402


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
    module = common.Classifier(common.DemoCNN(in_channels, num_classes))
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.logdir, name=args.name or args.data),
        # every default, except that the slowest two monitors log every 4 epochs instead of 5 and 10, so a short
        # demo shows their evolution too
        callbacks=lightning_viz.default_suite(exemplars={"every_n_epochs": 4}, featurevis={"every_n_epochs": 4}),
        limit_train_batches=limit,
        limit_val_batches=limit,
        accelerator="cpu",
        deterministic=True,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_loader, val_loader)
    print(
        f"\nTensorBoard logs written to {trainer.logger.log_dir}. Open them with:\n\n"
        f"    lightning-viz board {args.logdir}/\n"
    )


if __name__ == "__main__":
    main()
