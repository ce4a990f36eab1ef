"""`baseline`: wordproto, the no-training floor every model must beat.

A word's prototype is the mean centred image vector of the train rows whose cleaned query holds
the word (an image vector = the mean of its box features; centred by the train mean). A query is
the mean of its words' prototypes; a candidate's score is the cosine between the query vector and
its centred image vector.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from . import tracking
from .config import BaselineParams, Params, flatten, load_params, to_dict
from .evaluate import eval_stores, flat_metrics, model_report
from .metrics import write_metrics
from .store import FeatureStore
from .text import words
from .tsv import FEATURE_DIM


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
        for start in tqdm(range(0, len(train), step), desc="wordproto fit", disable=not progress):
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


def run(params: Params, progress: bool = True) -> dict:
    name = params.baseline.name
    train = FeatureStore.open(Path(params.data.features) / "train")
    stores = eval_stores(params)
    run_params = flatten({"baseline": to_dict(params.baseline), "prepare": to_dict(params.prepare)})
    with tracking.start_run(tracking.run_name(name), stage="baseline", params=run_params,
                            experiment=params.tracking.experiment, tags={"model": name}) as run:
        model = WordPrototypes.fit(train, params.baseline, progress)
        out = Path(params.data.outputs) / name
        out.mkdir(parents=True, exist_ok=True)
        tables = {}
        for split, store in stores.items():
            tables[split] = model.score(store, params.baseline.chunk_rows)
            tables[split].to_parquet(out / f"{split}.parquet", index=False)
        report = model_report(tables, params, stores)
        mlflow.log_metrics(flat_metrics(report))
        mlflow.log_metric("vocab_size", len(model.vocab))
        report["mlflow_run_id"] = run.info.run_id
    write_metrics(params.data.metrics, name, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall baseline",
        description="Fit the wordproto baseline on features/train, write score tables "
        "outputs/wordproto/<split>.parquet for every evaluation split, log one MLflow run with its NDCG@5 "
        "and write metrics/wordproto.json.",
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run(load_params(args.params), progress=not args.no_progress)
    for split, values in report.items():
        if split != "mlflow_run_id":
            print(f"wordproto {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
