"""wordproto: fits on train, beats chance, logs one MLflow run with its NDCG@5."""

from __future__ import annotations

import json

import mlflow
import numpy as np

from mmrecall.ranking import evaluation, metrics
from mmrecall.stages import baseline, prepare
from mmrecall.config import load_params


def test_wordproto_run(micro_copy, monkeypatch, mlflow_store):
    root = micro_copy.parent
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text("prepare:\n  workers: 1\nbaseline:\n  min_word_count: 1\n")
    for split in ("train", "valid", "testA"):
        prepare.main(["--split", split, "--no-progress"])
    params = load_params()
    report = baseline.run(params, progress=False)

    valid = metrics.read_score_table(root / "outputs" / "wordproto" / "valid.parquet")
    answers = json.loads((micro_copy / "valid" / "valid_answer.json").read_text())
    assert set(valid.query_id) == {int(q) for q in answers}
    rng = np.random.default_rng(0)
    chance = np.mean([metrics.evaluate_scores(valid.assign(score=rng.random(len(valid))), evaluation.eval_stores(params)["valid"].answers)
                      for _ in range(5)])
    assert report["valid"]["ndcg_at_5"] > chance + 0.05
    assert report["valid"]["ndcg_at_5_pp"] >= report["valid"]["ndcg_at_5"] - 0.05

    runs = mlflow.search_runs(experiment_names=["mmrecall"], filter_string="tags.mlflow.runName = 'wordproto'")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["metrics.ndcg_at_5"] == report["valid"]["ndcg_at_5"]
    assert run["metrics.ndcg_at_5_testA"] == report["testA"]["ndcg_at_5"]
    assert run["params.baseline.min_word_count"] == "1"
    assert run["tags.stage"] == "baseline" and "tags.git_commit" in run
    assert json.loads((root / "metrics" / "wordproto.json").read_text())["valid"] == report["valid"]
