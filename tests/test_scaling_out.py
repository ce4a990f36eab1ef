"""Members trained in two clones, assembled and registered in a third, all through one real `mlflow server`.

The server is a local `mlflow server` (sqlite backend, --serve-artifacts, 127.0.0.1 on a free port, in a temp
folder, stopped at the end). Clones A and B each train one tiny member against it; clone C trains nothing:
`mmrecall gather` fetches both members from their logged models and scores valid / testA with them, then
`mmrecall rerank` and `mmrecall register`; `mlflow models predict` scores an official candidate file through
models:/mmrecall-ranker@champion on that server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from mmrecall import cli
from mmrecall.config import PostprocessParams
from mmrecall.ranking import postprocess, reranker
from mmrecall.ranking.ranker import read_candidates
from mmrecall.stages import pools, prepare

from .conftest import ROOT
from .test_train import TINY

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def sh(*cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts; its URL."""
    home = tmp_path / "server"
    home.mkdir()
    port = free_port()
    cmd = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)  # the server and its workers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.fixture
def origin(tmp_path, micro_data, monkeypatch) -> Path:
    """The shared repository: project files, tiny params, micro data tracked by DVC, features prepared."""
    repo = tmp_path / "origin"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "src"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["workers"] = 1
    params["train"] = {**TINY, "seeds": [1, 2], "steps": 4}
    params["rerank"].update(members=["mcan"], folds=4, pca_dims=2)
    params["rerank"]["lgbm"].update(min_data_in_leaf=5, num_boost_round=50, early_stopping_rounds=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(micro_data, repo / "data")
    env = git_env()
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    sh("dvc", "add", "data", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "origin", cwd=repo, env=env)
    monkeypatch.chdir(repo)
    for split in ("train", "valid", "testA"):
        prepare.main(["--split", split, "--no-progress"])
    pools.main([])
    return repo


def git_env(tracking_uri: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=os.pathsep.join(sys.path),
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def clone(origin: Path, dest: Path) -> Path:
    """`git clone` + what `dvc pull` would bring (the data, the prepared features and the pools)."""
    sh("git", "clone", "-q", str(origin), str(dest), cwd=origin.parent, env=git_env())
    for folder in ("data", "features", "pools"):
        shutil.copytree(origin / folder, dest / folder)
    return dest


def mmrecall(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmrecall.cli", *args]


@pytest.mark.slow
def test_members_from_two_clones_registered_from_a_third(origin, server, tmp_path, monkeypatch):
    env = git_env(server)
    a, b, c = (clone(origin, tmp_path / name) for name in ("clone-a", "clone-b", "clone-c"))
    trainers = [subprocess.Popen(mmrecall("train", "--model", "mcan", "--seed", seed, "--no-progress"), cwd=repo,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for repo, seed in ((a, "1"), (b, "2"))]
    for proc in trainers:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    recorded = {m: json.loads((repo / "metrics" / "train" / f"{m}.json").read_text())["logged_model"]
                for repo, m in ((a, "mcan-seed1"), (b, "mcan-seed2"))}

    # Clone C (in this process, to save three interpreter starts): its commands as the CLI runs them.
    monkeypatch.chdir(c)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    assert cli.main(["gather"]) == 0  # nothing recorded in C: found by member name and data hash
    assert cli.main(["rerank", "--no-progress"]) == 0
    assert cli.main(["register"]) == 0
    assert not (c / "checkpoints").exists()  # C trained nothing
    for member, ids in recorded.items():
        assert json.loads((c / "metrics" / "train" / f"{member}.json").read_text())["logged_model"] == ids
    for member, repo in (("mcan-seed1", a), ("mcan-seed2", b)):  # C's member scores = the trainer's
        pd.testing.assert_frame_equal(pd.read_parquet(c / "outputs" / member / "valid.parquet"),
                                      pd.read_parquet(repo / "outputs" / member / "valid.parquet"), rtol=1e-5)

    mlflow.set_tracking_uri(server)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("mmrecall-ranker", "champion")
    for member, ids in recorded.items():
        assert version.tags[f"member.{member}.run_id"] == ids["run_id"]
        assert version.tags[f"member.{member}.model_id"] == ids["model_id"]
    assert client.get_run(version.run_id).info.run_name == "register"
    assert client.get_run(version.tags["rerank_run_id"]).info.run_name == "rerank"
    exp = mlflow.get_experiment_by_name("mmrecall")
    listed = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert {"mcan-seed1", "mcan-seed2"} <= {m.name for m in listed}
    seed1 = next(m for m in listed if m.model_id == recorded["mcan-seed1"]["model_id"])
    assert seed1.source_run_id == recorded["mcan-seed1"]["run_id"] and seed1.params["seed"] == "1"
    assert any(m.key == "best_ndcg_at_5" for m in seed1.metrics)

    # An official candidate file (two whole queries of testA), as the CSV the pyfunc's signature reads.
    table = read_candidates(c / "data" / "testA" / "testA.tsv")
    small = table[table.query_id.isin(table.query_id.unique()[:2])]
    small.to_csv(tmp_path / "candidates.csv", index=False)
    sh(MLFLOW, "models", "predict", "-m", "models:/mmrecall-ranker@champion", "-i", str(tmp_path / "candidates.csv"),
       "-t", "csv", "-o", str(tmp_path / "pred.json"), "--env-manager", "local", cwd=tmp_path, env=env)
    got = [row["score"] for row in json.loads((tmp_path / "pred.json").read_text())["predictions"]]
    saved = reranker.load(c / "models" / "rerank")  # the served ranker ranks by the rule C's rerank chose
    rule = saved.spec["submission"]
    ruled = pd.read_parquet(c / "outputs" / rule["scores"] / "testA.parquet")
    if rule["postprocess"]:
        kept = postprocess.apply(ruled, PostprocessParams(**saved.spec["postprocess"]), saved.counts)
        ruled = ruled.assign(score=postprocess.demoted(ruled, kept))
    expected = ruled.set_index(["query_id", "product_id"]).loc[list(zip(small.query_id, small.product_id)), "score"]
    np.testing.assert_allclose(got, expected.to_numpy(), rtol=1e-4, atol=1e-6)  # the served ranker = C's outputs
