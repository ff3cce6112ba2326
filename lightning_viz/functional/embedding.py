"""Feature-space quality: k-NN accuracy, silhouette, nearest neighbours, 2-D projections and their alignment.

Distances are cosine distances on the features (1 - cosine similarity), the usual choice for penultimate-layer codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lightning_viz._hooks import capture

# The projections live in the worker module (numpy-only imports, so the child process starts fast); they are
# re-exported here for direct use.
from lightning_viz._projection_worker import PROJECTIONS as PROJECTIONS
from lightning_viz._projection_worker import pca_2d as pca_2d
from lightning_viz._projection_worker import project as project


def _normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.detach().float(), dim=1)


def pooled_codes(output: torch.Tensor) -> torch.Tensor:
    """A layer's output as one code per sample: detached, float, spatial dimensions average-pooled.

    Shape:
        output: (N, C) or (N, C, ...). Returns (N, C).
    """
    code = output.detach().float()
    return code.flatten(2).mean(-1) if code.ndim > 2 else code


def layer_codes(
    model: nn.Module, module: nn.Module, images: torch.Tensor, *, use_input: bool = False, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes of ``images`` at ``module`` (its input or output, see :func:`pooled_codes`) and the model's logits.

    Args:
        model: the network (in the mode the caller chose); module: the layer whose output (or input) is the code.
        images: the model's inputs; use_input: the code is the layer's input (a head's features), not its output.
        batch_size: images per forward pass.

    Returns:
        (codes, logits): codes on the CPU; logits (the model's 2-D output, float, CPU) or ``None`` when the model's
        output is not a 2-D tensor.

    Shape:
        images: (N, ...). Returns (N, D) and (N, K) or None.
    """
    device = next(model.parameters(), torch.zeros(())).device
    codes, logits = [], []
    for start in range(0, len(images), batch_size):
        with capture([module], what="input" if use_input else "output", keep="last") as captured:
            out = model(images[start : start + batch_size].to(device))
        if not captured[0]:
            raise TypeError("the feature layer's output must be a tensor; it returned none (or was not called).")
        codes.append(pooled_codes(captured[0][-1]).cpu())
        logits.append(out.detach().float().cpu() if isinstance(out, torch.Tensor) and out.ndim == 2 else None)
    whole = torch.cat(logits) if all(x is not None for x in logits) else None  # type: ignore[arg-type]
    return torch.cat(codes), whole


def matching_rows(rows: torch.Tensor, wanted: torch.Tensor) -> list[int | None]:
    """The position in ``rows`` of each of ``wanted`` (exactly equal values), or ``None`` where there is none.

    Shape:
        rows: (N, ...); wanted: (M, ...) of the same trailing shape. Returns M positions.
    """
    if rows.shape[1:] != wanted.shape[1:] or not len(rows):
        return [None] * len(wanted)
    flat = rows.reshape(len(rows), -1)
    found: list[int | None] = []
    for row in wanted.reshape(len(wanted), -1).to(flat.dtype):
        # a few values first narrow the candidates down: the whole rows are compared only for those
        candidates = (flat[:, :16] == row[:16]).all(dim=1).nonzero().flatten()
        hits = [int(i) for i in candidates if bool((flat[i] == row).all())]
        found.append(hits[0] if hits else None)
    return found


def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distances. Shape: (N, D), (M, D) -> (N, M)."""
    return (1.0 - _normalise(a) @ _normalise(b).T).clamp_min(0)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (majority vote of the k nearest others, ties to the nearest's class).

    Shape:
        features: (N, D); labels: (N,). Returns the share of points whose vote equals their label.
    """
    n = len(features)
    if n < 2:
        raise ValueError("k-NN accuracy needs at least 2 points.")
    k = min(k, n - 1)
    dist = cosine_distances(features, features)
    dist.fill_diagonal_(float("inf"))
    order = dist.topk(k, largest=False).indices  # (N, k), nearest first
    neighbour_labels = labels[order]
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(n, num_classes).scatter_add_(1, neighbour_labels, torch.ones(n, k))
    # break ties in favour of the nearest neighbour's class
    votes.scatter_add_(1, neighbour_labels[:, :1], torch.full((n, 1), 0.5))
    return float((votes.argmax(1) == labels).float().mean())


def silhouette(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient with cosine distance, in [-1, 1]: near 1 = tight, well-separated classes."""
    dist = cosine_distances(features, features)
    classes = labels.unique()
    if len(classes) < 2:
        return float("nan")
    onehot = (labels.view(-1, 1) == classes.view(1, -1)).float()  # (N, C)
    sums = dist @ onehot  # total distance to each class
    counts = onehot.sum(0)
    own = onehot.bool()
    own_counts = (counts.view(1, -1).expand_as(sums)[own] - 1).clamp_min(1)
    a = sums[own] / own_counts
    mean_other = sums / counts.view(1, -1)
    mean_other[own] = float("inf")
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    singleton = counts.view(1, -1).expand_as(sums)[own] <= 1
    s[singleton] = 0.0
    return float(s.mean())


def nearest_neighbours(query: torch.Tensor, features: torch.Tensor, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``features`` rows of each query, skipping exact duplicates of the query (distance ~0).

    Returns:
        (indices, distances), each (Q, k), nearest first.
    """
    dist = cosine_distances(query, features)
    dist[dist < 1e-6] = float("inf")
    k = min(k, features.shape[0])
    result = dist.topk(k, largest=False)
    return result.indices, result.values


def pca_map(features: torch.Tensor) -> np.ndarray:
    """The first two principal components, computed with torch (its thread setting, no BLAS pool of numpy's): the
    in-process twin of the child's ``pca`` map (the same up to each axis' sign, which :func:`procrustes_align` fixes).

    Shape:
        features: (N, D). Returns (N, 2) float32.
    """
    centred = features.detach().double()
    centred = centred - centred.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).float().numpy()


def procrustes_align(coords: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate/reflect, scale and shift ``coords`` to best match ``reference`` (same points, same order).

    Successive maps of the same points then don't flip or spin between epochs; their shape is unchanged.
    """
    if coords.shape != reference.shape:
        raise ValueError(f"shapes differ: {coords.shape} vs {reference.shape}.")
    mu_c, mu_r = coords.mean(0), reference.mean(0)
    c, r = coords - mu_c, reference - mu_r
    u, s, vt = np.linalg.svd(c.T @ r)
    rotation = u @ vt
    scale = s.sum() / max((c**2).sum(), 1e-12)
    return (c @ rotation * scale + mu_r).astype(np.float32)


def subset_indices(size: int, count: int, seed: int) -> list[int]:
    """A fixed, seeded choice of ``min(count, size)`` dataset indices, in increasing order."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(size, generator=gen)[: min(count, size)]
    return sorted(chosen.tolist())


def labels_or_none(labels: Sequence[int | None]) -> torch.Tensor | None:
    return None if any(lb is None for lb in labels) else torch.tensor(list(labels), dtype=torch.long)


def finite_quality(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[float | None, float | None, int]:
    """k-NN accuracy and silhouette over the rows whose code is finite (NaN/Inf codes are missing values).

    Shape:
        features: (N, D); labels: (N,). Returns (k-NN accuracy or None, silhouette or None, number of rows left out);
        ``None`` when fewer than two rows are finite (all-NaN codes have no quality, not a quality of 0.66).
    """
    finite = torch.isfinite(features).all(dim=1)
    left_out = int((~finite).sum())
    if len(features) - left_out < 2:
        return None, None, left_out
    features, labels = features[finite], labels[finite]
    return knn_accuracy(features, labels, k), silhouette(features, labels), left_out
