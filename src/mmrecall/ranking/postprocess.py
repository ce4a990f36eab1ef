"""Leak-aware post-processing of score tables (applied last, switchable in params).

- `frequency_filter` (1st place): count how many evaluation rows (valid + testA + testB)
  hold each product; per query keep the candidates whose count is <= thd, starting at thd = 1 and
  raising it until at least 5 remain; candidates above the threshold are dropped, not demoted.
- `exclusivity` (2nd place): a product that is a candidate of several queries either
  belongs to its argmax query only (top1 - top2 >= threshold) or is removed from all of them;
  a query left with fewer than 5 candidates falls back to its unfiltered list.

Both return a score table of the kept rows (with their index), so `metrics.rank` turns either into a ranking;
`demoted` turns that into scores for every row, as the registered ranker outputs them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..config import PostprocessParams
from .metrics import K


def candidate_counts(product_ids: Iterable[np.ndarray]) -> pd.Series:
    """Number of evaluation rows holding each product, over all the given files' product columns."""
    return pd.Series(np.concatenate([np.asarray(p, dtype=np.int64) for p in product_ids])).value_counts()


def frequency_filter(scores: pd.DataFrame, counts: pd.Series, k: int = K) -> pd.DataFrame:
    cnt = scores.product_id.map(counts).fillna(1).to_numpy()
    keep = np.zeros(len(scores), dtype=bool)
    for _, idx in scores.groupby("query_id", sort=False).indices.items():
        c = cnt[idx]
        thd = 1
        while (c <= thd).sum() < min(k, len(idx)):
            thd += 1
        keep[idx[c <= thd]] = True
    return scores[keep]


def exclusivity_filter(scores: pd.DataFrame, threshold: float = 0.92, k: int = K) -> pd.DataFrame:
    score = scores.score.to_numpy()
    keep = np.ones(len(scores), dtype=bool)
    for _, idx in scores.groupby("product_id", sort=False).indices.items():
        if len(idx) < 2:
            continue
        s = score[idx]
        order = np.argsort(-s, kind="stable")
        keep[idx] = False
        if s[order[0]] - s[order[1]] >= threshold:
            keep[idx[order[0]]] = True
    # A query left with fewer than k candidates falls back to its unfiltered list.
    kept_per_query = pd.Series(keep).groupby(scores.query_id.to_numpy()).sum()
    fallback = scores.query_id.isin(kept_per_query.index[kept_per_query < k]).to_numpy()
    return scores[keep | fallback]


def apply(scores: pd.DataFrame, params: PostprocessParams, counts: pd.Series | None) -> pd.DataFrame:
    """The switched-on post-processing, exclusivity first, frequency filter last."""
    out = scores
    if params.exclusivity:
        out = exclusivity_filter(out, params.exclusivity_threshold)
    if params.frequency_filter:
        if counts is None:
            raise ValueError("frequency_filter needs candidate counts over the evaluation files")
        out = frequency_filter(out, counts)
    return out


def demoted(scores: pd.DataFrame, kept: pd.DataFrame) -> np.ndarray:
    """`scores.score`, with each row that the post-processing dropped (its index is not in `kept`, a filter's
    output) moved below every kept row of its query, in its own order: the scores rank as the kept table does,
    and the dropped rows still follow."""
    score = scores.score.to_numpy(np.float64)
    dropped = ~scores.index.isin(kept.index)
    by_query = pd.Series(score).groupby(scores.query_id.to_numpy())
    spread = (by_query.transform("max") - by_query.transform("min")).to_numpy()
    return np.where(dropped, score - spread - 1.0, score)
