"""Compute 2-D projections in a child process, off the training path.

    python .../lightning_viz/_projection_worker.py        # then, one tab-separated job per line on stdin:
    FEATURES.npy OUTPUT.npy METHOD SEED N_NEIGHBORS TENSORS.tsv   (or - for no projector tensor file)

The file runs as a script, not with ``-m``, and imports only numpy (and umap-learn or scikit-learn when asked), so
the child starts in a fraction of a second without importing torch, Lightning or this package.

The training process hands over ``.npy`` files of features and gets ``.npy`` files of coordinates back (plain
arrays, ``allow_pickle=False`` both ways; each output appears atomically, with ``OUTPUT.npy.json`` holding the
seconds the projection took). The child lives for the whole fit, so numba compiles UMAP once, not once per epoch.
Running here, not in a thread of the training process, keeps numba's OpenMP threads away from forked DataLoader
workers (umap-learn #707), and a ``subprocess`` (not multiprocessing's spawn) never re-imports the user's
``__main__`` script. An empty line or end of input ends the child.

:class:`ProjectionClient` is the training process's end of the same protocol (it needs only the standard library and
numpy too): it starts the child on first use, hands it jobs, collects finished ones without blocking, and stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PROJECTIONS = ("umap", "tsne", "pca")


def pca_2d(features):
    """The first two principal components. (N, D) -> (N, 2)."""
    import numpy as np

    centred = features - features.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def project(features, method: str, seed: int = 0, n_neighbors: int = 15):
    """A 2-D map of the features: ``umap`` (umap-learn), ``tsne`` (scikit-learn) or ``pca``. Seeded, reproducible."""
    import numpy as np

    features = np.asarray(features, dtype=np.float32)
    if method == "pca":
        return pca_2d(features).astype(np.float32)
    if method == "umap":
        import umap

        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=min(n_neighbors, len(features) - 1),
            metric="cosine",
            random_state=seed,
            init="spectral" if len(features) > 10 else "random",
        )
        return reducer.fit_transform(features).astype(np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
        tsne = TSNE(2, metric="cosine", init="pca", random_state=seed, perplexity=perplexity)
        return tsne.fit_transform(features).astype(np.float32)
    raise ValueError(f"unknown projection {method!r}; choose from {list(PROJECTIONS)}.")


def write_tensor_tsv(path: str, features) -> None:
    """The projector's tensor file: one tab-separated row per sample, written atomically. Shape: (N, D)."""
    import numpy as np

    np.savetxt(path + ".tmp", np.asarray(features), delimiter="\t", fmt="%.5g")
    os.replace(path + ".tmp", path)


def run_job(line: str) -> None:
    import numpy as np

    features_path, output, method, seed, n_neighbors, tsv = line.split("\t")
    started = time.perf_counter()
    try:
        features = np.load(features_path, allow_pickle=False)
        if tsv != "-":  # the projector's tensor file: formatting text is slow, so it is written here too
            write_tensor_tsv(tsv, features)
        coords = project(features, method, seed=int(seed), n_neighbors=int(n_neighbors))
    except Exception:
        with open(output + ".error", "w") as f:
            f.write(traceback.format_exc()[-3000:])
        return
    with open(output + ".json", "w") as f:
        json.dump({"seconds": time.perf_counter() - started}, f)
    tmp = output + ".tmp.npy"
    np.save(tmp, coords, allow_pickle=False)
    os.replace(tmp, output)


def main() -> None:
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            break
        run_job(line)


@dataclass
class _Job:
    workdir: str
    context: Any

    @property
    def output(self) -> str:
        return os.path.join(self.workdir, "coords.npy")

    @property
    def finished(self) -> bool:
        return os.path.exists(self.output) or os.path.exists(self.output + ".error")


@dataclass(frozen=True)
class Projection:
    """A finished job: the 2-D coordinates (``None`` with an ``error``), and the ``context`` it was submitted with."""

    context: Any
    coords: Any  #: (N, 2) float32 numpy array, or None
    seconds: float = 0.0
    error: str | None = None


