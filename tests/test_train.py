"""The train stage: one tiny member end to end, resuming after a crash, MLflow member + parent."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

import torch

from mmrecall.ranking import members
from mmrecall.stages import pools, prepare
from mmrecall.stages import train as train_stage
from mmrecall.training import fit
from mmrecall.config import load_params

TINY = {
    "models": ["mcan"],
    "seeds": [3],
    "steps": 6,
    "eval_every": 2,
    "batch_size": 8,
    "negatives": 2,
    "eval_batch_size": 128,
    "mcan": {"hidden": 32, "heads": 4, "ff": 64, "layers": 1, "flat_mlp": 32, "flat_out": 32, "img_mlp": 64,
             "train_word_embeddings": False, "feature_norm": True},
}


@pytest.fixture
def workdir(micro_copy, monkeypatch):
    import yaml

    root = micro_copy.parent
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "train": TINY}))
    for split in ("train", "valid", "testA"):
        prepare.main(["--split", split, "--no-progress"])
    pools.main([])
    return root


def test_member_outputs_and_runs(workdir):
    assert train_stage.main(["--model", "mcan", "--seed", "3", "--no-progress"]) == 0
    result = json.loads((workdir / "metrics" / "train" / "mcan-seed3.json").read_text())

    table = pd.read_parquet(workdir / "outputs" / "mcan-seed3" / "valid.parquet")
    fused = np.load(workdir / "outputs" / "mcan-seed3" / "valid_fused.npy")
    assert len(table) == len(fused) and fused.shape[1] == 4 * 32
    assert 0 <= result["valid"]["ndcg_at_5"] <= 1 and "testA" in result
    member = members.load(workdir / "models" / "mcan" / "seed3" / "model.pt")
    blob = torch.load(workdir / "models" / "mcan" / "seed3" / "model.pt", weights_only=False)
    assert member.name == "mcan" and blob["seed"] == 3 and blob["best_step"] in (2, 4, 6)
    assert not (workdir / "checkpoints" / "mcan-seed3").exists()  # nothing left to resume

    runs = mlflow.search_runs(experiment_names=["mmrecall"])
    member = runs[runs["tags.mlflow.runName"] == "mcan-seed3"].iloc[0]
    parent = runs[runs["tags.mlflow.runName"] == "mcan"].iloc[0]
    assert member["tags.mlflow.parentRunId"] == parent.run_id
    assert member["metrics.best_ndcg_at_5"] == result["valid"]["ndcg_at_5"]
    assert parent["metrics.ndcg_at_5_mean"] == pytest.approx(result["valid"]["ndcg_at_5"])
    assert parent["metrics.members"] == 1
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(member.run_id, "ndcg_at_5")]
    assert steps == [2, 4, 6]

    # The checkpoint is the run's logged model (once: not also a run artifact), with the member's params and metrics.
    assert result["logged_model"]["run_id"] == member.run_id
    logged = mlflow.get_logged_model(result["logged_model"]["model_id"])
    assert logged.name == "mcan-seed3" and logged.source_run_id == member.run_id and logged.params["seed"] == "3"
    assert {m.key: m.value for m in logged.metrics}["best_ndcg_at_5"] == result["valid"]["ndcg_at_5"]
    assert mlflow.MlflowClient().list_artifacts(member.run_id) == []


def test_resume_after_crash_gives_the_same_result(workdir):
    params = load_params()
    full = fit.fit_member("mcan", 3, params, progress=False)
    scores_full = pd.read_parquet(workdir / "outputs" / "mcan-seed3" / "valid.parquet").score.to_numpy()

    with pytest.raises(InterruptedError):
        fit.fit_member("mcan", 3, params, progress=False, stop_after=3)  # crashes mid-epoch, after step 3
    assert (workdir / "checkpoints" / "mcan-seed3" / "last.ckpt").exists()
    resumed = fit.fit_member("mcan", 3, params, progress=False)  # resumes from the step-2 checkpoint
    scores_resumed = pd.read_parquet(workdir / "outputs" / "mcan-seed3" / "valid.parquet").score.to_numpy()

    assert resumed["best_step"] == full["best_step"] and resumed["steps"] == full["steps"]
    np.testing.assert_allclose(scores_resumed, scores_full, rtol=1e-5, atol=1e-6)
    assert resumed["valid"] == full["valid"]


def test_patience_stops_when_valid_stops_improving(workdir):
    params = load_params()
    params.train.steps, params.train.eval_every, params.train.patience = 40, 2, 1
    params.train.lr = 0.0  # nothing changes: the first evaluation stays the best, the second ends the run
    result = fit.fit_member("mcan", 3, params, progress=False)
    assert result["best_step"] == 2 and result["steps_run"] == 4 and result["steps"] == 40
