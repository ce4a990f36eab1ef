"""`mmrecall <command>`: one subcommand per pipeline stage, each the `main()` of mmrecall/stages/<command>.py.

dvc.yaml, MLproject, the Makefile and the tests all call these same entry points. The CLI sets up
logging (one line per milestone on stderr), runs the command from the repository root (the folder of
params.yaml, found from any folder below it), and turns an expected user error (a bad data file,
submission or params, a missing stage input) into one line `mmrecall <command>: error: <message>` with
exit code 1. `--debug` (anywhere on the line) shows the traceback and debug logging instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path

from . import config
from .errors import UserError

log = logging.getLogger("mmrecall.cli")  # (not __name__: that is __main__ under `python -m mmrecall.cli`)

COMMANDS = {
    "synth": "write a synthetic dataset in the official format and layout",
    "prepare": "decode + validate one split's TSV into the memory-mapped feature store",
    "pools": "TF-IDF similar-query pools of the train store (the members' hard negatives)",
    "baseline": "fit and score the wordproto floor, log it to MLflow",
    "train": "train one ranker member (model x seed), logged to MLflow",
    "tune": "Optuna study over focal alpha/gamma and the schedule amplitude; writes best_params.yaml",
    "evaluate": "NDCG@5 of a submission / score table, or of every model (the stage)",
    "gather": "members trained elsewhere, from the tracking store: checkpoints + valid/testA scores",
    "smooth": "re-score members on KNN-smoothed box features (solo team)",
    "rerank": "ensemble + LightGBM re-ranker on valid, query-grouped K-fold (honest NDCG@5)",
    "register": "log the ranker as an MLflow pyfunc, register it, move `champion` on improvement",
    "predict": "submission.csv for testA (testB) through the registered champion",
    "summary": "metrics JSON + markdown table of members, ensemble, re-ranker, smoothing, post-proc",
    "report": "print the metrics tables of the last `dvc repro`",
    "apply-config": "merge a configuration overlay such as configs/faithful.yaml into params.yaml",
    "params": "`params show [--model M]`: the loaded params, or a model's effective train settings (YAML)",
    "inputs": "make what a command reads through DVC (synthetic data, dvc repro of its upstream stages)",
    "ui": "mlflow ui on the project's store, with the link that opens the experiment on its training runs",
}


def module_name(command: str) -> str:
    """The stage module of a command: `apply-config` -> mmrecall.stages.apply_config."""
    return f"mmrecall.stages.{command.replace('-', '_')}"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    return (
        "usage: mmrecall [--debug] <command> [options]\n\n"
        "KDD Cup 2020 Multimodalities Recall pipeline (see README.md).\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`mmrecall <command> --help` explains each command's options; --debug shows tracebacks.\n"
    )


def setup_logging(debug: bool = False) -> None:
    """One readable line per message on stderr: `13:52:01 train: mcan-seed1: ...`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(short)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_short_name)
    root = logging.getLogger("mmrecall")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _short_name(record: logging.LogRecord) -> bool:
    record.short = record.name.rpartition(".")[2]  # mmrecall.stages.train -> train
    return True


def enter_repo_root() -> None:
    """Run from the folder of params.yaml (the pipeline's paths are relative to it); user paths stay valid."""
    found = config.find_params_file()
    here = Path.cwd().resolve()
    if found is not None and found.parent != here:
        config.invoked_from = here
        os.chdir(found.parent)
        log.debug("working in %s (the folder of %s)", found.parent, config.PARAMS_FILE)


def is_pipeline_step(command: str, rest: list[str]) -> bool:
    """A stage of the pipeline (its start and end are logged), not a one-off lookup such as scoring one file."""
    return command not in ("report", "apply-config", "params", "ui") and "--submission" not in rest and not {"-h", "--help"} & set(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmrecall: unknown command {command!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    setup_logging(debug)
    started = time.perf_counter()
    try:
        enter_repo_root()
        module = importlib.import_module(module_name(command))
        level = logging.INFO if is_pipeline_step(command, rest) else logging.DEBUG
        log.log(level, "mmrecall %s: start", " ".join([command, *rest]))
        code = int(module.main(rest) or 0)
        log.log(level, "mmrecall %s: %s in %.1f s", command, "done" if code == 0 else f"exit {code}",
                time.perf_counter() - started)
        return code
    except (UserError, OSError) as e:
        if debug:
            raise
        print(f"mmrecall {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmrecall {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
