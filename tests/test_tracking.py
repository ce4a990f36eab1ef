"""The MLflow glue: experiment resolution against the store actually in use."""

from __future__ import annotations

import mlflow

from mmrecall import tracking


def test_setup_ignores_an_experiment_id_from_another_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "4242")  # e.g. exported by set_experiment on an earlier store
    exp_id = tracking.setup()
    assert exp_id != "4242"
    assert mlflow.get_experiment(exp_id).name == tracking.DEFAULT_EXPERIMENT


def test_setup_keeps_the_experiment_mlflow_run_chose(monkeypatch):
    tracking.setup()
    mine = mlflow.create_experiment("chosen-by-mlflow-run")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mine)
    assert tracking.setup() == mine


def test_the_experiment_is_a_model_training_one(monkeypatch):
    """MLflow 3's UI opens an experiment by its kind: ours opens on its runs, however it was created."""
    exp_id = tracking.setup()
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    other = mlflow.create_experiment("made-by-mlflow-run")  # as `mlflow run --experiment-name` makes it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other)
    assert tracking.setup() == other
    assert mlflow.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
