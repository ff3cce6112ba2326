"""Issue #16 reproduced offline: MobileNetV3-small's BatchNorm (momentum 0.01) has not settled after a few epochs.

torchvision ``mobilenet_v3_small(num_classes=10)`` trained on sklearn's 8x8 digits upscaled to 64x64 (3 channels),
on the CPU. The training loss falls fast, yet in eval mode the validation accuracy stays low: the running statistics
still carry their initial values (mean 0, variance 1), far from the data's. The same weights score well with batch
statistics. The script trains with an ActivationMonitor, a :class:`DynamicsMonitor` and a DiagnosisMonitor (the
parts of ``default_suite`` that the diagnosis reads), prints the numbers and the final panel, and checks what issue
#16 asks: the panel names a BatchNorm mismatch, and lists no dead filters and no under-training (measured in eval
mode on the validation data, they are consequences of the running statistics, folded into that finding)::

    python benchmarks/bn_mismatch_mobilenet.py [--epochs 4] [--momentum 0.01]

Pass ``--momentum 0.1`` for the healthy control (the rule should then stay silent once the statistics settle).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=None, help="override every BatchNorm's momentum")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from dynamics_cost import classifier_module  # benchmarks/ is on the path when this script runs
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import mobilenet_v3_small

    from lightning_viz import ActivationMonitor, DiagnosisMonitor
    from lightning_viz.callbacks.dynamics_monitor import DynamicsMonitor
    from lightning_viz.functional.dynamics import batch_statistics
    from lightning_viz.records import BatchNormProbe, BatchNormStats, LossStats, bus_for

    torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = order[:1400], order[1400:]
    train = DataLoader(TensorDataset(x[train_idx], y[train_idx]), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[val_idx], y[val_idx]), batch_size=128)

    model = mobilenet_v3_small(num_classes=10)
    momenta = sorted({m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)})
    if args.momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = args.momentum

    monitor, diagnosis = DynamicsMonitor(), DiagnosisMonitor()
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            callbacks=[ActivationMonitor(max_batches=4), monitor, diagnosis],
            logger=pl.loggers.TensorBoardLogger(logdir, name="mobilenet"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        module = classifier_module(pl, model, lambda params: torch.optim.Adam(params, lr=1e-3))
        started = time.perf_counter()
        trainer.fit(module, train, val)
        seconds = time.perf_counter() - started

    module.eval()
    with torch.no_grad():
        xv, yv = x[val_idx], y[val_idx]
        eval_acc = (module(xv).argmax(1) == yv).float().mean().item()
        with batch_statistics(module):
            batch_acc = (module(xv).argmax(1) == yv).float().mean().item()
    bus = bus_for(trainer)
    probe = bus.latest(BatchNormProbe).get("")
    layers = list(bus.latest(BatchNormStats).values())
    loss = bus.latest(LossStats).get("")
    kinds = [f.kind for f in diagnosis.findings]
    finding = next((f for f in diagnosis.findings if f.kind == "batchnorm_mismatch"), None)

    print(f"\nmobilenet_v3_small, {args.epochs} epochs on 64x64 digits, {seconds:.0f} s on the CPU")
    print(f"BatchNorm momentum: torchvision default {momenta}, used {args.momentum or momenta}")
    print(
        f"training loss (last epoch mean): {loss.train_loss if loss else float('nan'):.4f}; chance ln 10 = "
        f"{math.log(10):.3f}"
    )
    print(f"validation accuracy ({len(val_idx)} samples): eval mode {eval_acc:.1%}, batch statistics {batch_acc:.1%}")
    if probe is not None:
        print(
            f"probe ({probe.samples} samples): eval loss {probe.eval_loss:.3f} / acc {probe.eval_accuracy:.1%}; "
            f"batch-stat loss {probe.batch_stat_loss:.3f} / acc {probe.batch_stat_accuracy:.1%}"
        )
    worst = sorted(layers, key=lambda r: -r.mean_shift)[:3]
    print("largest running-mean shifts: " + ", ".join(f"{r.subject} {r.mean_shift:.2f} std" for r in worst))
    print(
        f"median over {len(layers)} BN layers: mean shift "
        f"{sorted(r.mean_shift for r in layers)[len(layers) // 2]:.2f} std, |ln var ratio| "
        f"{sorted(r.var_log_ratio for r in layers)[len(layers) // 2]:.2f}"
    )
    print(f"final panel findings: {kinds or 'none'}")
    if finding is None:
        print("batchnorm_mismatch: no finding")
    else:
        print(f"batchnorm_mismatch: {finding.severity.upper()} - {finding.summary}")
        for line in finding.evidence:
            print(f"  - {line}")
    sick = args.momentum is None or args.momentum < 0.05
    ok = ("batchnorm_mismatch" in kinds) == sick and not {"dead_filters", "undertraining"} & set(kinds)
    print(
        f"{'OK' if ok else 'FAIL'}: expected {'a BatchNorm mismatch' if sick else 'no BatchNorm mismatch'} and no "
        "dead-filter or under-training finding in the final panel"
    )
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
