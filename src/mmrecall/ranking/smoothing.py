"""KNN ("LLE-like") smoothing of box features within a query's candidate pool (the solo team's inference trick).

Per query, the boxes of ALL its candidates form one pool. Every box r is replaced by

    w0 * r + w1 * nn1(r) + w2 * nn2(r) + ...      (default k = 2, weights 0.7 / 0.2 / 0.1)

where nn_i is its i-th nearest OTHER box of the pool (Euclidean, faiss exact search; the box itself
is excluded by index, so a duplicate box still counts as a neighbour). The weights sum to 1, so the
scale is kept. A pool with fewer than k + 1 boxes uses the neighbours it has and gives the missing
neighbours' weight back to the box itself. Applied at inference only, to any member.

    store = smoothed_store(FeatureStore.open("features/valid"), params.smooth)   # same rows, new boxes

The `smooth` stage re-scores members on every evaluation split with smoothed boxes and writes
outputs/smoothed/<member>/ next to the plain outputs/<member>/, so NDCG@5 can be compared on and off;
the registered ranker applies it to a request when the re-ranker was fitted on smoothed members.
"""

from __future__ import annotations

import faiss
import numpy as np

from ..config import ParamsError, SmoothParams
from ..data.store import FeatureStore


def check_weights(k: int, weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    if k < 0 or len(w) != k + 1:
        raise ParamsError(f"params smooth: need k + 1 = {k + 1} weights (self first), got {list(weights)}")
    if abs(float(w.sum()) - 1.0) > 1e-4:
        raise ParamsError(f"params smooth: weights {list(weights)} must sum to 1 (to keep the feature scale)")
    return w


def smooth_pool(x: np.ndarray, k: int = 2, weights=(0.7, 0.2, 0.1)) -> np.ndarray:
    """(m, d) boxes of one pool -> (m, d) float32 smoothed boxes."""
    w = check_weights(k, list(weights))
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = len(x)
    n_nb = min(k, m - 1)
    if n_nb <= 0:
        return x.copy()
    _, idx = faiss.knn(x, x, n_nb + 1)  # (m, n_nb + 1), nearest first, usually self at 0
    # Drop the box itself by index (a duplicate box may come first); keep the first n_nb others.
    not_self = idx != np.arange(m)[:, None]
    first = np.argsort(~not_self, axis=1, kind="stable")[:, :n_nb]
    others = np.take_along_axis(idx, first, axis=1)
    out = (w[0] + w[n_nb + 1 :].sum()) * x  # missing neighbours' weight goes back to the box
    for j in range(n_nb):
        out += w[j + 1] * x[others[:, j]]
    return out


def smooth_features(
    features: np.ndarray, offsets: np.ndarray, counts: np.ndarray, groups: np.ndarray, k: int = 2, weights=(0.7, 0.2, 0.1)
) -> np.ndarray:
    """Smoothed copy (float16) of a store's box features; rows with the same `groups` value share a pool.

    features (total_boxes, d); row i owns boxes [offsets[i], offsets[i] + counts[i]).
    """
    out = np.array(features, dtype=np.float16)  # a writable copy; boxes owned by no row stay as they are
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows) == 0:
            continue
        box_idx = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets[rows], counts[rows])])
        if len(box_idx):
            out[box_idx] = smooth_pool(features[box_idx], k, weights).astype(np.float16)
    return out


def smoothed_store(store: FeatureStore, params: SmoothParams) -> FeatureStore:
    """The same store (rows, boxes, labels, answers) whose `features` are smoothed within each query."""
    rows = store.rows
    feats = smooth_features(
        store.features, rows.offset.to_numpy(), rows.n_kept.to_numpy(), rows.query_id.to_numpy(), params.k, params.weights
    )
    out = FeatureStore(store.root)
    out.__dict__.update(store.__dict__)  # what the source holds already (all of it for an in-memory store)
    out.__dict__.update(rows=rows, features=feats)  # cached_property values: read as usual, never re-mapped
    return out
