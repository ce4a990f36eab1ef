"""`mmrecall baseline`: fit and score wordproto (models/wordproto.py), the floor every model must beat."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow

from .. import tracking
from ..config import Params, flatten, load_params, to_dict, user_path
from ..data.store import FeatureStore
from ..models.wordproto import WordPrototypes
from ..ranking import outputs
from ..ranking.evaluation import eval_stores, flat_metrics, model_report
from ..ranking.metrics import write_metrics

log = logging.getLogger(__name__)


def run(params: Params, progress: bool = True) -> dict:
    """Fit on features/train, score every evaluation split into outputs/wordproto/, log one MLflow run."""
    name = params.baseline.name
    train = FeatureStore.open(Path(params.data.features) / "train")
    stores = eval_stores(params)
    run_params = flatten({"baseline": to_dict(params.baseline), "prepare": to_dict(params.prepare)})
    with tracking.start_run(tracking.run_name(name), stage="baseline", params=run_params,
                            experiment=params.tracking.experiment, tags={"model": name}) as run:
        model = WordPrototypes.fit(train, params.baseline, progress)
        (Path(params.data.outputs) / name).mkdir(parents=True, exist_ok=True)  # the stage's out, even with no split
        tables = {}
        for split, store in stores.items():
            tables[split] = model.score(store, params.baseline.chunk_rows)
            outputs.write(params.data.outputs, name, split, tables[split])
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
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    report = run(load_params(args.params), progress=not args.no_progress)
    for split, values in report.items():
        if split != "mlflow_run_id":
            log.info("wordproto %s: %s", split, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return 0
