"""The ``lightning-viz`` command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

#: Samples kept per tag. TensorBoard keeps only 10 images (and 10 text entries) per tag by default, chosen at random;
#: an explicit, large bound keeps every logged epoch. (``images=0`` is documented as "keep all" but has shown
#: nothing in some TensorBoard versions, tensorflow/tensorboard#5550.)
SAMPLES_PER_PLUGIN = "images=100000,text=100000,histograms=100000"


def board_command(logdir: str, *, port: int = 6006, host: str = "127.0.0.1", extra: Sequence[str] = ()) -> list[str]:
    """The TensorBoard command line that ``lightning-viz board`` runs."""
    return [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        logdir,
        "--host",
        host,
        "--port",
        str(port),
        "--samples_per_plugin",
        SAMPLES_PER_PLUGIN,
        *extra,
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-viz", description="Look at what lightning_viz logged.")
    sub = parser.add_subparsers(dest="command", required=True)
    board = sub.add_parser("board", help="start TensorBoard on LOGDIR, keeping every logged epoch's images")
    board.add_argument("logdir")
    board.add_argument("--port", type=int, default=6006)
    board.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: only this machine; TensorBoard's --bind_all would expose the run)",
    )
    report = sub.add_parser("report", help="write one self-contained HTML page per run (findings, images, scalars)")
    report.add_argument("logdir")
    report.add_argument("-o", "--output", default=None, help="the HTML file (default LOGDIR/report.html)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if args.command == "board":
        if not os.path.isdir(args.logdir):
            print(f"lightning-viz board: no such directory: {args.logdir}", file=sys.stderr)
            return 2
        cmd = board_command(args.logdir, port=args.port, host=args.host, extra=extra)
        print(f"TensorBoard at http://{args.host}:{args.port}/  (Ctrl+C to stop)", flush=True)
        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return 0
    if args.command == "report":
        if extra:
            print(f"lightning-viz report: unknown arguments {extra}", file=sys.stderr)
            return 2
        from lightning_viz.report import write_reports

        try:
            paths = write_reports(args.logdir, args.output)
        except FileNotFoundError as exc:
            print(f"lightning-viz report: {exc}", file=sys.stderr)
            return 2
        for path in paths:
            print(path)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
