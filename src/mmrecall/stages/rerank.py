"""`mmrecall rerank`: the ensemble of members and the LightGBM re-ranker fitted on valid (ranking/reranker.py).

Fits the re-ranker on the plain members (with the smoothed views of `rerank.smoothed_views` and the box views of
`rerank.box_views` beside them), and again on the smoothed members when `mmrecall smooth` wrote them all; writes both variants' score tables
(outputs/ensemble[-knn]/, outputs/rerank[-knn]/), saves the variant params `rerank.smoothing` picks to
models/rerank/ (what the registered model loads) with the submission's rule (`reranker.submission_rule`: the
re-ranker's or the ensemble's scores, with or without evaluate.postprocess, by valid NDCG@5 under `auto`), logs one
MLflow run and writes metrics/rerank.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import mlflow

from .. import tracking
from ..config import Params, flatten, load_params, member_names, to_dict, user_path
from ..errors import MissingInputError
from ..ranking import outputs, reranker
from ..ranking.evaluation import candidate_counts, eval_stores, model_report
from ..ranking.metrics import METRIC, write_metrics

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    started = time.perf_counter()
    stores = eval_stores(params)
    if "valid" not in stores:
        raise MissingInputError(f"{params.data.features}/valid: the re-ranker is fitted on valid; run prepare first")
    counts = candidate_counts(stores)
    names = member_names(params, params.rerank.members)
    outputs_dir = Path(params.data.outputs)
    have_knn = all(outputs.exists(outputs_dir, outputs.smoothed(m), "valid") for m in names)
    if params.rerank.smoothing and not have_knn:
        raise MissingInputError("params rerank.smoothing is true but outputs/smoothed/<member>/ are missing for some "
                                f"of {names}: run `mmrecall smooth` with them in params smooth.members")
    views = reranker.smoothed_views(params, names)
    unsmoothed = [m for m in views if not outputs.exists(outputs_dir, outputs.smoothed(m), "valid")]
    if unsmoothed:
        raise MissingInputError(f"params rerank.smoothed_views names {unsmoothed}, but outputs/smoothed/<member>/ are "
                                "missing for them: run `mmrecall smooth` with them in params smooth.members (or "
                                "set rerank.smoothed_views: [])")
    for kind in ("ensemble", "rerank"):  # the stage's outs, even when there is nothing smoothed to build on
        for smoothing in (False, True):
            (outputs_dir / outputs.knn(kind, smoothing)).mkdir(parents=True, exist_ok=True)
    report: dict = {}
    chosen = None
    for smoothing in [False, True] if have_knn else [False]:
        t0 = time.perf_counter()
        variant = reranker.fit_variant(params, stores, counts, smoothing)
        for kind, tables in (("ensemble", variant.ensemble), ("rerank", variant.rerank)):
            for split, table in tables.items():
                outputs.write(outputs_dir, outputs.knn(kind, smoothing), split, table)
            report[outputs.knn(kind, smoothing)] = model_report(tables, params, stores)
        key = outputs.knn("rerank", smoothing)
        report[key].update(best_iterations=[f["best_iteration"] for f in variant.result.folds],
                           seconds=round(time.perf_counter() - t0, 1), top_features=variant.importance,
                           ensemble_weights=variant.spec.ensemble_weights)
        if smoothing == params.rerank.smoothing:
            chosen = variant, smoothing
        log.info("%s (members %s): %s", key, ", ".join(names),
                 {k: v for k, v in report[key].items() if k not in ("top_features", "best_iterations")})
        log.info("ensemble weights (learned on valid: %s): %s", params.rerank.learn_weights,
                 variant.spec.ensemble_weights or "all 1")
    variant, smoothing = chosen
    key, ensemble_key = outputs.knn("rerank", smoothing), outputs.knn("ensemble", smoothing)
    honest = {"valid_oof": report[key]["valid"], **{s: v for s, v in report[key].items() if s in stores and s != "valid"}}
    report["chosen"] = key
    rule = reranker.submission_rule({"rerank": report[key]["valid"], "ensemble": report[ensemble_key]["valid"]},
                                    params.rerank.submission)
    ruled, metric = report[outputs.knn(rule.scores, smoothing)], f"{METRIC}_pp" if rule.postprocess else METRIC
    report["submission"] = {"rule": rule.name, "chosen_by": rule.chosen_by, "valid": rule.valid,
                            **{s: ruled[s][metric] for s in stores if s != "valid" and s in ruled}}  # reported only
    log.info("the submission ranks by %s (%s; valid NDCG@5 %s; the re-ranker's and the ensemble's out of fold)",
             rule.name, "the best on valid" if rule.chosen_by == "valid" else "params rerank.submission",
             ", ".join(f"{r} {v:.4f}" for r, v in rule.valid.items()))
    report["seconds"] = round(time.perf_counter() - started, 1)
    with tracking.start_run("rerank", stage="rerank", params=flatten({"rerank": to_dict(params.rerank)}),
                            experiment=params.tracking.experiment, tags={"model": "rerank"}) as run:
        reranker.save(variant, params, counts, smoothing, honest, rule, run_id=run.info.run_id)  # register tags its run
        flat = {f"{METRIC}_{k}_{s}" + ("_pp" if m.endswith("_pp") else ""): v
                for k in ("ensemble", "rerank") for s, vals in report[k].items() if isinstance(vals, dict) and s in stores
                for m, v in vals.items()}
        mlflow.log_metrics({METRIC: report[key]["valid"][METRIC], **flat, "seconds": report["seconds"],
                            f"{METRIC}_submission_valid": rule.valid[rule.name]})
        mlflow.set_tag("submission_rule", rule.name)
        mlflow.log_dict(report, "rerank.json")
    write_metrics(params.data.metrics, "rerank", report)
    log.info("saved %s to %s (%.0f s)", key, reranker.MODEL_DIR, report["seconds"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall rerank",
        description="Ensemble of the members (weighted sum of probabilities) and a LightGBM re-ranker fitted on "
        "valid with query-grouped K-fold, repeated `rerank.repeats` times with other folds: every valid row is "
        "scored by the boosters that never saw its query (the honest NDCG@5), test rows by the mean of all "
        "fold boosters. Then picks what the submission ranks by (params rerank.submission; auto: the best valid "
        "NDCG@5 of the re-ranker and the ensemble, each with and without evaluate.postprocess). Writes outputs/ensemble/, "
        "outputs/rerank/ (and -knn variants when `mmrecall smooth` ran), models/rerank/ and metrics/rerank.json.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = parser.parse_args(argv)
    run(load_params(args.params))
    return 0
