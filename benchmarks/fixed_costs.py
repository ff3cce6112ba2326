"""The fixed CPU-side cost of one logged epoch of ``default_suite()``: what a faster accelerator does not shrink.

Two fits on a small model, each monitor's calls profiled apart (cProfile): (1) ``default_suite()`` as it is, its
calls scheduled and scaled by its budget, baseline and end of fit included, the cost divided by the run's logged
epochs (every epoch and step 0: the cheap monitors log at each); (2) every monitor at every epoch at full scale
(``every_n_epochs=1``, no budget), the cost per call of each monitor. The kinds of fixed work:

* image encoding (PNG, for TensorBoard's event file and the projector's sprite),
* file writing (event records, flushes, the projector's files),
* model copies (``copy.deepcopy``, the saliency inference copy, state-dict copies),
* ``torch.fx`` tracing (incremental occlusion, conv+BatchNorm folding),
* host <-> device copies (``Tensor.cpu``, ``Tensor.to``, ``Tensor.numpy``; on a CPU-only run mostly no-ops),

next to the rest (the monitors' own computation, which does shrink on a GPU). Target: <= 0.1 s of fixed cost per
logged epoch for the default suite. Run:
``python benchmarks/fixed_costs.py [--model resnet18|mobilenet_v3_small] [--epochs 6] [--skip full|default]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

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


def profiled_fit(
    make_model, data, epochs: int, batch_size: int, full: bool
) -> tuple[dict[str, pstats.Stats], list, Any]:
    """Fit with ``default_suite()``, profiling each monitor's calls apart (one profile per monitor).

    ``full``: every monitor at every epoch at full scale (``every_n_epochs=1``, no budget); else the default suite as
    it is, its calls scheduled and scaled by its budget (baseline and end of fit included)."""
    profiles: dict[str, cProfile.Profile] = {}
    original = VizCallback._run

    def run(self, *args, **kwargs):
        profile = profiles.setdefault(type(self).__name__, cProfile.Profile())
        profile.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            profile.disable()

    VizCallback._run = run
    try:
        suite = lightning_viz.default_suite(every_n_epochs=1, budget=None) if full else lightning_viz.default_suite()
        train, val = data
        _, costs = fit_seconds(make_model, train, val, epochs, suite, batch_size)
    finally:
        VizCallback._run = original
    stats = {name: pstats.Stats(p) for name, p in profiles.items() if p.getstats()}
    return stats, costs, suite[0]._budget


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


def table(title: str, stats: dict[str, pstats.Stats], costs: list, per: dict[str, int]) -> None:
    """One row per kind of fixed work, one column per monitor (seconds per ``per[monitor]`` calls) and the suite."""
    names = [n for n, s in costs if sum(s) > 0]
    kinds = {n: kinds_of(stats[n]) if n in stats else dict.fromkeys(KINDS, 0.0) for n in names}
    short = [n.removesuffix("Monitor") for n in names]
    print(f"\n{title}\n\n| seconds | {' | '.join(short)} | **suite** |\n|---|{'---|' * (len(names) + 1)}")
    for kind in [*KINDS, "fixed, in all", "computation (the rest)", "calls"]:
        cells, total = [], 0.0
        for n, s in costs:
            if n not in kinds:
                continue
            fixed = sum(kinds[n].values())
            value = {
                "fixed, in all": fixed, "computation (the rest)": sum(s) - fixed, "calls": len(s)
            }.get(kind, kinds[n].get(kind, 0.0))  # fmt: skip
            if kind == "calls":
                cells.append(str(value))
                continue
            cells.append(f"{value / max(1, per[n]):.3f}")
            total += value / max(1, per["suite"])
        suite = "" if kind == "calls" else f"**{total:.3f}**"
        print(f"| {kind} | {' | '.join(cells)} | {suite} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "mobilenet_v3_small"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch (resnet18)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("full", "default"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchvision.models import mobilenet_v3_small, resnet18

    if args.model == "resnet18":
        make, data, batch = (lambda: resnet18(num_classes=10)), cifar_shaped(args.steps), 128
    else:
        make, data, batch = (lambda: mobilenet_v3_small(num_classes=10)), digits_64(), 64
    started = time.perf_counter()
    if "default" not in args.skip:
        stats, costs, _ = profiled_fit(make, data, args.epochs, batch, full=False)
        table(
            f"{args.model}, default_suite() under its budget, {args.epochs} epochs (step 0 and end of fit included): "
            f"seconds per epoch of the run ({args.epochs + 1} logged epochs with step 0; every cheap monitor logs "
            f"each epoch), per monitor and for the suite (target for the suite's fixed cost: <= 0.1)",
            stats,
            costs,
            {**{n: args.epochs + 1 for n, _ in costs}, "suite": args.epochs + 1},
        )
    if "full" not in args.skip:
        stats, costs, _ = profiled_fit(make, data, min(args.epochs, 2), batch, full=True)
        table(
            f"{args.model}, every monitor at every epoch at full scale (no budget), {min(args.epochs, 2)} epochs: "
            "seconds per call of each monitor; the suite's column per logged epoch (step 0 counts)",
            stats,
            costs,
            {**{n: len(s) for n, s in costs}, "suite": max(len(s) for _, s in costs)},
        )
    print(f"\n(benchmark wall time {time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
