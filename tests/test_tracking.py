"""The MLflow glue: experiment resolution against the store actually in use."""

from __future__ import annotations

import subprocess
import sys

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


def test_ui_prints_the_link_to_the_training_runs(tmp_path, monkeypatch, capsys):
    from mmrecall.stages import ui

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert ui.main(["--print-url", "--port", "5123"]) == 0
    exp_id = mlflow.get_experiment_by_name("mmrecall").experiment_id
    assert capsys.readouterr().out.strip() == f"http://127.0.0.1:5123/#/experiments/{exp_id}?workflowType=machine_learning"


def test_model_code_loads_without_mlflow_type_hint_warnings():
    """The member and ranker pyfuncs type their predict input as a DataFrame (MLflow infers no schema from it; the
    logged signature stays the one given), so MLflow does not warn each time it loads them (predict, serve)."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import mmrecall.ranking.member_model, mmrecall.ranking.ranker_model\n"
            "print([str(w.message) for w in caught if 'type hint' in str(w.message).lower()])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
