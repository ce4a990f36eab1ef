"""Leak-aware post-processing of score tables (applied last, switchable in params).

- `frequency_filter` (1st place): count how many evaluation rows (valid + testA + testB)
  hold each product; per query keep the candidates whose count is <= thd, starting at thd = 1 and
  raising it until at least 5 remain; candidates above the threshold are dropped, not demoted.
- `exclusivity` (2nd place): a product that is a candidate of several queries either
  belongs to its argmax query only (top1 - top2 >= threshold) or is removed from all of them;
  a query left with fewer than 5 candidates falls back to its unfiltered list.

Both return a score table of the kept rows, so `metrics.rank` turns either into a ranking.
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
    df = scores.reset_index(drop=True)
    keep = np.ones(len(df), dtype=bool)
    for _, idx in df.groupby("product_id", sort=False).indices.items():
        if len(idx) < 2:
            continue
        s = df.score.to_numpy()[idx]
        order = np.argsort(-s, kind="stable")
        keep[idx] = False
        if s[order[0]] - s[order[1]] >= threshold:
            keep[idx[order[0]]] = True
    kept = df[keep]
    # A query left with fewer than k candidates falls back to its unfiltered list.
    short = kept.groupby("query_id").size().reindex(df.query_id.unique(), fill_value=0) < k
    fallback = set(short[short].index)
    return pd.concat([kept[~kept.query_id.isin(fallback)], df[df.query_id.isin(fallback)]])


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
