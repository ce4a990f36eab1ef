"""MLproject: every entry point through `mlflow run . -e <name> --env-manager local`, in a fresh git + DVC repo.

Runs land in the store `dvc repro` uses (<repo>/mlflow.db: `mlflow run` exports its default, relative sqlite
URI, which tracking.py makes absolute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from .conftest import MICRO, ROOT
from .test_train import TINY

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def sh(*cmd: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def mlflow_run(entry: str, *params: str, repo: Path, env: dict) -> str:
    args = [a for p in params for a in ("-P", p)]
    return sh(MLFLOW, "run", ".", "-e", entry, *args, "--env-manager", "local", "--experiment-name", "mmrecall",
              cwd=repo, env=env)


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    """A fresh repository: the project's files with micro params, no data, no tracking store."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("MLproject", "python_env.yaml", "dvc.yaml", ".gitignore", ".dvcignore", "src"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(MICRO)
    params["prepare"]["workers"] = 1
    params["train"] = {**TINY, "seeds": [1], "steps": 4}
    params["tune"].update(steps=4, eval_every=2, pruner={"kind": "median", "startup_trials": 1, "warmup_evals": 0})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=os.pathsep.join(sys.path),
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "fresh", cwd=repo, env=env)
    return repo, env


TESTED = {"synth", "main", "prepare", "train", "tune", "rerank", "register", "predict"}  # by the tests below


def test_every_entry_point_is_tested():
    entry_points = set(yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"])
    assert entry_points == TESTED


def runs(repo: Path):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["mmrecall"])


@pytest.mark.slow
def test_entry_points_synth_main_rerank_register_predict_prepare_train_tune(project):
    repo, env = project
    mlflow_run("synth", repo=repo, env=env)
    assert (repo / "data" / "train" / "train.tsv").exists()

    mlflow_run("main", repo=repo, env=env)  # dvc add data + dvc repro + report
    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    assert {"wordproto", "mcan-seed1"} <= set(summary)
    found = runs(repo)
    names = list(found["tags.mlflow.runName"])
    assert {"wordproto", "mcan", "mcan-seed1"} <= set(names)  # the stages' runs, in the repository's store
    stage_runs = found[found["tags.dvc_stage"].notna()]
    assert set(stage_runs["tags.dvc_stage"]) >= {"baseline", "train@mcan-1"}

    for entry in ("rerank", "register", "predict"):  # on main's members (one `main` run serves both halves)
        mlflow_run(entry, repo=repo, env=env)
        assert entry in set(runs(repo)["tags.mlflow.project.entryPoint"])

    mlflow_run("prepare", "split=valid", repo=repo, env=env)
    mlflow_run("train", "model=mcan", "seed=2", repo=repo, env=env)
    member = runs(repo).set_index("tags.mlflow.runName").loc["mcan-seed2"]
    assert member["tags.mlflow.project.entryPoint"] == "train"  # the project's run is the member run
    assert member["params.seed"] == "2" and member["metrics.best_ndcg_at_5"] > 0

    out = mlflow_run("tune", "n_trials=4", repo=repo, env=env)
    assert "best valid ndcg_at_5" in out
    found = runs(repo)
    parent = found[found["tags.kind"] == "study"]
    assert len(parent) == 1 and parent.iloc[0]["tags.mlflow.project.entryPoint"] == "tune"
    trials = found[found["tags.mlflow.parentRunId"] == parent.iloc[0].run_id]
    assert sorted(trials["tags.mlflow.runName"]) == [f"trial-{n}" for n in range(4)]
    assert set(trials["tags.state"]) <= {"complete", "pruned"} and "complete" in set(trials["tags.state"])
    assert (repo / "optuna-journal.log").exists()
    best = yaml.safe_load((repo / "best_params.yaml").read_text())
    assert parent.iloc[0]["metrics.best_ndcg_at_5"] == pytest.approx(best["ndcg_at_5"])

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["train"]["best_params"] = True  # the switch
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    mlflow_run("train", "model=mcan", "seed=5", repo=repo, env=env)
    member = runs(repo).set_index("tags.mlflow.runName").loc["mcan-seed5"]
    assert float(member["params.train.focal_alpha"]) == best["params"]["focal_alpha"]
    assert float(member["params.train.focal_gamma"]) == best["params"]["focal_gamma"]
    assert float(member["params.train.schedule.amplitude"]) == best["params"]["amplitude"]


@pytest.mark.slow
def test_tune_and_train_bring_their_inputs_on_a_fresh_clone(project):
    """No data, no features: each entry point makes what it reads through DVC, in any order."""
    repo, env = project
    out = mlflow_run("tune", "n_trials=4", repo=repo, env=env)
    assert "holds no dataset: writing the synthetic one" in out and "dvc repro prepare" in out
    assert (repo / "data.dvc").exists() and (repo / "features" / "valid" / "meta.json").exists()
    found = runs(repo)
    parent = found[found["tags.kind"] == "study"]
    assert len(parent) == 1
    trials = found[found["tags.mlflow.parentRunId"] == parent.iloc[0].run_id]
    assert sorted(trials["tags.mlflow.runName"]) == [f"trial-{n}" for n in range(4)]
    assert (repo / "best_params.yaml").exists()

    out = mlflow_run("train", "model=mcan", "seed=1", repo=repo, env=env)
    assert "holds no dataset" not in out  # the data and features were there: only the member trains
    member = runs(repo).set_index("tags.mlflow.runName").loc["mcan-seed1"]
    assert member["tags.mlflow.project.entryPoint"] == "train" and member["metrics.best_ndcg_at_5"] > 0
    experiment = mlflow.get_experiment_by_name("mmrecall")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # mlflow ui opens on the runs
