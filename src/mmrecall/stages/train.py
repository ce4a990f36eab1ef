"""`mmrecall train`: one ranker member (a model and a seed), trained by training/fit.py and logged to MLflow."""

from __future__ import annotations

import argparse
import logging

from ..config import load_params, member_name, user_path
from ..models.registry import MODELS
from ..ranking.metrics import write_metrics
from ..training.fit import fit_member, trainable

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall train",
        description="Train one ranker member (a model and a seed from params.yaml `train`): hard negatives, "
        "focal loss, sine-wave schedule, valid NDCG@5 every train.eval_every steps, best checkpoint kept, "
        "resumes an interrupted run. Writes models/<model>/seed<k>/model.pt, outputs/<model>-seed<k>/ and "
        "metrics/train/<model>-seed<k>.json, and logs MLflow run <model>-seed<k> under parent <model>.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--seed", required=True, type=lambda s: int(float(s)), help="training seed (MLflow passes '1.0')")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    parser.add_argument("--stop-after", type=int, help="simulate a crash after N steps (to test resuming)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    member = member_name(args.model, args.seed)
    if trainable(args.model):
        log.info("%s: training for %d steps", member, params.train.for_model(args.model).steps)
    else:
        log.info("%s: fitting (no optimizer steps)", member)
    result = fit_member(args.model, args.seed, params, progress=not args.no_progress, stop_after=args.stop_after,
                        resume=not args.no_resume)
    if not result:
        return 0  # a DDP rank > 0: rank 0 writes the outputs and logs the run
    write_metrics(params.data.metrics, f"train/{member}", result)
    scores = ", ".join(f"{split} {v['ndcg_at_5']:.4f} (+pp {v.get('ndcg_at_5_pp', float('nan')):.4f})"
                       for split, v in result.items() if isinstance(v, dict) and "ndcg_at_5" in v)
    log.info("%s: done in %.0f s, best step %d/%d; NDCG@5 %s", member, result["train_seconds"], result["best_step"],
             result["steps"], scores)
    return 0
