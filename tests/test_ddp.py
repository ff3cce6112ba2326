"""DDP on CPU: 2 processes (gloo, ddp_spawn), the full suite (SyncBatchNorm needs GPUs: see ddp_job.py)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from conftest import Events

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ddp_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "ddp_job.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0 and "DDP_DONE" in out.stdout, out.stderr[-4000:]
    # only global rank zero wrote event files: one run directory, one event file
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    events = Events(str(tmp_path / "ddp" / "version_0"))
    # channel 3 fires only on rank 1's half of the data: after the counters are summed across ranks it is alive;
    # judged on rank 0's data alone it would be dead
    assert events.scalars("activations/dead_count/model.relu")[-1][1] == 0
    assert events.image_steps("saliency/grid")
    assert "diagnosis/findings/text_summary" in events.tags["tensors"]
