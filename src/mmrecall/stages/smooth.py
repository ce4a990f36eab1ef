"""`mmrecall smooth`: re-score members on KNN-smoothed box features (ranking/smoothing.py, the solo team's)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..config import Params, load_params, member_names, user_path
from ..ranking import members, outputs
from ..ranking.evaluation import eval_stores, model_report
from ..ranking.metrics import write_metrics
from ..ranking.smoothing import smoothed_store

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    """Re-score members on smoothed boxes; write outputs/smoothed/<member>/ and metrics/smooth.json."""
    stores = eval_stores(params)
    started = time.perf_counter()
    smoothed = {split: smoothed_store(store, params.smooth) for split, store in stores.items()}
    report: dict = {"smooth_seconds": round(time.perf_counter() - started, 2)}
    (Path(params.data.outputs) / outputs.SMOOTHED).mkdir(parents=True, exist_ok=True)  # the stage's out
    for member in member_names(params, params.smooth.members):
        t0 = time.perf_counter()
        loaded = members.load(members.checkpoint_path(member), accelerator=params.train.accelerator)
        tables = {}
        for split, store in smoothed.items():
            tables[split], fused = members.score(loaded, store)
            outputs.write(params.data.outputs, outputs.smoothed(member), split, tables[split], fused)
        report[member] = {"seconds": round(time.perf_counter() - t0, 1), **model_report(tables, params, stores)}
        log.info("%s on smoothed boxes: %s", member, report[member])
    write_metrics(params.data.metrics, "smooth", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall smooth",
        description="KNN smoothing of box features (solo team): within each query's candidate pool every box "
        "becomes w0*itself + w1*its nearest other box + w2*its second nearest (params smooth.k, smooth.weights). "
        "Re-scores every member of params smooth.members (null: every train member) on the smoothed valid / "
        "testA boxes into outputs/smoothed/<member>/ and writes metrics/smooth.json (NDCG@5 with smoothing on; "
        "the plain outputs/<member>/ are the 'off' numbers).",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = parser.parse_args(argv)
    run(load_params(args.params))
    return 0
