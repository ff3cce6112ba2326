"""Screenshots for the README (docs/images/tensorboard_*.png, report.png) from a short demo run.

    python examples/demo.py --epochs 3 --limit-batches 0.3 --logdir runs/short
    python docs/screenshots.py runs/short

Starts ``lightning-viz board`` on 127.0.0.1 (a free port), photographs TensorBoard's Images, Time Series and Custom
Scalars tabs and the HTML report with headless chromium, stops TensorBoard, and keeps each PNG under 300 KB.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BYTES = 300_000
#: picture name -> TensorBoard tab (the part of the URL after '#')
TABS = {
    "tensorboard_images": "images",
    "tensorboard_timeseries": "timeseries",
    "tensorboard_custom_scalars": "custom_scalars",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(url: str, path: str, size: tuple[int, int], budget_ms: int = 15000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs a chromium (or chrome) on PATH")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    shrink(path)


def shrink(path: str) -> None:
    """Keep a PNG under MAX_BYTES: a 256-colour palette first, then smaller."""
    image = Image.open(path).convert("RGB")
    while True:
        image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
        if os.path.getsize(path) < MAX_BYTES:
            return
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", help="a log dir holding the demo's run(s), e.g. runs/short")
    parser.add_argument("--out", default=os.path.join(HERE, "images"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "lightning_viz.cli", "board", args.logdir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or board.poll() is not None:
                    raise SystemExit("TensorBoard did not start") from None
                time.sleep(1)
        time.sleep(5)  # let it load the event files
        for name, tab in TABS.items():
            path = os.path.join(args.out, f"{name}.png")
            shoot(f"http://127.0.0.1:{port}/#{tab}", path, (1400, 1000))
            print(path)
    finally:
        board.terminate()  # board passes the signal on to TensorBoard's process group
        board.wait(timeout=30)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.dirname(
            sorted(glob.glob(os.path.join(args.logdir, "**", "events.out.tfevents.*"), recursive=True))[-1]
        )
        page = os.path.join(tmp, "report.html")
        subprocess.run([sys.executable, "-m", "lightning_viz.cli", "report", run, "-o", page], check=True)
        path = os.path.join(args.out, "report.png")
        shoot(f"file://{page}", path, (1400, 1400), budget_ms=2000)
        print(path)


if __name__ == "__main__":
    main()
