"""All metric code: the official NDCG@5 of the competition, rankings, submissions and score tables.

- Relevance is binary; DCG = sum_i rel_i / log2(i + 1) over the 5 submitted ids;
  IDCG = the DCG of min(|answers|, 5) hits; the score is the MEAN over the reference queries.
- A reference query missing from a submission is an error, as in the official scorer.
- A submission is `query-id,product1,...,product5`: 5 distinct all-digit ids per query.
- A score table has the columns (query_id, product_id, score), with or without a header, tab- or
  comma-separated (the peer files in ../shared/kddcup2020 are tab-separated without header), or parquet.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MissingInputError, UserError

K = 5
METRIC = "ndcg_at_5"  # the one metric key (MLflow rejects "ndcg@5")
SUBMISSION_HEADER = ["query-id", "product1", "product2", "product3", "product4", "product5"]
_DISCOUNT = [1.0 / math.log2(i + 2) for i in range(K)]


class SubmissionError(UserError, ValueError):
    """A submission or score table that the official scorer would reject."""


def ndcg_at_5_query(ranked: list[int], answers: set[int]) -> float:
    """NDCG@5 of one ranked list (best first) against its answer set."""
    dcg = sum(_DISCOUNT[i] for i, pid in enumerate(ranked[:K]) if pid in answers)
    idcg = sum(_DISCOUNT[: min(len(answers), K)])
    return dcg / idcg if idcg > 0 else 0.0


def ndcg_at_5(rankings: Mapping[int, list[int]], answers: Mapping[int, set[int]], strict: bool = True) -> float:
    """Mean NDCG@5 over the reference queries. A query missing from `rankings` is an error when `strict` (the
    official scorer's rule for a submission); otherwise it counts 0, as a line of products that are not its
    candidates would (a score table has no row of a query whose rows `prepare` all rejected)."""
    missing = [q for q in answers if q not in rankings]
    if missing and strict:
        raise SubmissionError(f"{len(missing)} reference queries have no ranking, e.g. {sorted(missing)[:5]}")
    if not answers:
        raise SubmissionError("no reference queries")
    return float(np.mean([ndcg_at_5_query(rankings.get(q, []), answers[q]) for q in answers]))


def rank(scores: pd.DataFrame, k: int | None = K) -> dict[int, list[int]]:
    """Score table -> {query_id: product ids by descending score (ties: table order)}, top k."""
    df = scores.sort_values(["query_id", "score"], ascending=[True, False], kind="stable")
    out = {int(q): g.product_id.astype(np.int64).tolist() for q, g in df.groupby("query_id", sort=False)}
    return {q: v[:k] for q, v in out.items()} if k else out


def evaluate_scores(scores: pd.DataFrame, answers: Mapping[int, set[int]]) -> float:
    """NDCG@5 of a score table's ranking; a reference query without a row counts 0 (`prepare` logs such queries)."""
    return ndcg_at_5(rank(scores), answers, strict=False)


# --- files ---------------------------------------------------------------------------------------


def read_score_table(path: str | Path) -> pd.DataFrame:
    """(query_id, product_id, score) from parquet, or from a TSV/CSV with or without header."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        with open(path) as f:
            first = f.readline()
        if not first.strip():
            raise SubmissionError(f"{path}: file is empty")
        sep = "\t" if "\t" in first else ","
        has_header = not first.split(sep)[0].strip().lstrip("-").isdigit()
        df = pd.read_csv(path, sep=sep, header=0 if has_header else None, quoting=csv.QUOTE_NONE)
        if not has_header:
            if df.shape[1] != 3:
                raise SubmissionError(f"{path}: expected 3 columns (query_id, product_id, score), found {df.shape[1]}")
            df.columns = ["query_id", "product_id", "score"]
    missing = {"query_id", "product_id", "score"} - set(df.columns)
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {sorted(missing)}")
    df = df[["query_id", "product_id", "score"]]
    if df.score.isna().any():
        line = int(df.index[df.score.isna()][0]) + 2
        raise SubmissionError(f"{path}: empty or non-numeric score near line {line}")
    repeated = df.duplicated(["query_id", "product_id"])
    if repeated.any():
        first = df[repeated].iloc[0]
        raise SubmissionError(f"{path}: query {int(first.query_id)} scores product {int(first.product_id)} twice "
                              f"(near line {int(df.index[repeated][0]) + 2})")
    return df.astype({"query_id": np.int64, "product_id": np.int64, "score": np.float64})


def read_submission(path: str | Path) -> dict[int, list[int]]:
    """submission.csv -> {query_id: [5 product ids]}, with the official scorer's checks."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    out: dict[int, list[int]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = [x.strip() for x in line.strip().split(",")]
            if not fields[0].isdigit():
                continue  # the header, or any line that is not a query (the scorer skips them too)
            ids = fields[1:]
            if len(ids) != K or not all(x.isdigit() for x in ids):
                raise SubmissionError(f"{path}:{lineno}: need exactly {K} all-digit product ids, got {ids}")
            if len(set(ids)) != K:
                raise SubmissionError(f"{path}:{lineno}: product ids must be distinct, got {ids}")
            q = int(fields[0])
            if q in out:
                raise SubmissionError(f"{path}:{lineno}: query {q} appears twice")
            out[q] = [int(x) for x in ids]
    return out


def validate_rankings(rankings: Mapping[int, list[int]], queries: set[int], where: str = "submission") -> None:
    """Every query present, each with K distinct ids."""
    missing = sorted(queries - set(rankings))
    if missing:
        raise SubmissionError(f"{where}: {len(missing)} queries missing, e.g. {missing[:5]}")
    for q, ids in rankings.items():
        if len(ids) != K or len(set(ids)) != K:
            raise SubmissionError(f"{where}: query {q} has {ids}, need {K} distinct product ids")


def padded(rankings: Mapping[int, list[int]], fill: list[int]) -> tuple[dict[int, list[int]], list[int]]:
    """(rankings, the queries completed): each ranking of fewer than K products, which holds every candidate of its
    query, is completed from `fill` (products in order of preference), skipping those it lists. A query's answers
    are among its candidates, so the added products cannot change its NDCG@5; the official scorer needs K ids."""
    out, short = {}, []
    for q, ids in rankings.items():
        if len(ids) < K:
            listed = set(ids)
            ids = ids + [p for p in dict.fromkeys(fill) if p not in listed][: K - len(ids)]
            short.append(q)
        out[q] = ids
    return out, short


def write_submission(rankings: Mapping[int, list[int]], path: str | Path, queries: set[int] | None = None) -> None:
    """Write `query-id,product1..5`, checked like the evaluator reads it."""
    validate_rankings(rankings, set(rankings) if queries is None else queries, where=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(SUBMISSION_HEADER) + "\n")
        for q in sorted(rankings):
            f.write(",".join(str(x) for x in [q, *rankings[q][:K]]) + "\n")


def write_metrics(metrics_dir: str | Path, name: str, report: Mapping) -> Path:
    """Write a stage's DVC metrics file `<metrics_dir>/<name>.json` (name may hold a subfolder).

    The bare MLflow run id is left out: it changes on every run and would make `dvc metrics diff` noisy. A train
    member's `logged_model` ids stay (they are what `mmrecall register` finds its checkpoint by).
    """
    path = Path(metrics_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "mlflow_run_id"}, indent=2) + "\n")
    return path


def read_metrics(metrics_dir: str | Path, name: str) -> dict:
    """A stage's metrics file `<metrics_dir>/<name>.json` read back ({} when there is none)."""
    path = Path(metrics_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}
