"""Lightning DDP from params: 2 CPU processes (gloo) train a few steps; rank 0 alone writes and logs."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from .test_train import TINY, workdir  # noqa: F401 (fixture)


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_checkpoint(workdir, mlflow_store):
    ddp = {**TINY, "strategy": "ddp", "devices": 2, "accelerator": "cpu", "num_threads": 1, "steps": 4}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "train": ddp}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # Lightning's DDP launcher re-runs this same command for rank 1 (`python -m mmrecall.cli ...`).
    out = subprocess.run([sys.executable, "-m", "mmrecall.cli", "train", "--model", "mcan", "--seed", "3", "--no-progress"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stderr + out.stdout and "MEMBER: 2/2" in out.stderr + out.stdout

    written = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*.pt"))
    assert len(written) == 2 and written[1] == "models/mcan/seed3/model.pt"  # + its one logged-model copy
    assert written[0].startswith("mlruns/") and "/models/m-" in written[0] and written[0].endswith("/artifacts/model.pt")
    assert not list(workdir.rglob("*.ckpt"))  # the finished run leaves no checkpoint to resume
    assert (workdir / "metrics" / "train" / "mcan-seed3.json").exists()
    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["mmrecall"])
    assert sorted(runs["tags.mlflow.runName"]) == ["mcan", "mcan-seed3"]  # no run from rank 1
    member = runs[runs["tags.mlflow.runName"] == "mcan-seed3"].iloc[0]
    assert member["status"] == "FINISHED" and member["params.train.strategy"] == "ddp"
    assert member["params.train.devices"] == "2" and member["metrics.best_step"] in (2, 4)
