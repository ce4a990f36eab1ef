"""The submission's rule (`rerank.submission`) on the real competition files: which ranking to submit.

    .venv/bin/python bench/bench_real_rule.py                      # ../shared/kddcup2020 or tests/fixtures
    .venv/bin/python bench/bench_real_rule.py --noise 0 1 --splits 200

The real valid file holds one peer model's scores (the 2nd place's ImageBERT-A, NDCG@5 0.7098) for all 496 valid
queries, and testB's rows give the candidate counts of the frequency filter. Here that score is the only member:
the stage-2 re-ranker (the committed `rerank` section of params.yaml, its K-fold rounds out of fold) is fitted on
the member's score, its per-query rank / z-score / gap and the candidate-count features of `features.py`. Gaussian
noise (`--noise`, in units of the score's standard deviation) makes weaker members from the same file.

For each member it prints the valid NDCG@5 of the four rules `mmrecall rerank` chooses between (the re-ranker out
of fold; the "ensemble" is the member itself), and what choosing by valid is worth on queries it did not choose on:
valid's queries are split in halves `--splits` times; `reranker.submission_rule` chooses on one half and is
scored on the other, against always ranking by the re-ranker after the post-processing (the rule before
`rerank.submission` existed). Writes nothing. Used for "The submission's rule" in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmrecall.config import load_params
from mmrecall.data.store import load_answers
from mmrecall.ranking import postprocess, reranker
from mmrecall.ranking.features import count_features, per_query
from mmrecall.ranking.metrics import METRIC, ndcg_at_5_query, rank, read_score_table

REPO = Path(__file__).resolve().parents[1]
SOURCES = (REPO.parent / "shared" / "kddcup2020", REPO / "tests" / "fixtures")


def per_query_ndcg(scores: pd.DataFrame, answers: dict, queries: list[int]) -> np.ndarray:
    ranked = rank(scores)
    return np.array([ndcg_at_5_query(ranked.get(q, []), answers[q]) for q in queries])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=Path, default=next((s for s in SOURCES if s.exists()), SOURCES[-1]),
                        help="folder with validscore_imagebert.txt, testBscore_imagebert.txt, valid_answer.json")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--splits", type=int, default=500, help="random halves of valid's queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    valid = read_score_table(args.files / "validscore_imagebert.txt")
    test_b = read_score_table(args.files / "testBscore_imagebert.txt")
    answers = load_answers(args.files / "valid_answer.json")
    valid = valid[valid.query_id.isin(answers)].reset_index(drop=True)
    counts = postprocess.candidate_counts([valid.product_id, test_b.product_id])
    labels = np.array([p in answers[q] for q, p in zip(valid.query_id, valid.product_id)], np.float64)
    groups, queries = valid.query_id.to_numpy(), sorted(answers)
    params = load_params(REPO / "params.yaml")
    rp, pp = params.rerank, params.evaluate.postprocess
    print(f"{len(valid)} valid rows, {len(queries)} queries; rerank: {rp.folds} folds x {rp.repeats} rounds; "
          f"post-processing: {pp}")
    print("| member | member | member + pp | re-ranker (OOF) | re-ranker + pp | valid chooses (one half -> the other) "
          "| always re-ranker + pp | gain | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for noise in args.noise:
        t0 = time.perf_counter()
        score = valid.score.to_numpy() + noise * valid.score.std() * np.random.default_rng(args.seed).standard_normal(len(valid))
        member = valid.assign(score=score)
        X = pd.DataFrame({"score": score, **per_query(score, groups), **count_features(valid.product_id, groups, counts)})
        oof = reranker.fit_oof(X.astype(np.float32), labels, groups, {}, rp).oof
        tables = {"rerank": valid.assign(score=oof), "ensemble": member}
        per_rule = {}
        for kind, table in tables.items():
            per_rule[kind] = per_query_ndcg(table, answers, queries)
            per_rule[f"{kind}_pp"] = per_query_ndcg(postprocess.apply(table, pp, counts), answers, queries)
        chosen, fixed, picks = [], [], {}
        for _ in range(args.splits):
            half = rng.random(len(queries)) < 0.5
            on = {kind: {METRIC: per_rule[kind][half].mean(), f"{METRIC}_pp": per_rule[f"{kind}_pp"][half].mean()}
                  for kind in tables}
            rule = reranker.submission_rule(on).name
            picks[rule] = picks.get(rule, 0) + 1
            chosen.append(per_rule[rule][~half].mean())
            fixed.append(per_rule["rerank_pp"][~half].mean())
        mean = {r: v.mean() for r, v in per_rule.items()}
        picked = ", ".join(f"{r} {n}" for r, n in sorted(picks.items(), key=lambda kv: -kv[1]))
        print(f"| ImageBERT-A + noise {noise:g} | {mean['ensemble']:.4f} | {mean['ensemble_pp']:.4f} | {mean['rerank']:.4f} "
              f"| {mean['rerank_pp']:.4f} | {np.mean(chosen):.4f} | {np.mean(fixed):.4f} | {np.mean(chosen) - np.mean(fixed):+.4f} "
              f"| {picked} |", flush=True)
        print(f"noise {noise:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
