"""Regenerate the README gallery (docs/images/*.png) from the demo's event files.

    python examples/demo.py --logdir runs && python docs/gallery.py runs/photos/version_0

One picture per monitor: the latest image of a representative tag, as TensorBoard shows it.
"""

from __future__ import annotations

import argparse
import io
import os

from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

HERE = os.path.dirname(os.path.abspath(__file__))

# picture name -> tag (the latest image of it)
PICTURES = {
    "filters": "filters/filmstrip/model.conv1",
    "activations": "activations/maps/model.relu1",
    "dead_history": "activations/dead_channels_by_layer",
    "saliency": "saliency/grid",
    "embedding": "embedding/map_filmstrip",
    "neighbours": "embedding/neighbours",
    "exemplars": "exemplars/model.conv3",
    "featurevis": "featurevis/filmstrip/model.conv3",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", help="a run directory with event files, e.g. runs/photos/version_0")
    parser.add_argument("--out", default=os.path.join(HERE, "images"))
    parser.add_argument("--max-width", type=int, default=900)
    args = parser.parse_args()
    acc = ea.EventAccumulator(args.run, size_guidance={"images": 0})
    acc.Reload()
    os.makedirs(args.out, exist_ok=True)
    available = set(acc.Tags()["images"])
    for name, tag in PICTURES.items():
        if tag not in available:
            print(f"skipped {name}: no tag {tag!r} in {args.run}")
            continue
        image = Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB")
        if image.width > args.max_width:
            image = image.resize((args.max_width, round(image.height * args.max_width / image.width)), Image.BOX)
        path = os.path.join(args.out, f"{name}.png")
        image.save(path, optimize=True)
        print(f"{path}  <- {tag}")


if __name__ == "__main__":
    main()
