"""`evaluate`: NDCG@5 of score tables and submissions, with and without post-processing.

Two modes, one entry point:
- `mmrecall evaluate --submission FILE --answers FILE` scores one submission.csv (or score table)
  and prints its NDCG@5;
- `mmrecall evaluate` (the DVC stage) scores every model named in params `evaluate.models` on every
  split that has answers, and writes metrics/summary.json and reports/metrics.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from . import postprocess
from .config import Params, PostprocessParams, load_params
from .metrics import METRIC, evaluate_scores, ndcg_at_5, read_score_table, read_submission, write_metrics
from .store import FeatureStore, load_answers
from .tracking import run_name as tracking_name

REPORT = Path("reports") / "metrics.md"


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


def run_stage(params: Params) -> dict:
    stores = eval_stores(params)
    outputs = Path(params.data.outputs)
    summary = {}
    names = list(params.evaluate.models)
    if params.evaluate.train_members:
        names += [tracking_name(m, s) for m in params.train.models for s in params.train.seeds]
    for model in names:
        folder = outputs / model
        tables = {s: read_score_table(folder / f"{s}.parquet") for s in stores if (folder / f"{s}.parquet").exists()}
        if not tables:
            raise FileNotFoundError(f"{folder}: no score tables for model {model!r} (named in params evaluate.models)")
        summary[model] = model_report(tables, params, stores)
    write_metrics(params.data.metrics, "summary", summary)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        "# NDCG@5 per model\n\nRaw ranking and after the post-processing switched on in params "
        "(`evaluate.postprocess`).\n\n" + markdown_table(summary)
    )
    return summary


def score_file(path: Path, answers_path: Path, count_files: list[Path], pp: PostprocessParams) -> dict[str, float]:
    answers = load_answers(answers_path)
    if path.suffix != ".parquet":
        with open(path) as f:
            if f.readline().startswith("query-id"):
                return {METRIC: ndcg_at_5(read_submission(path), answers)}
    scores = read_score_table(path)
    out = {METRIC: evaluate_scores(scores, answers)}
    if count_files:
        counts = postprocess.candidate_counts(read_score_table(p).product_id for p in count_files)
        out[f"{METRIC}_pp"] = evaluate_scores(postprocess.apply(scores, pp, counts), answers)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall evaluate",
        description="Official NDCG@5 (binary relevance, ideal over min(|answers|, 5), mean over queries). "
        "With --submission: score one submission.csv (query-id,product1..product5) or score table "
        "(query_id, product_id, score). Without it: the DVC stage, scoring every model in params "
        "evaluate.models into metrics/summary.json and reports/metrics.md.",
    )
    parser.add_argument("--submission", type=Path, help="submission.csv or a score table (tsv/csv/parquet)")
    parser.add_argument("--answers", type=Path, help="answers JSON, e.g. data/valid/valid_answer.json")
    parser.add_argument(
        "--counts-from", type=Path, nargs="*", default=[],
        help="score tables of ALL evaluation files (valid, testA, testB): also report NDCG@5 after the "
        "post-processing of params evaluate.postprocess",
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.submission:
        if not args.answers:
            parser.error("--submission needs --answers")
        result = score_file(args.submission, args.answers, args.counts_from, params.evaluate.postprocess)
        for key, value in result.items():
            print(f"{key}\t{value:.5f}")
        return 0
    summary = run_stage(params)
    print(markdown_table(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
