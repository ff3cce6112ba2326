"""Our saliency methods against Captum's on the same model and inputs (median seconds of several runs).

Workload: torchvision ``resnet18(num_classes=10)``, eval mode, 8 probe images of 3x64x64, CPU. SmoothGrad with
n=50; occlusion with an 8x8 window and stride 4. Our methods run on the model copy that the monitor builds once per
call and shares between them (``inference_copy``: conv+BatchNorm folded, the Grad-CAM layer kept); building it is
its own row. Occlusion is timed twice: as the monitor runs it (recomputing only the window's patch in the first
layers) and with full forward passes. Captum is timed at its default settings and at its best of several batch
settings (``nt_samples_batch_size`` / ``perturbations_per_eval``). The one-pass methods take tens of milliseconds, so
they are timed in alternating pairs (ours, Captum's) and compared by the median of the per-pair ratios: on a shared
machine whose speed drifts by ±10 % between runs, that ratio is steadier than a ratio of separate medians.

The last table puts the single-pass methods next to the machine's arithmetic speed: the floating-point operations of
one forward and backward pass (counted by ``torch.utils.flop_counter``) per second, against a large matrix product's.
Needs captum (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from captum.attr import Deconvolution, GuidedBackprop, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet18

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import median_seconds  # noqa: E402

from lightning_viz.functional import occlusion as occ  # noqa: E402
from lightning_viz.functional import saliency as sal
from lightning_viz.functional._incremental import IncrementalOcclusion

GRADCAM_LAYER = "layer4.1.conv2"


def seconds(fn, repeats: int) -> float:
    return median_seconds(fn, repeats)


def paired(ours, theirs, pairs: int) -> tuple[float, float, float]:
    """Alternate the two calls ``pairs`` times: medians of each, and the median of the per-pair ratios (drift on a
    shared machine hits both sides of a pair alike)."""
    ours()
    theirs()
    a, b = [], []
    for _ in range(pairs):
        for fn, out in ((ours, a), (theirs, b)):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def best_of(label: str, values, make, repeats: int) -> tuple[float, str]:
    return min((seconds(make(v), repeats), f"{label}={v}") for v in values)


def matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / seconds(lambda: a @ b, repeats) / 1e9


def occlusion_scaling(repeats: int) -> None:
    """Incremental occlusion against full forward passes as the image grows (window and stride grow with it)."""
    torch.manual_seed(0)
    fast = sal.inference_copy(resnet18(num_classes=10).eval())
    print("| image | window / stride | images | incremental (s) | full passes (s) | ratio | local layers end at |")
    print("|---|---|---:|---:|---:|---:|---|")
    for size, window, stride, n in ((64, 8, 4, 8), (128, 16, 8, 8), (224, 32, 16, 4)):
        x = torch.randn(n, 3, size, size)
        times = {}
        for incremental in (True, False):
            times[incremental] = seconds(
                lambda inc=incremental, x=x, w=window, s=stride: occ.occlusion(
                    fast, x, window=w, stride=s, max_batch_bytes=64 * 3 * 64 * 64 * 4, incremental=inc
                ),
                max(1, repeats // 2),
            )
        split = IncrementalOcclusion.build(fast, x[:1], window, stride)
        end = ", ".join(node.name for node in split.frontier) if split is not None else "-"
        print(
            f"| {size}x{size} | {window} / {stride} | {n} | {times[True]:.2f} | {times[False]:.2f} | "
            f"{times[True] / times[False]:.2f} | {end} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--scaling", action="store_true", help="only time our occlusion, incremental vs full passes, at 3 image sizes"
    )
    args = parser.parse_args()
    if args.scaling:
        occlusion_scaling(args.repeats)
        return
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, args.size, args.size)
    t = torch.arange(8) % 10
    gen = torch.Generator()
    n, r = 50, args.repeats
    slow = max(2, r // 2)  # the occlusion runs take seconds each

    copy_seconds = seconds(lambda: sal.inference_copy(model, keep=[GRADCAM_LAYER]), r)
    fast = sal.inference_copy(model, keep=[GRADCAM_LAYER])

    def ours(method, **kw):
        return lambda: method(fast, x, t, **kw)

    def ours_occlusion(incremental: bool):
        return lambda: occ.occlusion(
            fast, x, window=8, stride=4, max_batch_bytes=64 * x[0].numel() * 4, incremental=incremental
        )

    def captum_occlusion(p=1):
        return lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=t, perturbations_per_eval=p
        )

    def captum_smoothgrad(b=None):
        return lambda: NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=b, target=t
        )

    # One-pass methods take tens of milliseconds: timed in alternating pairs, their ratio is the median per-pair ratio.
    one_pass = {
        "gradient": (ours(sal.gradient), lambda: Saliency(model).attribute(x, target=t)),
        "guided backprop": (ours(sal.guided_backprop), lambda: GuidedBackprop(model).attribute(x, target=t)),
        "deconvnet": (ours(sal.deconvnet), lambda: Deconvolution(model).attribute(x, target=t)),
        f"grad-cam ({GRADCAM_LAYER})": (
            lambda: sal.grad_cam(fast, x, t, fast.get_submodule(GRADCAM_LAYER), upsample=False),
            lambda: LayerGradCam(model, model.get_submodule(GRADCAM_LAYER)).attribute(x, target=t),
        ),
    }
    rows = []  # (name, ours, Captum default, Captum best or None, ours / default)
    for name, (mine_fn, theirs_fn) in one_pass.items():
        mine, default, ratio = paired(mine_fn, theirs_fn, 8 * r)
        rows.append((name, mine, default, None, ratio))
    mine, default = seconds(ours(sal.smoothgrad, n=n, generator=gen.manual_seed(0)), r), seconds(captum_smoothgrad(), r)
    best = best_of("nt_samples_batch_size", (5, 10, 25), captum_smoothgrad, r)
    rows.insert(1, (f"smoothgrad n={n}", mine, default, best, mine / default))
    mine, default = seconds(ours_occlusion(True), slow), seconds(captum_occlusion(), slow)
    best = best_of("perturbations_per_eval", (16, 64, 256), captum_occlusion, slow)
    rows.append(("occlusion 8/4", mine, default, best, mine / default))
    full_passes = seconds(ours_occlusion(False), slow)
    print(f"resnet18(num_classes=10), 8 probes 3x{args.size}x{args.size}, CPU, {torch.get_num_threads()} threads")
    print(f"(one-pass rows: medians of {8 * r} alternating pairs, ratio = median of the per-pair ratios)\n")
    print("| method | ours (s) | Captum default (s) | ours / default | Captum best (s) | ours / best |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| (model copy, once per monitor call) | {copy_seconds:.3f} | | | | |")
    for name, mine, default, best, ratio in rows:
        best_s, best_note = best if best is not None else (default, "default")
        best_ratio = ratio if best is None or best_s >= default else mine / best_s
        best_s = min(best_s, default)
        print(f"| {name} | {mine:.3f} | {default:.3f} | {ratio:.2f} | {best_s:.3f} ({best_note}) | {best_ratio:.2f} |")
    occl = rows[-1]
    print(
        f"| occlusion 8/4, full forward passes | {full_passes:.3f} | {occl[2]:.3f} | {full_passes / occl[2]:.2f} "
        f"| {min(occl[3][0], occl[2]):.3f} | {full_passes / min(occl[3][0], occl[2]):.2f} |"
    )

    # How close one batched forward+backward pass already is to the machine's arithmetic speed.
    xg = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        fast(xg).gather(1, t.view(-1, 1)).sum().backward()  # frozen weights: the input gradient only
    flops = counter.get_total_flops()
    peak = matmul_gflops(r)
    print(
        f"\n| single pass (forward + input gradient) | GFLOP | seconds | GFLOP/s | share of a 2048² matmul's "
        f"{peak:.0f} GFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, mine, default, _, _ in rows[:1] + rows[2:4]:
        for who, s in (("ours", mine), ("Captum", default)):
            print(
                f"| {name}, {who} | {flops / 1e9:.2f} | {s:.3f} | {flops / s / 1e9:.0f} "
                f"| {flops / s / 1e9 / peak:.0%} |"
            )


if __name__ == "__main__":
    main()
