"""Refit the re-ranker offline on a pipeline's saved member outputs, once per variant of the `rerank` section.

    .venv/bin/python bench/refit_rerank.py bench/work/q30/hard bench/work/q30/hard/var/mixbag
    VARIANTS="consensus_rounds=1 density=[];consensus_rounds=2 density=[3,5]" \
        .venv/bin/python bench/refit_rerank.py bench/work/q30/*/

Each argument is a folder with a params.yaml, features/ and outputs/ (a bench_quality world clone, or a folder
beside one with other members). VARIANTS: variants separated by ";", each a space-separated list of
`key=value` settings of the folder's `rerank` section (values in YAML; default "repeats=1;repeats=3"). Prints the
out-of-fold valid NDCG@5 and the testA NDCG@5 of each variant and writes nothing. testA is reported, not for
choosing. Used for "Repeated K-fold in stage 2", "A second round of consensus features" and "Density features"
in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import yaml

from mmrecall.config import load_params
from mmrecall.ranking import reranker
from mmrecall.ranking.evaluation import candidate_counts, eval_stores, model_report


def variants(text: str) -> list[dict]:
    """"repeats=1;repeats=3 density=[]" -> [{"repeats": 1}, {"repeats": 3, "density": []}]."""
    return [{key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in variant.split())}
            for variant in text.split(";")]


def main(folders: list[str]) -> None:
    settings = variants(os.environ.get("VARIANTS", "repeats=1;repeats=3"))
    for folder in [Path(f).resolve() for f in folders]:  # before the first chdir: the arguments may be relative
        os.chdir(folder)
        params = load_params("params.yaml")
        stores = eval_stores(params)
        counts = candidate_counts(stores)
        cells = []
        for setting in settings:
            p = dataclasses.replace(params, rerank=dataclasses.replace(params.rerank, **setting))
            report = model_report(reranker.fit_variant(p, stores, counts, False).rerank, p, stores)
            label = " ".join(f"{k}={v}" for k, v in setting.items())
            cells.append(f"{label}: oof {report['valid']['ndcg_at_5']:.4f} testA {report['testA']['ndcg_at_5']:.4f}")
        print(folder, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
