"""NDCG@5 reports of score tables and submissions over the evaluation splits, raw and post-processed.

    stores = eval_stores(params)                          # features/valid, features/testA (testB)
    report = model_report({"valid": table, ...}, params, stores)
    # {"valid": {"ndcg_at_5": .., "ndcg_at_5_pp": ..}, "testA": {...}}  (splits with answers only)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import Params, PostprocessParams
from ..data.store import FeatureStore, load_answers
from ..errors import MissingInputError
from . import postprocess
from .metrics import METRIC, evaluate_scores, ndcg_at_5, rank, read_score_table, read_submission


def eval_stores(params: Params) -> dict[str, FeatureStore]:
    """The prepared evaluation splits (every split but train), in params order."""
    root = Path(params.data.features)
    return {s: FeatureStore.open(root / s) for s in params.data.splits if s != "train" and (root / s).exists()}


def candidate_counts(stores: dict[str, FeatureStore]) -> pd.Series:
    """Rows per product over all evaluation files (valid + testA + testB), for the frequency filter."""
    return postprocess.candidate_counts(s.rows.product_id.to_numpy() for s in stores.values())


def split_report(scores: pd.DataFrame, answers, pp: PostprocessParams, counts: pd.Series) -> dict[str, float]:
    """{'ndcg_at_5': raw, 'ndcg_at_5_pp': after the switched-on post-processing}."""
    out = {METRIC: round(evaluate_scores(scores, answers), 6)}
    if pp.frequency_filter or pp.exclusivity:
        out[f"{METRIC}_pp"] = round(evaluate_scores(postprocess.apply(scores, pp, counts), answers), 6)
    return out


def model_report(scores: dict[str, pd.DataFrame], params: Params, stores: dict[str, FeatureStore] | None = None) -> dict:
    """{split: split_report} for every split of `scores` that has answers."""
    stores = stores if stores is not None else eval_stores(params)
    counts = candidate_counts(stores)
    report = {}
    for split, table in scores.items():
        answers = stores[split].answers if split in stores else None
        if answers:
            report[split] = split_report(table, answers, params.evaluate.postprocess, counts)
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """MLflow metric names: `ndcg_at_5` (valid, the selection metric) and `ndcg_at_5_<split>[_pp]`."""
    out = {}
    for split, values in report.items():
        for key, value in values.items():
            out[key.replace(METRIC, f"{METRIC}_{split}")] = value
    if "valid" in report:
        out[METRIC] = report["valid"][METRIC]
    return out


def markdown_table(summary: dict) -> str:
    splits = sorted({s for rep in summary.values() for s in rep}, key=lambda s: (s != "valid", s))
    head = ["model"] + [f"{s} {col}" for s in splits for col in ("NDCG@5", "+post-proc")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, rep in summary.items():
        cells = [model]
        for s in splits:
            vals = rep.get(s, {})
            cells += [f"{vals[k]:.4f}" if k in vals else "-" for k in (METRIC, f"{METRIC}_pp")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_file(path: Path, answers_path: Path, count_files: list[Path], pp: PostprocessParams) -> dict[str, float]:
    """NDCG@5 of a submission.csv, or of a score table (also after post-processing, given the count files)."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: file not found")
    answers = load_answers(answers_path)
    if path.suffix != ".parquet":
        with open(path) as f:
            if f.readline().startswith("query-id"):
                return {METRIC: ndcg_at_5(read_submission(path), answers)}
    scores = read_score_table(path)  # a query of the answers without a row is an error, as in a submission
    out = {METRIC: ndcg_at_5(rank(scores), answers)}
    if count_files:
        counts = postprocess.candidate_counts(read_score_table(p).product_id for p in count_files)
        out[f"{METRIC}_pp"] = ndcg_at_5(rank(postprocess.apply(scores, pp, counts)), answers)
    return out
