"""`mmrecall predict`: submission.csv for testA (and testB when present) through the registered model.

The candidate file data/<split>/<split>.tsv is read as a candidate table (the rows `prepare` kept in
features/<split>: a row it rejected is left out and logged, not fatal) and scored by the model at
params `predict.model_uri` (default models:/mmrecall-ranker@champion). Its scores already rank as the
submission's rule says (the MLflow model's metadata `submission`, chosen on valid by `mmrecall rerank`: the
re-ranker's or the ensemble's scores, with or without the post-processing of evaluate.postprocess); a model
registered before the rule existed gets the post-processing of params `evaluate.postprocess` here, as then.
The top 5 per query are written as `query-id,product1..product5`. A query with fewer than 5 scored candidates
gets its line completed first with its candidates that prepare rejected (`ranker.rejected_candidates`: unscored,
in file order; a query whose rows were all rejected gets only these), then with products that are not its
candidates (`metrics.padded`). The file is checked by the evaluator's validator (every query of the split, 5
distinct ids) and read back with its reader. With answers (synthetic
testA) its NDCG@5 is reported (`ndcg_at_5`), and next to it that of the model's scores after
evaluate.postprocess (`ndcg_at_5_pp`; the same when the rule applied it). metrics/predict.json has the numbers.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import mlflow
import pandas as pd

from .. import tracking
from ..config import RULE_BEFORE_SUBMISSION, Params, load_params, user_path
from ..errors import MissingInputError
from ..ranking import postprocess
from ..ranking.evaluation import candidate_counts, eval_stores
from ..ranking.metrics import (METRIC, K, ndcg_at_5, padded, rank, read_submission, write_metrics,
                                write_submission)
from ..ranking.ranker import prepared_candidates, read_candidates, rejected_candidates

log = logging.getLogger(__name__)


def submission_path(params: Params, split: str, first: bool) -> Path:
    out = Path(params.predict.output)
    return out if first else out.with_name(f"{out.stem}_{split}{out.suffix}")


def submission_lines(scores: pd.DataFrame, unscored: dict[int, list[int]], fill: list[int]
                     ) -> tuple[dict[int, list[int]], list[int], dict[int, int]]:
    """(query -> its 5 products, the queries completed with non-candidates, query -> rejected candidates written):
    a query's top 5 by score, completed first with its `unscored` candidates (rejected by prepare; in file order),
    then from `fill` (`metrics.padded`)."""
    ranked = rank(scores)
    filled: dict[int, int] = {}
    for q, products in unscored.items():
        listed = ranked.get(q, [])
        extra = [p for p in dict.fromkeys(products) if p not in listed][: max(K - len(listed), 0)]
        ranked[q] = listed + extra
        if extra:
            filled[q] = len(extra)
    rankings, short = padded(ranked, fill)
    return rankings, short, filled


def run(params: Params) -> dict:
    tracking.setup(params.tracking.experiment)
    started = time.perf_counter()
    log.info("loading %s", params.predict.model_uri)
    model = mlflow.pyfunc.load_model(params.predict.model_uri)
    load_seconds = time.perf_counter() - started
    rule = (model.metadata.metadata or {}).get("submission")  # None: registered before the rule, pp applied here
    log.info("the model ranks by %s", rule or "the re-ranker (registered before the submission's rule): "
             "evaluate.postprocess is applied here")
    stores = eval_stores(params)
    counts = candidate_counts(stores)
    pp = params.evaluate.postprocess
    report: dict = {"model_uri": params.predict.model_uri, "load_seconds": round(load_seconds, 1),
                    "rule": rule or RULE_BEFORE_SUBMISSION}
    switched_on = pp.frequency_filter or pp.exclusivity
    fill = counts.sort_index().sort_values(ascending=False, kind="stable").index.tolist()  # completes short lines
    splits = [s for s in params.predict.splits if (Path(params.data.root) / s / f"{s}.tsv").exists()]
    if not splits:
        raise MissingInputError(f"none of params predict.splits {params.predict.splits} has data/<split>/<split>.tsv")
    for i, split in enumerate(splits):
        t0 = time.perf_counter()
        tsv = Path(params.data.root) / split / f"{split}.tsv"
        unscored: dict[int, list[int]] = {}  # query -> its candidates that prepare rejected
        if split in stores:  # the rows prepare kept: its rejects (features/<split>/rejects.tsv) are not scored
            table = prepared_candidates(tsv, stores[split], split)
            skipped = int(stores[split].meta.get("rows_rejected", 0))
            if skipped:
                log.warning("%s: %d row(s) of %s left out, as prepare rejected them (features/%s/rejects.tsv)",
                            split, skipped, tsv, split)
                unscored = rejected_candidates(tsv, stores[split])
        else:
            table = read_candidates(tsv)
        scores = model.predict(table)
        scored = pd.DataFrame({"query_id": table.query_id, "product_id": table.product_id,
                               "score": scores["score"].to_numpy()})
        final = postprocess.apply(scored, pp, counts) if switched_on and rule is None else scored
        path = submission_path(params, split, i == 0)
        rankings, short, filled = submission_lines(final, unscored, fill)
        lost = sorted(set(unscored) - set(table.query_id.tolist()))  # queries whose rows prepare all rejected
        if short:
            log.warning("%s: %d query line(s) with fewer than 5 candidates (e.g. query %s) completed with products "
                        "that are not their candidates, as the official scorer needs 5 (their NDCG@5 is unchanged)",
                        split, len(short), short[0])
        if filled:
            log.warning("%s: %d query line(s) short of 5 scored candidates completed with %d of their rejected "
                        "candidates, unscored, in file order", split, len(filled), sum(filled.values()))
        if lost:
            log.warning("%s: %d query(ies) with no row that prepare kept (e.g. query %s): their lines hold their "
                        "rejected candidates unscored, in file order", split, len(lost), lost[0])
        write_submission(rankings, path, queries=set(table.query_id.tolist()) | set(lost))  # the evaluator's validator
        entry = {"file": str(path), "queries": int(table.query_id.nunique()) + len(lost), "rows": len(table),
                 "seconds": round(time.perf_counter() - t0, 1), **({"completed_queries": len(short)} if short else {}),
                 **({"unscored_candidates": sum(filled.values())} if filled else {}),
                 **({"queries_without_rows": len(lost)} if lost else {})}
        answers = stores[split].answers if split in stores else None
        if answers and rule is None:
            entry[METRIC] = round(ndcg_at_5(submission_lines(scored, unscored, fill)[0], answers, strict=False), 6)
            entry[f"{METRIC}_pp"] = round(ndcg_at_5(read_submission(path), answers, strict=False), 6)  # the file
        elif answers:
            entry[METRIC] = round(ndcg_at_5(read_submission(path), answers, strict=False), 6)  # the file, read back
            if switched_on:
                other = submission_lines(postprocess.apply(scored, pp, counts), unscored, fill)[0]
                entry[f"{METRIC}_pp"] = round(ndcg_at_5(other, answers, strict=False), 6)
        report[split] = entry
        log.info("%s: %s", split, entry)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_metrics(params.data.metrics, "predict", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall predict",
        description="Score data/<split>/<split>.tsv (params predict.splits that exist: testA, testB) with the "
        "registered model (params predict.model_uri, default models:/mmrecall-ranker@champion), apply the "
        "post-processing of params evaluate.postprocess, and write submission.csv (testB: submission_testB.csv), "
        "validated like the evaluator reads it. Writes metrics/predict.json.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--model-uri", help="override params predict.model_uri")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.model_uri:
        params.predict.model_uri = args.model_uri
    run(params)
    return 0
