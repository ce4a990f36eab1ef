"""Shared fixtures: micro synthetic data, an isolated MLflow store per test, git identity."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mmrecall.config import SynthParams
from mmrecall.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def bench_script(name: str) -> ModuleType:
    """bench/<name>.py imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MICRO = dict(train_queries=150, valid_queries=16, test_queries=16, seed=7)

os.environ.update(
    DVC_NO_ANALYTICS="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="true",
    GIT_AUTHOR_NAME="mmrecall tests",
    GIT_AUTHOR_EMAIL="tests@mmrecall.local",
    GIT_COMMITTER_NAME="mmrecall tests",
    GIT_COMMITTER_EMAIL="tests@mmrecall.local",
)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """A micro synthetic dataset in the official layout (generated once per session)."""
    root = tmp_path_factory.mktemp("micro") / "data"
    generate(root, SynthParams(**MICRO), progress=False)
    return root


@pytest.fixture
def micro_copy(micro_data, tmp_path) -> Path:
    """A private copy of the micro data for tests that write next to it."""
    shutil.copytree(micro_data, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch) -> Iterator[str]:
    """Every test logs into its own sqlite store, never the repo's mlflow.db."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    leaky = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME")
    for var in leaky:
        monkeypatch.delenv(var, raising=False)
    yield uri
    # `mlflow.set_experiment` exports MLFLOW_EXPERIMENT_ID; monkeypatch only restores what it removed.
    for var in leaky:
        os.environ.pop(var, None)
