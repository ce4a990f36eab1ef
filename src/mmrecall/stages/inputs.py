"""`mmrecall inputs --for <command>`: make what a command reads, through DVC, so that it runs on a fresh clone.

`mlflow run . -e <command>` calls it first (MLproject): with no data it writes the synthetic dataset (as
`make repro` does), tracks data/ (`dvc add data`), then `dvc repro`s the stages whose outputs the command
reads (nothing runs that is already up to date). The stages run outside the `mlflow run` project run, which
stays for the command itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from pathlib import Path

from ..config import load_params, user_path
from ..data.synth import generate
from ..errors import UserError

log = logging.getLogger(__name__)

# The DVC stages whose outputs a command reads (dvc repro also runs everything they depend on).
NEEDS = {
    "prepare": [],
    "baseline": ["prepare"],
    "pools": ["prepare"],
    "train": ["prepare", "pools"],
    "tune": ["prepare", "pools"],
    "evaluate": ["baseline", "train"],
    "smooth": ["train"],
    "rerank": ["smooth"],
    "register": ["rerank"],
    "predict": ["register"],
    "summary": ["predict", "evaluate"],
}


def dvc(*args: str) -> None:
    """Run dvc in the repository; the stages open MLflow runs of their own, never the `mlflow run` one."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    log.info("dvc %s", " ".join(args))
    done = subprocess.run(["dvc", *args], env=env)
    if done.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}); its output is above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall inputs",
        description="Bring the inputs of a command through DVC: synthetic data when data/ has none (params "
        "`synth`), `dvc add data`, then `dvc repro` of the stages the command reads from. The MLproject entry "
        "points call it before their command, so that each works on a fresh clone in any order.",
    )
    parser.add_argument("--for", dest="command", required=True, choices=sorted(NEEDS), help="the command to prepare for")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    root = Path(params.data.root)
    if not (root / "train" / "train.tsv").exists():
        log.info("%s/ holds no dataset: writing the synthetic one (params.yaml: synth)", root)
        generate(root, params.synth, progress=False)
    dvc("add", str(root), "--quiet")
    if NEEDS[args.command]:
        dvc("repro", *NEEDS[args.command])
    return 0