class ProjectionClient:
    """One child per fit, started on first use, working through its jobs in order (numba compiles UMAP once).

    :meth:`submit` never blocks; :meth:`finished` hands back the jobs that are done, in order, without blocking
    (``wait=True`` waits for all); :meth:`close` ends the child (``kill=True`` when the run is failing), reaps it and
    removes the temporary directory. A child that dies fails its outstanding jobs; the next job starts a new one.
    """

    def __init__(self, method: str, seed: int = 0, n_neighbors: int = 15) -> None:
        self.method = method
        self.seed = seed
        self.n_neighbors = n_neighbors
        self._jobs: list[_Job] = []
        self._count = 0
        self._child: subprocess.Popen | None = None
        self._stderr: Any = None
        #: temporary directory of the jobs' files (and the child's stderr), or None
        self.workdir: str | None = None

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def running(self) -> bool:
        return self._child is not None

    def _alive(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def submit(self, features: Any, context: Any = None, tensor_file: str | None = None) -> None:
        """Queue a projection of ``features`` (N, D); the child also writes ``tensor_file`` (projector TSV) if given."""
        import numpy as np

        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="lightning_viz_")
        job = _Job(os.path.join(self.workdir, f"{self._count:08d}"), context)
        self._count += 1
        os.makedirs(job.workdir, exist_ok=True)
        features_path = os.path.join(job.workdir, "features.npy")
        np.save(features_path, np.asarray(features, dtype=np.float32), allow_pickle=False)
        self._jobs.append(job)
        if self._child is None:
            self._stderr = open(os.path.join(self.workdir, "worker_stderr.txt"), "w")
            self._child = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                text=True,
            )
        fields = (features_path, job.output, self.method, self.seed, self.n_neighbors, tensor_file or "-")
        assert self._child.stdin is not None
        self._child.stdin.write("\t".join(str(f) for f in fields) + "\n")
        self._child.stdin.flush()

    def finished(self, wait: bool = False) -> Iterator[Projection]:
        """The finished jobs, oldest first; stops at the first one still running unless ``wait``."""
        while self._jobs:
            job = self._jobs[0]
            while wait and not job.finished and self._alive():
                time.sleep(0.05)
            if not job.finished and self._alive():
                return
            self._jobs.pop(0)
            yield self._result(job)

    def _result(self, job: _Job) -> Projection:
        import numpy as np

        try:
            if os.path.exists(job.output + ".error"):
                with open(job.output + ".error") as f:
                    return Projection(
                        job.context, None, error=f"the {self.method} projection failed: {f.read()[-1500:]}"
                    )
            if not os.path.exists(job.output):
                code = self._child.returncode if self._child is not None else None
                self._forget_child()
                return Projection(
                    job.context,
                    None,
                    error=f"the {self.method} worker process exited with {code}: {self._stderr_tail()}",
                )
            coords = np.load(job.output, allow_pickle=False)
            with open(job.output + ".json") as f:
                seconds = json.load(f)["seconds"]
            return Projection(job.context, coords, seconds)
        finally:
            shutil.rmtree(job.workdir, ignore_errors=True)

    def _stderr_tail(self) -> str:
        path = os.path.join(self.workdir or "", "worker_stderr.txt")
        if self.workdir is None or not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()[-1500:]

    def _forget_child(self, kill: bool = False) -> None:
        child, self._child = self._child, None
        if child is not None:
            try:
                if not kill:
                    assert child.stdin is not None
                    child.stdin.close()  # end of input: the child exits
                    child.wait(timeout=30)
            except Exception:
                kill = True
            if kill:
                child.kill()
            child.wait()  # reaped: no zombie
            if child.stdin is not None and not child.stdin.closed:
                try:
                    child.stdin.close()
                except OSError:
                    pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self, kill: bool = False) -> None:
        """Drop outstanding jobs, stop the child (``kill`` when the run is failing) and remove the temporary files."""
        self._jobs.clear()
        self._forget_child(kill=kill)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


if __name__ == "__main__":
    main()
