"""The `lightning-viz` command."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lightning_viz import cli, report


def test_board_command_keeps_all_images_and_binds_loopback():
    cmd = cli.board_command("runs/", port=7007)
    assert cmd[cmd.index("--logdir") + 1] == "runs/"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "7007"
    samples = dict(kv.split("=") for kv in cmd[cmd.index("--samples_per_plugin") + 1].split(","))
    assert int(samples["images"]) >= 10000 and int(samples["text"]) >= 10000
    assert "--bind_all" not in cmd


def test_board_missing_directory(tmp_path, capsys):
    assert cli.main(["board", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_board_flags_parse_with_tensorboards_own_parser(tmp_path):
    # TensorBoard validates its own flags before serving; --help after ours proves they parse
    cmd = cli.board_command(str(tmp_path))
    out = subprocess.run([*cmd, "--helpfull"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "samples_per_plugin" in out.stdout


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lightning_viz.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "board" in out.stdout


# ------------------------------------------------------------------------------------------------------ report
def _writer(path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def _add_summary(writer, value, step=0):
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer._get_file_writer().add_summary(Summary(value=[value]), step)


def _event_file(run_dir):
    (path,) = [p for p in os.listdir(run_dir) if p.startswith("events.out.tfevents.")]
    return os.path.join(run_dir, path)


def _good_run(run_dir, text):
    import torch

    w = _writer(run_dir)
    w.add_text("diagnosis/findings", text, 1)
    w.add_scalar("train_loss", 0.5, 1)
    w.add_image("filters/conv1", torch.rand(3, 4, 4), 1)
    w.close()


def test_page_names_are_distinct_and_deterministic():
    names = ["a/b", "a_b", "x y", "x_y", "x__y", "Run", "run", "plain", "healthy/version_0", "é", "ü", "z" * 300]
    pages = report.page_names(names)
    assert len({p.lower() for p in pages.values()}) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", p) for p in pages.values()), pages
    assert pages["plain"] == "plain" and pages["healthy/version_0"] == "healthy_version_0"  # no collision: kept
    assert pages["a/b"].startswith("a_b-") and pages["a_b"].startswith("a_b-")
    shuffled = list(reversed(names))
    assert report.page_names(shuffled) == pages
    # a run literally named like another's hashed page still gets its own
    crafted = report.page_names(["a/b", "a_b", pages["a/b"]])
    assert len({p.lower() for p in crafted.values()}) == 3


def test_report_runs_with_colliding_names_each_get_their_page(tmp_path):
    logdir = tmp_path / "logs"
    names = ["a/b", "a_b", "x y", "x_y", "Case", "case"]
    for i, name in enumerate(names):
        _good_run(logdir / name, f"findings of run number {i}")
    paths = report.write_reports(str(logdir), str(tmp_path / "out" / "report.html"))
    assert len(set(paths)) == len(names) and sorted(os.listdir(tmp_path / "out")) == sorted(
        os.path.basename(p) for p in paths
    )
    texts = [open(p, encoding="utf-8").read() for p in paths]
    for i in range(len(names)):
        assert sum(f"findings of run number {i}<" in t for t in texts) == 1
    assert paths == report.write_reports(str(logdir), str(tmp_path / "out" / "report.html"))  # same names again


def _bad_runs(logdir):
    """One good run beside runs that are broken in different ways; returns {run name: what its page must say}."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto

    _good_run(logdir / "good", "**No problems found**")
    _good_run(logdir / "truncated", "lost")
    path = _event_file(logdir / "truncated")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 7])
    os.makedirs(logdir / "garbage")
    open(logdir / "garbage" / "events.out.tfevents.1.host", "wb").write(bytes(range(256)) * 4)
    os.makedirs(logdir / "empty")
    open(logdir / "empty" / "events.out.tfevents.1.host", "wb").close()
    w = _writer(logdir / "numeric-scalar")
    w.add_scalar("diagnosis/findings", 3.0, 1, new_style=True)  # a float tensor under the findings tag
    w.close()
    w = _writer(logdir / "numeric-text")
    _add_summary(w, Summary.Value(tag="diagnosis/findings/text_summary", tensor=TensorProto(dtype=1, float_val=[2.5])))
    w.close()
    w = _writer(logdir / "bad-image")
    w.add_scalar("train_loss", 0.25, 1)
    image = Summary.Image(height=4, width=4, colorspace=3, encoded_image_string=b"\x89PNG not really")
    _add_summary(w, Summary.Value(tag="filters/conv1", image=image))
    w.close()
    return {
        "good": "No problems found",
        "truncated": "is truncated",
        "garbage": "is not a TensorBoard event file",
        "empty": "is empty",
        "numeric-scalar": "holds float32 values (3.0), not text",
        "numeric-text": "holds float32 values (2.5), not text",
        "bad-image": "image filters/conv1 could not be decoded",
    }


