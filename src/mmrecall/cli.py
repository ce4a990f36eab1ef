"""`mmrecall <stage>`: one subcommand per pipeline stage, each the stage module's own `main()`.

dvc.yaml, MLproject, the Makefile and the tests all call these same entry points.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "synth": ("synth", "write a synthetic dataset in the official format and layout"),
    "prepare": ("prepare", "decode + validate one split's TSV into the memory-mapped feature store"),
    "baseline": ("baseline", "fit and score the wordproto floor, log it to MLflow"),
    "train": ("train", "train one ranker member (model x seed), logged to MLflow"),
    "tune": ("tune", "Optuna study over focal alpha/gamma and the schedule amplitude; writes best_params.yaml"),
    "evaluate": ("evaluate", "NDCG@5 of a submission / score table, or of every model (the stage)"),
    "smooth": ("smoothing", "re-score every member on KNN-smoothed box features (solo team)"),
    "rerank": ("rerank", "ensemble + LightGBM re-ranker on valid, query-grouped K-fold (honest NDCG@5)"),
    "register": ("register", "log the ranker as an MLflow pyfunc, register it, move `champion` on improvement"),
    "predict": ("predict", "submission.csv for testA (testB) through the registered champion"),
    "summary": ("summary", "metrics JSON + markdown table of members, ensemble, re-ranker, smoothing, post-proc"),
    "report": ("report", "print the metrics table of the last `dvc repro`"),
    "apply-config": ("config", "merge a configuration overlay such as configs/faithful.yaml into params.yaml"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    return (
        "usage: mmrecall <command> [options]\n\n"
        "KDD Cup 2020 Multimodalities Recall pipeline (see README.md).\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`mmrecall <command> --help` explains each command's options.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in STAGES:
        print(f"mmrecall: unknown command {command!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mmrecall.{STAGES[command][0]}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
