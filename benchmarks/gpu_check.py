"""The CUDA path of lightning_viz, in a few minutes on one GPU; exits 0 with a message when there is no CUDA.

Checks: (1) the default suite on resnet18 under ``precision="16-mixed"`` and ``"bf16-mixed"``, channels-last,
runs without a failure and writes every monitor's images; (2) incremental occlusion on CUDA equals full passes;
(3) training with and without the suite gives bit-identical weights under ``deterministic=True``; (4) the overhead
table (training time without and with ``default_suite()``). Run: ``bash benchmarks/gpu.sh``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch

if not torch.cuda.is_available():
    print("gpu_check: no CUDA device here; nothing checked (skipped).")
    sys.exit(0)

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import pytorch_lightning as pl  # noqa: E402
from budget import lightning_module, quiet_trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchvision.models import resnet18  # noqa: E402

import lightning_viz  # noqa: E402
from lightning_viz.functional import occlusion as occ  # noqa: E402
from lightning_viz.functional import saliency as sal  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def data(steps: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(steps * 128, 3, 32, 32, generator=gen), torch.randint(0, 10, (steps * 128,)))
    val = TensorDataset(torch.randn(512, 3, 32, 32, generator=gen), torch.randint(0, 10, (512,)))
    return (
        DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(val, batch_size=128),
    )


def fit(callbacks, logdir, *, epochs=2, steps=40, channels_last=False, **trainer_kwargs):
    pl.seed_everything(0, workers=True)
    module = lightning_module(pl, lambda: resnet18(num_classes=10), channels_last=channels_last)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    trainer = quiet_trainer(pl, logdir, epochs, callbacks, accelerator="gpu", devices=1, **trainer_kwargs)
    train, val = data(steps)
    started = time.perf_counter()
    trainer.fit(module, train, val)
    torch.cuda.synchronize()
    return module, time.perf_counter() - started


def suite_under_precision() -> None:
    for precision in ("16-mixed", "bf16-mixed"):
        for channels_last in (False, True):
            label = f"default_suite, resnet18, precision={precision}, channels_last={channels_last}"
            with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                suite = lightning_viz.default_suite(every_n_epochs=1, featurevis={"steps": 8})
                fit(suite, logdir, epochs=1, steps=10, channels_last=channels_last, precision=precision)
                failed = [str(w.message) for w in caught if "switched off" in str(w.message)]
                check(not failed and not any(cb._disabled for cb in suite), f"{label} {failed[:1]}")


def incremental_occlusion() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=10).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    for net in (sal.inference_copy(model), model):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a rejected incremental path would hide a wrong patch
            got = occ.occlusion(net, x, window=8, stride=4, incremental=True)
        want = occ.occlusion(net, x, window=8, stride=4, incremental=False)
        ok = torch.allclose(got.logits, want.logits, rtol=1e-3, atol=1e-4)
        check(ok, f"incremental occlusion on CUDA equals full passes ({type(net).__name__})")


def bit_identical() -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain, _ = fit([], a, deterministic=True)
        watched, _ = fit(lightning_viz.default_suite(featurevis={"steps": 8}), b, deterministic=True)
    same = all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), watched.state_dict().values()))
    check(same, "bit-identical weights with and without default_suite() (deterministic=True, CUDA)")


def overhead() -> None:
    print("\n| run (CUDA) | without suite (s) | with default_suite() (s) | extra |\n|---|---|---|---|")
    for steps, epochs in ((391, 3), (100, 6)):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            _, plain = fit([], a, epochs=epochs, steps=steps)
            _, watched = fit(lightning_viz.default_suite(), b, epochs=epochs, steps=steps)
        row = f"resnet18 32x32, {epochs} x {steps} steps | {plain:.1f} | {watched:.1f} | {watched / plain - 1:+.1%}"
        print(f"| {row} |")


if __name__ == "__main__":
    print(f"gpu_check on {torch.cuda.get_device_name(0)}", flush=True)
    incremental_occlusion()
    bit_identical()
    suite_under_precision()
    overhead()
    sys.exit(1 if FAILURES else 0)
