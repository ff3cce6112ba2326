"""DDP on CPU: 2 processes (gloo, ddp_spawn), the full suite (SyncBatchNorm needs GPUs: see ddp_job.py)."""

from __future__ import annotations

import glob
import os
import random
import signal
import socket
import subprocess
import sys

from conftest import Events

HERE = os.path.dirname(os.path.abspath(__file__))
#: The whole job takes about 10 s on an idle 2-core machine; this bound leaves room for a heavily loaded one.
JOB_TIMEOUT_S = 540


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_loopback_port() -> int:
    """A port free on 127.0.0.1, chosen below the ephemeral range.

    Lightning's default (bind port 0, close, reuse the number later) picks from the ephemeral range, which every
    outgoing connection on the machine draws from too: between the choice and rank 0's bind, seconds on a loaded
    machine, another process may take it. Below the range only an explicit listener can.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(20000, min(low, 32768)))
    random.Random().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(logdir: str) -> tuple[int, str, str]:
    """Run ddp_job.py in its own process group; on time-out the whole group (ranks included) is killed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_loopback_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONFAULTHANDLER": "1",  # a rank that crashes in C++ still says where
    }
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ddp_job.py"), logdir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[test_ddp: killed after {JOB_TIMEOUT_S} s]"
        return -9, stdout, stderr
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # no rank outlives the test
        except ProcessLookupError:
            pass
    return proc.returncode, stdout, stderr


def test_ddp_two_processes(tmp_path):
    returncode, stdout, stderr = run_job(str(tmp_path))
    assert returncode == 0 and "DDP_DONE" in stdout, (
        f"ddp_job.py exited with {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )
    # only global rank zero wrote event files: one run directory, one event file
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    events = Events(str(tmp_path / "ddp" / "version_0"))
    # channel 3 fires only on rank 1's half of the data: after the counters are summed across ranks it is alive;
    # judged on rank 0's data alone it would be dead
    assert events.scalars("activations/dead_count/model.relu")[-1][1] == 0
    assert events.image_steps("saliency/grid")
    assert "diagnosis/findings/text_summary" in events.tags["tensors"]
