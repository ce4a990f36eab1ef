"""wordproto: the no-training floor every model must beat (`mmrecall baseline` fits and scores it).

A word's prototype is the mean centred image vector of the train rows whose cleaned query holds
the word (an image vector = the mean of its box features; centred by the train mean). A query is
the mean of its words' prototypes; a candidate's score is the cosine between the query vector and
its centred image vector.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ..config import BaselineParams
from ..console import show_bars
from ..data.store import FeatureStore
from ..data.text import words
from ..data.tsv import FEATURE_DIM


class WordPrototypes:
    def __init__(self, vocab: dict[str, int], prototypes: np.ndarray, mean: np.ndarray):
        self.vocab, self.prototypes, self.mean = vocab, prototypes, mean

    @classmethod
    def fit(cls, train: FeatureStore, params: BaselineParams, progress: bool = True) -> "WordPrototypes":
        row_words = [sorted(set(words(q))) for q in train.rows.query_clean]
        freq = Counter(w for ws in row_words for w in ws)
        vocab = {w: i for i, w in enumerate(sorted(w for w, c in freq.items() if c >= params.min_word_count))}
        sums = np.zeros((len(vocab), FEATURE_DIM), np.float64)
        total = np.zeros(FEATURE_DIM, np.float64)
        step = params.chunk_rows
        for start in tqdm(range(0, len(train), step), desc="wordproto fit", disable=not show_bars(progress)):
            stop = min(start + step, len(train))
            images = train.mean_features(start, stop)  # (n, 2048)
            total += images.sum(0)
            cols = [(vocab[w], j) for j, ws in enumerate(row_words[start:stop]) for w in ws if w in vocab]
            if cols:
                r, c = zip(*cols)
                incidence = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(vocab), stop - start))
                sums += incidence @ images
        mean = total / max(len(train), 1)
        counts = np.array([freq[w] for w in vocab], np.float64)[:, None]
        prototypes = (sums / np.maximum(counts, 1) - mean).astype(np.float32)  # mean of centred vectors
        return cls(vocab, prototypes, mean.astype(np.float32))

    def query_vector(self, query: str) -> np.ndarray:
        ids = [self.vocab[w] for w in set(words(query)) if w in self.vocab]
        return self.prototypes[ids].mean(0) if ids else np.zeros(FEATURE_DIM, np.float32)

    def score(self, store: FeatureStore, chunk_rows: int = 4096) -> pd.DataFrame:
        rows = store.rows
        qvecs = {q: self.query_vector(text) for q, text in rows.groupby("query_id").query_clean.first().items()}
        scores = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), chunk_rows):
            stop = min(start + chunk_rows, len(rows))
            images = store.mean_features(start, stop) - self.mean
            queries = np.stack([qvecs[q] for q in rows.query_id.iloc[start:stop]])
            num = (images * queries).sum(1)
            den = np.linalg.norm(images, axis=1) * np.linalg.norm(queries, axis=1) + 1e-8
            scores[start:stop] = num / den
        return pd.DataFrame({"query_id": rows.query_id, "product_id": rows.product_id, "score": scores})
