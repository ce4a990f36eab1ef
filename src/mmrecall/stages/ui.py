"""`mmrecall ui`: `mlflow ui` on the project's store, opened on the experiment's training runs.

MLflow 3's UI starts in its GenAI mode, whose experiment page is an "Overview" of traces (all empty here);
the experiment's tag `mlflow.experimentKind` does not override that mode, but the link's
`workflowType=machine_learning` does (and the browser remembers it). This prints that link, then runs
`mlflow ui` on the store the pipeline logs to ($MLFLOW_TRACKING_URI, else <repo>/mlflow.db).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from .. import tracking
from ..config import load_params, user_path
from ..errors import UserError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall ui",
        description="Run `mlflow ui` on the project's tracking store (127.0.0.1:5000 by default) and print the link "
        "that opens the experiment on its training runs. With a tracking server in $MLFLOW_TRACKING_URI, only "
        "print the link to it.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--print-url", action="store_true", help="print the link and exit (no server)")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    exp_id = tracking.setup(params.tracking.experiment)
    uri = tracking.tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{args.host}:{args.port}"
    url = tracking.experiment_url(base, exp_id)
    print(url, flush=True)
    if args.print_url or base == uri.rstrip("/"):
        return 0
    beside = Path(sys.executable).parent / "mlflow"  # the environment mmrecall runs in (.venv/bin), activated or not
    mlflow = str(beside) if beside.exists() else shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the `mlflow` command is not installed here (make install, then .venv/bin/mmrecall ui)")
    log.info("open %s (Ctrl-C stops the server)", url)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "-h", args.host, "-p", str(args.port)])
    return 0  # not reached: the process is now `mlflow ui`
