"""Our saliency methods against Captum's on the same model and inputs (median seconds of several runs).

Workload: torchvision ``resnet18(num_classes=10)``, eval mode, 8 probe images of 3x64x64, CPU. SmoothGrad with
n=50; occlusion with an 8x8 window and stride 4. Our input-space methods run on the folded, channels-last model copy
(``inference_copy``) that the monitor builds once per call and shares between them; building it is its own row.
Captum is timed at its default
settings and at its best of several batch settings (``nt_samples_batch_size`` / ``perturbations_per_eval``).
Needs captum (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from captum.attr import Deconvolution, GuidedBackprop, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from torchvision.models import resnet18

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import median_seconds  # noqa: E402

from lightning_viz.functional import occlusion as occ  # noqa: E402
from lightning_viz.functional import saliency as sal


def seconds(fn, repeats: int) -> float:
    return median_seconds(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, args.size, args.size)
    t = torch.arange(8) % 10
    gen = torch.Generator()
    n, r = 50, args.repeats

    copy_seconds = seconds(lambda: sal.inference_copy(model), r)
    fast = sal.inference_copy(model)
    xf = x.contiguous(memory_format=torch.channels_last)

    def ours_input(method, **kw):
        return lambda: method(fast, xf, t, **kw)

    def ours_occlusion():
        return occ.occlusion(fast, xf, window=8, stride=4, max_batch_bytes=64 * x[0].numel() * 4)

    rows = [
        (
            "gradient",
            seconds(ours_input(sal.gradient), r),
            seconds(lambda: Saliency(model).attribute(x, target=t, abs=True), r),
            None,
        ),
        (
            f"smoothgrad n={n}",
            seconds(ours_input(sal.smoothgrad, n=n, generator=gen.manual_seed(0)), r),
            seconds(lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=n, target=t), r),
            min(
                (
                    seconds(
                        lambda b=b: NoiseTunnel(Saliency(model)).attribute(
                            x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=b, target=t
                        ),
                        r,
                    ),
                    f"nt_samples_batch_size={b}",
                )
                for b in (5, 10, 25)
            ),
        ),
        (
            "guided backprop",
            seconds(ours_input(sal.guided_backprop), r),
            seconds(lambda: GuidedBackprop(model).attribute(x, target=t), r),
            None,
        ),
        (
            "deconvnet",
            seconds(ours_input(sal.deconvnet), r),
            seconds(lambda: Deconvolution(model).attribute(x, target=t), r),
            None,
        ),
        (
            "grad-cam (layer4.1.conv2)",
            seconds(lambda: sal.grad_cam(model, x, t, model.layer4[1].conv2, upsample=False), r),
            seconds(lambda: LayerGradCam(model, model.layer4[1].conv2).attribute(x, target=t), r),
            None,
        ),
        (
            "occlusion 8/4",
            seconds(ours_occlusion, r),
            seconds(
                lambda: Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=t),
                1,
            ),
            min(
                (
                    seconds(
                        lambda p=p: Occlusion(model).attribute(
                            x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=t, perturbations_per_eval=p
                        ),
                        1,
                    ),
                    f"perturbations_per_eval={p}",
                )
                for p in (16, 64, 256)
            ),
        ),
    ]
    print(f"resnet18(num_classes=10), 8 probes 3x{args.size}x{args.size}, CPU, {torch.get_num_threads()} threads\n")
    print("| method | ours (s) | Captum default (s) | ours / default | Captum best (s) | ours / best |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| (model copy, once per monitor call) | {copy_seconds:.3f} | | | | |")
    for name, ours, default, best in rows:
        best_s, best_note = best if best is not None else (default, "default")
        best_s = min(best_s, default)
        print(
            f"| {name} | {ours:.3f} | {default:.3f} | {ours / default:.2f} | {best_s:.3f} ({best_note}) | "
            f"{ours / best_s:.2f} |"
        )


if __name__ == "__main__":
    main()
