"""End to end: `dvc repro` in a fresh git + DVC repo on micro data, twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from mmrecall.ranking.members import score
from mmrecall.ranking.ranker import candidate_store, read_candidates

from .conftest import MICRO, ROOT, bench_script
from .test_train import TINY


def sh(*cmd: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def break_query(path: Path) -> int:
    """Make every row of the file's first query a bad row (features that are not base64); return its id."""
    lines = path.read_text().splitlines()
    query = lines[1].rsplit("\t", 1)[1]
    break_row = bench_script("break_rows").break_row
    for i, line in enumerate(lines[1:], 1):
        if line.rsplit("\t", 1)[1] == query:
            lines[i] = break_row(line)
    path.write_text("\n".join(lines) + "\n")
    return int(query)


@pytest.fixture
def repo(tmp_path, micro_data) -> tuple[Path, dict]:
    """A temp git + DVC repo with the project's pipeline files, micro params and the micro data."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "src"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(MICRO)
    params["prepare"]["workers"] = 1
    params["train"] = {**TINY, "seeds": [1, 2], "steps": 4}  # one model x 2 seeds
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(micro_data, repo / "data")
    for split in ("valid", "testA"):  # one query's rows all bad: the pipeline goes on, and writes its line
        break_query(repo / "data" / split / f"{split}.tsv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_TRACKING", "MLFLOW_EXPERIMENT", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    sh("dvc", "add", "data", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "micro", cwd=repo, env=env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo):
    repo, env = repo
    sh("dvc", "repro", cwd=repo, env=env)

    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    for split in ("valid", "testA"):
        assert 0.0 < summary["wordproto"][split]["ndcg_at_5"] <= 1.0
        assert "ndcg_at_5_pp" in summary["wordproto"][split]
    assert "wordproto" in (repo / "reports" / "metrics.md").read_text()

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # the absolute default URI of tracking.py
    runs = mlflow.search_runs(experiment_names=["mmrecall"])
    assert sorted(runs["tags.mlflow.runName"]) == ["mcan", "mcan-seed1", "mcan-seed2", "register", "rerank", "wordproto"]
    by_name = runs.set_index("tags.mlflow.runName")
    parent = by_name.loc["mcan"]
    members = [by_name.loc[f"mcan-seed{s}"] for s in (1, 2)]
    for seed, member in zip((1, 2), members):
        assert member["tags.mlflow.parentRunId"] == parent["run_id"]
        assert member["tags.dvc_stage"] == f"train@mcan-{seed}" and member["params.seed"] == str(seed)
        assert member["metrics.best_ndcg_at_5"] == summary[f"mcan-seed{seed}"]["valid"]["ndcg_at_5"]
        assert (repo / "models" / "mcan" / f"seed{seed}" / "model.pt").exists()
        assert (repo / "outputs" / f"mcan-seed{seed}" / "testA_fused.npy").exists()
    values = [m["metrics.best_ndcg_at_5"] for m in members]
    assert parent["metrics.ndcg_at_5_mean"] == pytest.approx(sum(values) / 2)
    assert parent["metrics.members"] == 2
    run = by_name.loc["wordproto"]
    assert run.name == "wordproto" and run["tags.dvc_stage"] == "baseline"
    assert run["metrics.ndcg_at_5"] == summary["wordproto"]["valid"]["ndcg_at_5"]
    assert run["tags.dvc_stage"] == "baseline"
    data_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert run["tags.data_md5"] == data_md5
    assert len(run["tags.git_commit"]) == 40

    # Stage 2: smoothing, re-ranker, registered champion, submission, summary table.
    stage2 = json.loads((repo / "metrics" / "stage2.json").read_text())
    assert {"rerank", "ensemble", "mcan-seed1+knn", "submission", "check", "register"} <= set(stage2)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("mmrecall-ranker", "champion")
    rule = json.loads((repo / "metrics" / "rerank.json").read_text())["submission"]  # the best on valid of four
    assert rule["valid"][rule["rule"]] == max(rule["valid"].values()) and len(rule["valid"]) == 4
    assert stage2["submission_rule"] == champion.tags["submission_rule"] == rule["rule"]
    assert f"submission.csv ranks by `{rule['rule']}`" in (repo / "reports" / "stage2.md").read_text()
    assert champion.tags["data_md5"] == data_md5 and float(champion.tags["ndcg_at_5_valid_oof"]) > 0
    # Its members came from their logged models: the version names their runs, and each member loaded from its
    # logged model scores like the registered ranker's copy of it.
    ranker = mlflow.pyfunc.load_model("models:/mmrecall-ranker@champion").unwrap_python_model().ranker
    table = read_candidates(repo / "data" / "testA" / "testA.tsv")
    small = table[table.query_id.isin(table.query_id.unique()[1:3])]  # (the first query: bad rows)
    for seed, member in zip((1, 2), members):
        name = f"mcan-seed{seed}"
        ids = json.loads((repo / "metrics" / "train" / f"{name}.json").read_text())["logged_model"]
        assert champion.tags[f"member.{name}.run_id"] == ids["run_id"] == member["run_id"]
        alone = mlflow.pyfunc.load_model(f"models:/{ids['model_id']}").predict(small)["score"].to_numpy()
        inside, _ = score(ranker.members[name], candidate_store(small))
        np.testing.assert_allclose(alone, inside.score.to_numpy(), rtol=1e-6)
    submission = (repo / "submission.csv").read_text().splitlines()
    assert submission[0] == "query-id,product1,product2,product3,product4,product5" and len(submission) == 1 + MICRO["test_queries"]
    # The first query of valid and of testA lost all its rows in prepare: valid's counts 0 in every NDCG@5, and
    # testA's line holds its own (rejected) candidates.
    valid_meta = json.loads((repo / "features" / "valid" / "meta.json").read_text())
    assert valid_meta["rows_rejected"] > 0 and len(valid_meta["answer_queries_without_rows"]) == 1
    predicted = json.loads((repo / "metrics" / "predict.json").read_text())["testA"]
    assert predicted["queries_without_rows"] == 1 and predicted["unscored_candidates"] == 5
    assert (repo / "plots" / "ndcg_at_5" / "mcan-seed1.csv").exists() and (repo / "plots" / "lr" / "mcan-seed2.csv").exists()
    assert "ensemble + re-ranker" in sh("mmrecall", "report", cwd=repo, env=env)

    again = sh("dvc", "repro", cwd=repo, env=env)  # nothing changed: nothing runs, nothing is logged
    assert "Running stage" not in again and "up to date" in again
    assert len(mlflow.search_runs(experiment_names=["mmrecall"])) == 6

    # DVC's experiment loop: the metrics and dvc.lock are committed (metrics/ is not git-ignored), so an
    # experiment compares against that baseline.
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "baseline", cwd=repo, env=env)
    assert "metrics/train/mcan-seed1.json" in sh("git", "ls-files", "metrics", cwd=repo, env=env)
    sh("dvc", "exp", "run", "-S", "train.steps=2", cwd=repo, env=env)
    diff = sh("dvc", "metrics", "diff", "--json", cwd=repo, env=env)
    changed, _ = json.JSONDecoder().raw_decode(diff[diff.index("{"):])
    assert "metrics/train/mcan-seed1.json" in changed and "steps" in changed["metrics/train/mcan-seed1.json"]
    assert changed["metrics/train/mcan-seed1.json"]["steps"] == {"old": 4, "new": 2, "diff": -2}
    shown = sh("dvc", "exp", "show", "--csv", cwd=repo, env=env)
    assert "train.steps" in shown and "workspace" in shown and "valid.ndcg_at_5" in shown
