"""The tune stage: study + MLflow parent/children + best_params.yaml, the train switch, resuming, 2 parallel workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from mmrecall.stages import tune
from mmrecall.training import fit, tuning
from mmrecall.config import ParamsError, TuneParams, load_params

from .test_train import TINY, workdir  # noqa: F401 (fixture)

TUNE = {"n_trials": 3, "steps": 4, "eval_every": 2, "pruner": {"kind": "median", "startup_trials": 1, "warmup_evals": 0}}


@pytest.fixture
def tunedir(workdir):
    (workdir / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "train": TINY, "tune": TUNE}))
    return workdir


def runs_of(study_name: str):
    runs = mlflow.search_runs(experiment_names=["mmrecall"], filter_string=f"tags.`optuna.study_name` = '{study_name}'")
    parents = runs[runs["tags.kind"] == "study"]
    children = runs[runs["tags.kind"] == "trial"]
    return parents, children


@pytest.mark.slow
def test_study_runs_best_params_resume_and_the_train_switch(tunedir, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)  # one pruned trial, surely
    assert tune.main(["--no-progress"]) == 0

    params = load_params()
    name = tuning.study_name(params)
    study = optuna.load_study(study_name=name, storage=tuning.open_storage(params.tune.storage))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert (tunedir / "optuna-journal.log").exists()  # the default storage, in the repository root

    parents, children = runs_of(name)
    assert len(parents) == 1 and len(children) == 3
    parent = parents.iloc[0]
    assert parent["tags.mlflow.runName"] == f"study-{name}" and parent["status"] == "FINISHED"
    assert parent["metrics.best_ndcg_at_5"] == pytest.approx(study.best_value)
    assert parent["metrics.trials_pruned"] == 1 and parent["params.tune.steps"] == "4"
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = children[children["tags.mlflow.runName"] == f"trial-{trial.number}"].iloc[0]
        assert run["tags.mlflow.parentRunId"] == parent.run_id and run.run_id == trial.user_attrs["mlflow_run_id"]
        assert float(run["params.focal_gamma"]) == pytest.approx(trial.params["focal_gamma"])
        series = [(m.step, m.value) for m in client.get_metric_history(run.run_id, "ndcg_at_5")]
        reported = sorted(trial.intermediate_values.items())  # (Lightning keeps the metric as float32)
        assert [s for s, _ in series] == [s for s, _ in reported]  # every report went to MLflow too
        assert [v for _, v in series] == pytest.approx([v for _, v in reported], rel=1e-6)
        state = {"COMPLETE": ("complete", "FINISHED"), "PRUNED": ("pruned", "KILLED")}[trial.state.name]
        assert (run["tags.state"], run["status"]) == state
    assert [s for s, _ in series] == [2, 4]  # the last trial completed: both evaluations

    best = yaml.safe_load((tunedir / "best_params.yaml").read_text())
    assert best["model"] == "mcan" and best["params"] == study.best_params and best["ndcg_at_5"] == study.best_value
    assert set(best["params"]) == {"focal_alpha", "focal_gamma", "amplitude"}

    # Resuming: the same setup finds its study and runs only the missing trials, under the same parent.
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: False)
    assert tune.main(["--no-progress", "--n-trials", "4"]) == 0
    assert len(optuna.load_study(study_name=name, storage=tuning.open_storage(params.tune.storage)).trials) == 4
    parents, children = runs_of(name)
    assert len(parents) == 1 and sorted(children["tags.mlflow.runName"]) == [f"trial-{n}" for n in range(4)]

    # The switch: train uses the tuned values (as the member's MLflow params show).
    best = yaml.safe_load((tunedir / "best_params.yaml").read_text())
    raw = yaml.safe_load((tunedir / "params.yaml").read_text())
    raw["train"]["best_params"] = True
    (tunedir / "params.yaml").write_text(yaml.safe_dump(raw))
    fit.fit_member("mcan", 3, load_params(), progress=False)
    member = mlflow.search_runs(experiment_names=["mmrecall"], filter_string="tags.mlflow.runName = 'mcan-seed3'").iloc[0]
    assert float(member["params.train.focal_alpha"]) == best["params"]["focal_alpha"]
    assert float(member["params.train.focal_gamma"]) == best["params"]["focal_gamma"]
    assert float(member["params.train.schedule.amplitude"]) == best["params"]["amplitude"]
    assert member["params.train.steps"] == str(TINY["steps"])  # not the trial length


@pytest.mark.slow
def test_two_workers_share_one_journal_study(tunedir, mlflow_store):
    """Two real processes on one journal file and one fresh sqlite MLflow store: no lost trial, no lock error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "mmrecall.cli", "tune", "--no-progress", "--n-trials", "4"]
    workers = [subprocess.Popen([*cmd, "--worker", str(k)], cwd=tunedir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
        assert "database is locked" not in out + err

    mlflow.set_tracking_uri(mlflow_store)  # this process may still point at an earlier test's store
    params = load_params()
    name = tuning.study_name(params)
    study = optuna.load_study(study_name=name, storage=tuning.open_storage(params.tune.storage))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials) >= 4  # nothing left RUNNING; the last trials may overshoot by one

    parents, children = runs_of(name)
    assert len(parents) == 1
    assert sorted(children["tags.optuna.trial_number"].astype(int)) == [t.number for t in study.trials], (
        [(t.number, t.state.name, t.user_attrs) for t in study.trials],
        mlflow.search_runs(search_all_experiments=True)[["run_id", "tags.mlflow.runName", "status", "experiment_id"]],
        outputs[0][1][-2000:], outputs[1][1][-2000:])
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0].run_id}
    assert set(children.run_id) == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert set(children["tags.optuna.worker"]) == {"0", "1"}  # both worked on it
    assert yaml.safe_load((tunedir / "best_params.yaml").read_text())["ndcg_at_5"] == study.best_value


