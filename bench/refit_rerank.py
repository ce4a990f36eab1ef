"""Refit the re-ranker offline with 1 and 3 rounds of K-fold (`rerank.repeats`) on a pipeline's saved member outputs.

    .venv/bin/python bench/refit_rerank.py bench/work/q30/hard bench/work/q30/hard/var/mixbag   # REPS=1,3 by default

Each argument is a folder with a params.yaml, features/ and outputs/ (a bench_quality world clone, or a folder
beside one with other members). Prints the out-of-fold valid NDCG@5 and testA NDCG@5 per number of rounds; writes
nothing. testA is reported, not for choosing. Used for "Repeated K-fold in stage 2" in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from mmrecall.config import load_params
from mmrecall.ranking import reranker
from mmrecall.ranking.evaluation import candidate_counts, eval_stores, model_report


def main(folders: list[str]) -> None:
    rounds = [int(x) for x in os.environ.get("REPS", "1,3").split(",")]
    for folder in folders:
        os.chdir(Path(folder).resolve())
        params = load_params("params.yaml")
        stores = eval_stores(params)
        counts = candidate_counts(stores)
        cells = []
        for r in rounds:
            p = dataclasses.replace(params, rerank=dataclasses.replace(params.rerank, repeats=r))
            report = model_report(reranker.fit_variant(p, stores, counts, False).rerank, p, stores)
            cells.append(f"{r} rounds: oof {report['valid']['ndcg_at_5']:.4f} testA {report['testA']['ndcg_at_5']:.4f}")
        print(folder, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
