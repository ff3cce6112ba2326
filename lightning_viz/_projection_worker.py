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
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

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


def run_job(line: str) -> None:
    import numpy as np

    features_path, output, method, seed, n_neighbors, tsv = line.split("\t")
    started = time.perf_counter()
    try:
        features = np.load(features_path, allow_pickle=False)
        if tsv != "-":  # the projector's tensor file: formatting text is slow, so it is written here too
            np.savetxt(tsv + ".tmp", features, delimiter="\t", fmt="%.5g")
            os.replace(tsv + ".tmp", tsv)
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


if __name__ == "__main__":
    main()