def test_search_space_and_best_params_file_are_checked(tmp_path):
    with pytest.raises(ParamsError, match="not tunable"):
        TuneParams(space={"batch_size": {"low": 1, "high": 2}}).ranges()
    with pytest.raises(ParamsError, match="low < high"):
        TuneParams(space={"lr": {"low": 0.0, "high": 0.1, "log": True}}).ranges()
    assert TuneParams(space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}}).ranges() == {"lr": (1e-4, 1e-2, True)}

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"best_params": True}}))
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml", apply_best=False).train.best_params is True

    (tmp_path / "best_params.yaml").write_text(yaml.safe_dump({"model": "mcan", "params": {"focal_gamma": 0.5,
                                                                                         "amplitude": 0.1}}))
    params = load_params(tmp_path / "params.yaml")
    mcan, vb = params.train.for_model("mcan"), params.train.for_model("visualbert")
    assert (mcan.focal_gamma, mcan.schedule.amplitude) == (0.5, 0.1)
    base = load_params(tmp_path / "params.yaml", apply_best=False).train.for_model("visualbert")
    assert (vb.focal_gamma, vb.schedule.amplitude) == (base.focal_gamma, base.schedule.amplitude) != (0.5, 0.1)  # only the tuned model

    (tmp_path / "best_params.yaml").write_text(yaml.safe_dump({"model": "mcan", "params": {"steps": 3}}))
    with pytest.raises(ParamsError, match="not tunable"):
        load_params(tmp_path / "params.yaml")


def test_storage_and_study_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert tuning.open_storage("postgresql://u:pw@db/optuna") == "postgresql://u:pw@db/optuna"
    assert isinstance(tuning.open_storage("studies/j.log"), optuna.storages.JournalStorage)
    assert (tmp_path / "studies").is_dir()  # relative to the repository root
    from mmrecall.tracking import redact

    assert redact("postgresql://u:pw@db/optuna") == "postgresql://u:***@db/optuna"
    params = load_params()
    name = tuning.study_name(params)
    assert name.startswith("mcan-") and name == tuning.study_name(params)
    from dataclasses import replace

    longer = replace(params, tune=replace(params.tune, steps=999))
    more = replace(params, tune=replace(params.tune, n_trials=99))
    assert tuning.study_name(longer) != name and tuning.study_name(more) == name  # more trials = the same study


@pytest.mark.slow
def test_dvc_tune_stage_is_its_own_pipeline(tmp_path, micro_data):
    """`dvc repro` leaves the study out; `dvc repro tune/dvc.yaml` prepares the features and runs it."""
    from .conftest import ROOT
    from .test_pipeline import sh

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "tune/dvc.yaml", ".gitignore", ".dvcignore", "src"):
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["workers"] = 1
    params["train"] = TINY
    params["tune"].update(TUNE, n_trials=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(micro_data, repo / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=os.pathsep.join(sys.path),
               DVC_NO_ANALYTICS="1")
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "add", "data", "-q"), ("git", "add", "-A"),
                ("git", "commit", "-qm", "micro")):
        sh(*cmd, cwd=repo, env=env)

    out = sh("dvc", "repro", "tune/dvc.yaml", cwd=repo, env=env)
    assert "Running stage 'prepare@train'" in out and "Running stage 'tune/dvc.yaml:tune'" in out
    best = yaml.safe_load((repo / "best_params.yaml").read_text())
    assert best["model"] == "mcan" and json.loads((repo / "metrics" / "tune.json").read_text())["trials_complete"] >= 1
    assert "didn't change" in sh("dvc", "repro", "tune/dvc.yaml", cwd=repo, env=env)
    # What `dvc repro` / `make repro` would run (--dry stops where features/testA, not prepared here, is missing).
    dry = subprocess.run(["dvc", "repro", "--dry"], cwd=repo, env=env, capture_output=True, text=True)
    assert "Running stage 'train@mcan-3'" in dry.stdout and "tune/dvc.yaml:tune" not in dry.stdout + dry.stderr
