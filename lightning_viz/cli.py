"""The ``lightning-viz`` command."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
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


def pinned_url(logdir: str, *, port: int = 6006, host: str = "127.0.0.1") -> str | None:
    """TensorBoard's address with the Time Series tab's cards of your own losses and accuracies pinned first.

    TensorBoard sorts tags alphabetically (our ``activations``, ``diagnosis`` ... come before ``train_loss``) and
    reads pins from the address (``pinnedCards``, a JSON list; checked in a browser). The tags are found by name in
    the runs already logged (``train_loss``, ``val/loss``, ``val_acc`` ...); ``None`` when there is none yet.
    """
    import json
    import urllib.parse

    from tensorboard.backend.event_processing import event_accumulator as ea

    from lightning_viz.report import find_metric, find_runs

    tags: set[str] = set()
    for run in find_runs(logdir):
        acc = ea.EventAccumulator(run, size_guidance={"scalars": 1, "images": 1, "tensors": 1, "histograms": 1})
        try:
            acc.Reload()
            tags.update(acc.Tags().get("scalars", []))
        except Exception:  # noqa: BLE001 - an unreadable run pins nothing; the board still starts
            continue
    wanted = [find_metric(sorted(tags), stage, metric) for metric in ("loss", "acc") for stage in ("train", "val")]
    cards = [{"plugin": "scalars", "tag": tag} for tag in dict.fromkeys(t for t in wanted if t)]
    if not cards:
        return None
    query = urllib.parse.quote(json.dumps(cards, separators=(",", ":")))
    return f"http://{host}:{port}/?pinnedCards={query}#timeseries"


#: Signals that stop ``board``; each is passed on to TensorBoard's process group.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: Seconds TensorBoard gets to exit after a stop signal before it (and its data server) is killed.
STOP_GRACE_S = 10.0


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(child.pid, signum)  # TensorBoard and its data-server child
        elif signum == getattr(signal, "SIGKILL", None):
            child.kill()
        else:
            child.terminate()
    except (ProcessLookupError, PermissionError):
        pass


def run_board(cmd: Sequence[str]) -> int:
    """Run TensorBoard until it exits or this process is asked to stop; no process of it outlives this call.

    TensorBoard runs in its own process group (session). SIGINT, SIGTERM and SIGHUP sent to this process are passed
    on to that group as SIGTERM; after ``STOP_GRACE_S`` seconds (or a second stop signal) the group is killed. Returns
    TensorBoard's exit status, or 0 when it was stopped on request.
    """
    stop_requested: list[float] = []
    child: subprocess.Popen | None = None

    def on_stop(signum: int, frame: object) -> None:
        stop_requested.append(time.monotonic())
        if child is not None:
            _signal_group(child, signal.SIGTERM if len(stop_requested) == 1 else getattr(signal, "SIGKILL", signum))

    # handlers first: a signal arriving while TensorBoard starts must not leave it running
    previous = {signum: signal.signal(signum, on_stop) for signum in STOP_SIGNALS}
    try:
        child = subprocess.Popen(list(cmd), start_new_session=os.name == "posix")
        if stop_requested:
            _signal_group(child, signal.SIGTERM)
        while True:
            try:
                returncode = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_S:
                    _signal_group(child, getattr(signal, "SIGKILL", signal.SIGTERM))
        if stop_requested:
            _signal_group(child, getattr(signal, "SIGKILL", signal.SIGTERM))  # whatever TensorBoard left behind
            return 0
        return returncode
    finally:
        if child is not None and child.poll() is None:
            _signal_group(child, getattr(signal, "SIGKILL", signal.SIGTERM))
            child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        if (pinned := pinned_url(args.logdir, port=args.port, host=args.host)) is not None:
            print(f"your losses pinned first in the Time Series tab: {pinned}", flush=True)
        return run_board(cmd)
    if args.command == "report":
        if extra:
            print(f"lightning-viz report: unknown arguments {extra}", file=sys.stderr)
            return 2
        from lightning_viz.report import write_reports

        def warn(message: str) -> None:
            print(f"lightning-viz report: {message}", file=sys.stderr)

        try:
            paths = write_reports(args.logdir, args.output, on_problem=warn)
        except FileNotFoundError as exc:
            warn(str(exc))
            return 2
        for path in paths:
            print(path)
        if not paths:
            warn("no page could be written.")
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
