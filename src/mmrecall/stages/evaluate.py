"""`mmrecall evaluate`: NDCG@5 of one submission or score table, or (the DVC stage) of every model.

- `mmrecall evaluate --submission FILE --answers FILE` scores one submission.csv (or score table) and
  prints its NDCG@5;
- `mmrecall evaluate` scores every model named in params `evaluate.models` (and every train member) on
  every split that has answers, and writes metrics/summary.json and reports/metrics.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Params, load_params, member_names, user_path
from ..errors import MissingInputError
from ..ranking import outputs
from ..ranking.evaluation import eval_stores, markdown_table, model_report, score_file
from ..ranking.metrics import write_metrics

log = logging.getLogger(__name__)

REPORT = Path("reports") / "metrics.md"


def run(params: Params) -> dict:
    stores = eval_stores(params)
    summary = {}
    names = list(params.evaluate.models) + (member_names(params) if params.evaluate.train_members else [])
    for model in names:
        tables = outputs.read_tables(params.data.outputs, model, stores)
        if not tables:
            raise MissingInputError(f"{Path(params.data.outputs) / model}: no score tables for model {model!r} "
                                    "(named in params evaluate.models / train.models)")
        summary[model] = model_report(tables, params, stores)
    write_metrics(params.data.metrics, "summary", summary)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        "# NDCG@5 per model\n\nRaw ranking and after the post-processing switched on in params "
        "(`evaluate.postprocess`).\n\n" + markdown_table(summary)
    )
    log.info("%d models scored -> %s, %s", len(summary), REPORT, Path(params.data.metrics) / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall evaluate",
        description="Official NDCG@5 (binary relevance, ideal over min(|answers|, 5), mean over queries). "
        "With --submission: score one submission.csv (query-id,product1..product5) or score table "
        "(query_id, product_id, score). Without it: the DVC stage, scoring every model in params "
        "evaluate.models into metrics/summary.json and reports/metrics.md.",
    )
    parser.add_argument("--submission", type=user_path, help="submission.csv or a score table (tsv/csv/parquet)")
    parser.add_argument("--answers", type=user_path, help="answers JSON, e.g. data/valid/valid_answer.json")
    parser.add_argument(
        "--counts-from", type=user_path, nargs="*", default=[],
        help="score tables of ALL evaluation files (valid, testA, testB): also report NDCG@5 after the "
        "post-processing of params evaluate.postprocess",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    if args.submission:
        if not args.answers:
            parser.error("--submission needs --answers")
        result = score_file(args.submission, args.answers, args.counts_from, load_params(args.params).evaluate.postprocess)
        for key, value in result.items():
            print(f"{key}\t{value:.5f}")
        if not any(result.values()):  # not one submitted product is an answer of its query
            log.warning("NDCG@5 is 0: are %s and %s of the same split? (synthetic valid and testA share query ids)",
                        args.submission, args.answers)
        return 0
    summary = run(load_params(args.params))
    print(markdown_table(summary), end="")
    return 0
