"""Refit the re-ranker offline on a pipeline's saved member outputs, with 1 and 3 rounds of K-fold (`rerank.repeats`)
and with 1 and 2 rounds of consensus features (`rerank.consensus_rounds`).

    .venv/bin/python bench/refit_rerank.py bench/work/q30/hard bench/work/q30/hard/var/mixbag
    REPS=3 ROUNDS=1,2 .venv/bin/python bench/refit_rerank.py bench/work/q30/*/   # defaults: REPS=1,3 ROUNDS=<params>

Each argument is a folder with a params.yaml, features/ and outputs/ (a bench_quality world clone, or a folder
beside one with other members). Prints the out-of-fold valid NDCG@5 and testA NDCG@5 per number of rounds; writes
nothing. testA is reported, not for choosing. Used for "Repeated K-fold in stage 2" and "A second round of
consensus features" in BENCHMARKS.md.
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
    repeats = [int(x) for x in os.environ.get("REPS", "1,3").split(",")]
    rounds = [int(x) for x in os.environ["ROUNDS"].split(",")] if os.environ.get("ROUNDS") else [None]
    for folder in folders:
        os.chdir(Path(folder).resolve())
        params = load_params("params.yaml")
        stores = eval_stores(params)
        counts = candidate_counts(stores)
        cells = []
        for r in repeats:
            for c in rounds:
                rp = dataclasses.replace(params.rerank, repeats=r, consensus_rounds=c or params.rerank.consensus_rounds)
                p = dataclasses.replace(params, rerank=rp)
                report = model_report(reranker.fit_variant(p, stores, counts, False).rerank, p, stores)
                cells.append(f"repeats {r}, consensus rounds {rp.consensus_rounds}: oof {report['valid']['ndcg_at_5']:.4f} "
                             f"testA {report['testA']['ndcg_at_5']:.4f}")
        print(folder, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
