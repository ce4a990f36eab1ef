"""`mmrecall tune`: run (or resume, or join) the Optuna study of training/tuning.py; writes best_params.yaml."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import optuna

from ..config import PARAMS_FILE, find_params_file, load_params, user_path
from ..ranking.metrics import METRIC
from ..training.tuning import run_study

log = logging.getLogger(__name__)


def number(text: str) -> int | None:
    """"4", "4.0" -> 4; "" -> None (as in params.yaml: the MLproject's empty defaults)."""
    return int(float(text)) if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall tune",
        description="Optuna study over focal-loss alpha/gamma and the schedule amplitude (params.yaml `tune`): "
        "each trial trains tune.model for tune.steps steps, reports valid NDCG@5 every tune.eval_every steps "
        "and is pruned when below the median. Resumes the study when run again; several processes on the "
        "same storage (a journal file, or an RDB URL for several machines) share it. Logs MLflow run "
        "study-<name> with one child trial-<n> per trial; writes best_params.yaml (tune.output) and "
        "metrics/tune.json. `train.best_params: true` makes `mmrecall train` use the best values.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--n-trials", type=number, help="override tune.n_trials (the study's target)")
    parser.add_argument("--storage", help="override tune.storage: a journal file or an RDB URL")
    parser.add_argument("--study-name", help="override tune.study_name")
    parser.add_argument("--workers", type=number, default=1,
                        help="local worker processes for this study (default 1); more can join from elsewhere")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (varies the sampler seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    params_file = args.params or find_params_file() or PARAMS_FILE
    params = load_params(params_file, apply_best=False)  # tune from the base values, not from the last study's
    tune, overrides = params.tune, []
    if args.n_trials is not None:
        tune, overrides = replace(tune, n_trials=args.n_trials), [*overrides, "--n-trials", str(args.n_trials)]
    if args.storage:
        tune, overrides = replace(tune, storage=args.storage), [*overrides, "--storage", args.storage]
    if args.study_name:
        tune, overrides = replace(tune, study_name=args.study_name), [*overrides, "--study-name", args.study_name]
    params = replace(params, tune=tune)
    tune.ranges()  # a bad search space fails before anything is created
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = run_study(params, args.worker, max((args.workers or 1) - 1, 0), progress=not args.no_progress,
                     params_file=str(params_file), overrides=overrides)
    if best is None:
        log.error("no trial completed (all pruned or failed); nothing written")
        return 1
    log.info("best valid %s %.4f (trial %d): %s -> %s", METRIC, best[METRIC], best["trial"], best["params"],
             params.tune.output)
    return 0
