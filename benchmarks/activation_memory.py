"""Peak RSS of a validation epoch of resnet18 (79 batches of 128 at 32x32, CPU) with and without ActivationMonitor.

Each configuration runs in its own process, so ``ru_maxrss`` (the process's peak resident set) measures it alone.
The monitor keeps per-channel counters (3 float64 per channel and call site) plus a bounded value sample per site;
the difference in peak RSS should be of that order, not of the activations' size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(hooked: bool, batches: int) -> None:
    import torch
    from torchvision.models import resnet18

    from lightning_viz import ActivationMonitor

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    monitor = ActivationMonitor(max_batches=batches)
    monitor._resolve(None, model)
    x = torch.randn(128, 3, 32, 32)
    if hooked:
        monitor._start(None)
    for i in range(batches):
        monitor._batch(i)
        with torch.inference_mode():
            model(x)
    monitor._release(model)
    counters = sum(s.counters().numel() * 8 + s.sample_size * 4 for s in monitor._stats.values())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024, "counters_kib": counters / 1024, "sites": len(monitor._stats)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=79)
    parser.add_argument("--child", choices=["plain", "hooked"])
    args = parser.parse_args()
    if args.child:
        child(args.child == "hooked", args.batches)
        return
    results = {}
    for mode in ("plain", "hooked"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--batches", str(args.batches)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"validation epoch: resnet18, {args.batches} batches of 128x3x32x32, CPU\n")
    print("| run | peak RSS (MiB) | call sites | counters + samples (KiB) |")
    print("|---|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['peak_mib']:.1f} | {r['sites']} | {r['counters_kib']:.1f} |")
    print(f"| **difference** | **{results['hooked']['peak_mib'] - results['plain']['peak_mib']:+.1f}** | | |")


if __name__ == "__main__":
    main()