def test_report_bad_runs_never_cost_the_others_their_pages(tmp_path, capsys):
    logdir = tmp_path / "logs"
    expected = _bad_runs(logdir)
    assert cli.main(["report", str(logdir), "-o", str(tmp_path / "out" / "r.html")]) == 0
    out, err = capsys.readouterr()
    paths = out.split()
    assert len(paths) == len(expected)
    for name, says in expected.items():
        (path,) = [p for p in paths if p.endswith(f"-{name}.html")]
        page = open(path, encoding="utf-8").read()
        assert says in page, (name, page[:2000])
        if name != "good":
            assert "What could not be read" in page and f"{name}: " in err
    good = open(next(p for p in paths if p.endswith("-good.html")), encoding="utf-8").read()
    assert "What could not be read" not in good and "data:image/png;base64," in good and "train_loss" in good
    bad_image = open(next(p for p in paths if p.endswith("-bad-image.html")), encoding="utf-8").read()
    assert "<img" not in bad_image and "train_loss" in bad_image  # the readable part is still shown


def test_report_run_that_raises_gets_a_page_saying_so(tmp_path, monkeypatch):
    logdir = tmp_path / "logs"
    _good_run(logdir / "ok", "fine")
    _good_run(logdir / "odd", "fine too")
    real = report.read_run

    def read_run(path, name):
        if name == "odd":
            raise TypeError("unexpected tensor type DT_VARIANT")
        return real(path, name)

    monkeypatch.setattr(report, "read_run", read_run)
    problems = []
    paths = report.write_reports(str(logdir), str(tmp_path / "r.html"), on_problem=problems.append)
    assert len(paths) == 2
    odd = open(next(p for p in paths if p.endswith("-odd.html")), encoding="utf-8").read()
    assert "this run could not be read: TypeError: unexpected tensor type DT_VARIANT" in odd
    assert problems == ["odd: this run could not be read: TypeError: unexpected tensor type DT_VARIANT"]


def test_report_fails_only_when_no_page_could_be_written(tmp_path, capsys):
    logdir = tmp_path / "logs"
    _good_run(logdir / "one", "x")
    _good_run(logdir / "two", "y")
    os.makedirs(tmp_path / "out" / "r-one.html")  # a directory where the page should go: that write fails
    assert cli.main(["report", str(logdir), "-o", str(tmp_path / "out" / "r.html")]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "out" / "r-two.html")] and "r-one.html could not be written" in err
    os.remove(tmp_path / "out" / "r-two.html")
    os.makedirs(tmp_path / "out" / "r-two.html")
    assert cli.main(["report", str(logdir), "-o", str(tmp_path / "out" / "r.html")]) == 1
    assert "no page could be written" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- board
def _free_loopback_port():
    # below the ephemeral range, where no outgoing connection can take the port between our choice and the bind
    # (the DDP test picks its rendezvous port the same way)
    from test_ddp import free_loopback_port

    return free_loopback_port()


def _answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _descendants(pid):
    """Every process below ``pid`` (Linux /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                children = [int(c) for c in open(task).read().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find TensorBoard's processes")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_board_stopped_by_a_signal_leaves_no_tensorboard_behind(tmp_path, signame):
    children = []
    for _attempt in range(3):  # a port taken by someone else between our choice and TensorBoard's bind: another
        port = _free_loopback_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_viz.cli", "board", str(tmp_path), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a failing test can still kill everything it started
        )
        deadline = time.monotonic() + 180
        while not _answers(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if _answers(port) or proc.poll() is None:
            break
        output = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    try:
        assert _answers(port), f"TensorBoard never answered on 127.0.0.1:{port}: {locals().get('output', '')[-3000:]}"
        children = _descendants(proc.pid)
        assert children, "no TensorBoard child found"
        proc.send_signal(getattr(signal, signame))
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while (_answers(port) or any(map(_alive, children))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(port), "TensorBoard still answers after the board command exited"
        assert not [pid for pid in children if _alive(pid)], "a TensorBoard process outlived the board command"
    finally:
        for pid in [proc.pid, *children]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.mark.parametrize(
    "names, pinned",
    [
        (["train_loss", "val_loss", "val_acc", "activations/sparsity/relu", "diagnosis/train_loss"],
         ["train_loss", "val_loss", "val_acc"]),
        (["loss/train_step", "loss/train_epoch", "val/loss", "val/accuracy", "lr-SGD"],
         ["loss/train_epoch", "val/loss", "val/accuracy"]),
        (["filters/noise_score/conv1", "lightning_viz/seconds/filters"], []),
    ],
)  # fmt: skip
def test_board_prints_an_address_that_pins_your_own_losses_first(tmp_path, capsys, monkeypatch, names, pinned):
    import json
    import urllib.parse

    w = _writer(tmp_path / "run" / "version_0")
    for name in names:
        w.add_scalar(name, 0.5, 1)
    w.close()
    url = cli.pinned_url(str(tmp_path), port=6123)
    if not pinned:
        assert url is None  # nothing of yours logged yet: no address that pins nothing
    else:
        assert url.startswith("http://127.0.0.1:6123/?pinnedCards=") and url.endswith("#timeseries")
        cards = json.loads(urllib.parse.unquote(url.split("pinnedCards=")[1].split("#")[0]))
        assert cards == [{"plugin": "scalars", "tag": t} for t in pinned]
    monkeypatch.setattr(cli, "run_board", lambda cmd: 0)
    assert cli.main(["board", str(tmp_path), "--port", "6123"]) == 0
    printed = capsys.readouterr().out
    assert ("your losses pinned first in the Time Series tab: " + str(url) in printed) == bool(pinned)
