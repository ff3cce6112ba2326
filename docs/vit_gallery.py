"""Regenerate the README's transformers gallery (docs/images/vit_*.png) from two short ViT runs on CPU.

    python docs/vit_gallery.py            # about a minute on 2 CPU cores

A timm ``vit_tiny_patch16_224`` (``pretrained=False``) reduced to 32x32 images, 4x4 patches (64 patches and a class
token), 4 blocks of width 48, trained for 5 epochs on 32x32 crops of scikit-image's photos with the
:class:`AttentionMonitor`; a second run of the same model with a planted attention collapse (the query weights
multiplied by 3 at each epoch start: a softmax temperature that falls) gives the entropy chart its contrast. Pictures:
the latest ``attention/rollout`` and ``attention/heads/model.blocks.3.attn`` images and the
``attention/filmstrip/probe_00`` filmstrip of the healthy run, and a chart of ``attention/normalized_entropy/<layer>``
of both runs.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import common  # noqa: E402

from lightning_viz.callbacks.attention_monitor import AttentionMonitor  # noqa: E402
from lightning_viz.probes import ProbeSet  # noqa: E402

PICTURES = {
    "vit_rollout": "attention/rollout",
    "vit_heads": "attention/heads/model.blocks.3.attn",
    "vit_filmstrip": "attention/filmstrip/probe_00",
}


class Module(common.Classifier):
    """The examples' classifier around a reduced timm ViT, with AdamW; ``sharpen`` plants an attention collapse."""

    def __init__(self, sharpen: float) -> None:
        import timm

        vit = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3
        )
        vit.reset_classifier(6)
        super().__init__(vit, lr=1e-3, weight_decay=0.05)
        self.sharpen = sharpen

    def on_train_epoch_start(self) -> None:
        if self.sharpen and self.current_epoch > 0:  # the plant: a falling softmax temperature
            with torch.no_grad():
                for block in self.model.blocks:
                    d = block.attn.qkv.out_features // 3
                    block.attn.qkv.weight[:d].mul_(self.sharpen)
                    block.attn.qkv.bias[:d].mul_(self.sharpen)

    def configure_optimizers(self):  # noqa: D102
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def train(logdir: str, name: str, sharpen: float) -> str:
    pl.seed_everything(0, verbose=False)
    train_set, val_set = common.split(*common.photo_patches(n_per_class=80, size=32))
    x, y = val_set[:]
    probes = ProbeSet(torch.stack([x[y == c][0] for c in range(4)]), torch.arange(4))
    monitor = AttentionMonitor(probes=probes, tile_size=64, filmstrip_probes=1)
    trainer = pl.Trainer(
        max_epochs=5,
        logger=TensorBoardLogger(logdir, name=name, version=0),
        callbacks=[monitor],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(Module(sharpen), loader, DataLoader(val_set, batch_size=256))
    return os.path.join(logdir, name, "version_0")


def entropy_chart(runs: dict[str, ea.EventAccumulator], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(9, 3.2), sharey=True)
    for ax, (title, acc) in zip(axes, runs.items()):
        for layer in range(4):
            events = acc.Scalars(f"attention/normalized_entropy/model.blocks.{layer}.attn")
            ax.plot([e.step for e in events], [e.value for e in events], marker="o", label=f"model.blocks.{layer}.attn")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attention/normalized_entropy")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    warnings.filterwarnings("ignore")
    out = os.path.join(HERE, "images")
    with tempfile.TemporaryDirectory() as logdir:
        healthy = ea.EventAccumulator(train(logdir, "healthy", 0.0), size_guidance={"images": 0, "scalars": 0})
        planted = ea.EventAccumulator(train(logdir, "collapse", 3.0), size_guidance={"images": 0, "scalars": 0})
        healthy.Reload()
        planted.Reload()
        for name, tag in PICTURES.items():
            image = Image.open(io.BytesIO(healthy.Images(tag)[-1].encoded_image_string)).convert("RGB")
            image.save(os.path.join(out, f"{name}.png"), optimize=True)
            print(f"{name}.png <- {tag}")
        entropy_chart(
            {"healthy (AdamW 1e-3)": healthy, "planted collapse (query weights x3 per epoch)": planted},
            os.path.join(out, "vit_entropy.png"),
        )
        print("vit_entropy.png <- attention/normalized_entropy/<layer>")


if __name__ == "__main__":
    main()
