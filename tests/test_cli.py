"""The `lightning-viz` command."""

from __future__ import annotations

import subprocess
import sys

from lightning_viz import cli


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
