"""The fixed CPU-side cost of one logged epoch of ``default_suite()``: what a faster accelerator does not shrink.

Every monitor of the default suite logs at every epoch (``every_n_epochs=1``, no budget) on a small model, and each
monitor's calls are profiled (cProfile). The time spent in each kind of fixed work is summed and divided by the
number of logged epochs (the step-0 view counts as one):

* image encoding (PNG, for TensorBoard's event file and the projector's sprite),
* file writing (event records, flushes, the projector's files),
* model copies (``copy.deepcopy``, the saliency inference copy, state-dict copies),
* ``torch.fx`` tracing (incremental occlusion, conv+BatchNorm folding),
* host <-> device copies (``Tensor.cpu``, ``Tensor.to``, ``Tensor.numpy``; on a CPU-only run mostly no-ops),

next to the rest (the monitors' own computation, which does shrink on a GPU). Target: <= 0.1 s of fixed cost per
logged epoch. Run: ``python benchmarks/fixed_costs.py [--model resnet18|mobilenet_v3_small] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from budget import cifar_shaped, digits_64, fit_seconds  # noqa: E402

import lightning_viz  # noqa: E402
from lightning_viz.callbacks.base import VizCallback  # noqa: E402

#: (kind of fixed work, matcher of a profiled function: (file, function name) -> bool)
KINDS = {
    "image encoding (PNG)": lambda f, n: "'encode' of 'ImagingEncoder'" in n or n == "compress",
    "file writing": lambda f, n: (
        ("event_file_writer" in f and n in {"add_event", "flush"})
        or (f.endswith("threading.py") and n == "wait")  # waiting for the event writer's thread to write
        or n in {"savetxt", "write_tensor_tsv"}
    ),
    "model copies": lambda f, n: (
        (n == "deepcopy" and f.endswith("copy.py"))
        or n in {"keep_initial_weights", "initial_weights", "load_state_dict"}
    ),
    "torch.fx tracing": lambda f, n: n == "symbolic_trace" or ("torch/fx" in f and n == "trace"),
    "host <-> device copies": lambda f, n: f == "~" and any(m in n for m in ("'cpu'", "'to'", "'numpy'", "'cuda'")),
}


def profiled_fit(make_model, data, epochs: int, batch_size: int) -> tuple[pstats.Stats, float, int, list]:
    """Fit with every monitor at every epoch, profiling the monitors' calls only."""
    profile = cProfile.Profile()
    original = VizCallback._run

    def run(self, *args, **kwargs):
        profile.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            profile.disable()

    VizCallback._run = run
    try:
        suite = lightning_viz.default_suite(every_n_epochs=1, budget=None)
        train, val = data
        seconds, costs = fit_seconds(make_model, train, val, epochs, suite, batch_size)
    finally:
        VizCallback._run = original
    rounds = max(len(s) for name, s in costs if name != "DiagnosisMonitor")
    return pstats.Stats(profile), seconds, rounds, costs


def kinds_of(stats: pstats.Stats) -> dict[str, float]:
    """Seconds per kind of fixed work: the cumulative time of calls to a matching function made from a function
    that does not match the same kind (outermost calls only: nested and recursive calls are not counted twice)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for (file, _, name), (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for kind, matches in KINDS.items():
            if matches(file, name):
                if not callers:
                    totals[kind] += cumulative
                for (caller_file, _, caller_name), timing in callers.items():
                    if not matches(caller_file, caller_name):
                        totals[kind] += timing[3]
                break
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "mobilenet_v3_small"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch (resnet18)")
    parser.add_argument("--top", action="store_true", help="also print the 25 functions with the most own time")
    parser.add_argument("--dump", help="write the profile (pstats) to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchvision.models import mobilenet_v3_small, resnet18

    if args.model == "resnet18":
        make, data, batch = (lambda: resnet18(num_classes=10)), cifar_shaped(args.steps), 128
    else:
        make, data, batch = (lambda: mobilenet_v3_small(num_classes=10)), digits_64(), 64
    started = time.perf_counter()
    stats, _, rounds, costs = profiled_fit(make, data, args.epochs, batch)
    monitors = sum(sum(s) for _, s in costs)
    kinds = kinds_of(stats)
    fixed = sum(kinds.values())
    print(f"\n{args.model}, {args.epochs} epochs, every monitor every epoch: {rounds} logged epochs (with step 0)")
    print("\n| fixed CPU-side cost | seconds per logged epoch |\n|---|---|")
    for kind, seconds in kinds.items():
        print(f"| {kind} | {seconds / rounds:.3f} |")
    print(f"| **fixed, in all** (target <= 0.1) | **{fixed / rounds:.3f}** |")
    print(f"| the monitors' computation (the rest) | {(monitors - fixed) / rounds:.3f} |")
    per_monitor = ", ".join(f"{n.removesuffix('Monitor')} {sum(s) / rounds:.3f}" for n, s in costs)
    print(f"\nper monitor, seconds per logged epoch: {per_monitor}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()})")
    if args.top:
        stats.sort_stats("tottime").print_stats(25)
    if args.dump:
        stats.dump_stats(args.dump)


if __name__ == "__main__":
    main()
