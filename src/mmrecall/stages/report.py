"""`mmrecall report`: print the metrics tables written by the evaluate and summary stages (the end of `make repro`)."""

from __future__ import annotations

import argparse

from ..errors import MissingInputError
from .evaluate import REPORT
from .summary import REPORT as STAGE2_REPORT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmrecall report", description=f"Print {REPORT} and {STAGE2_REPORT} (written by `dvc repro`).")
    parser.parse_args(argv)
    if not REPORT.exists():
        raise MissingInputError(f"{REPORT}: not found; run `dvc repro` (or `make repro`) first")
    print(REPORT.read_text(), end="")
    if STAGE2_REPORT.exists():  # written by the summary stage
        print("\n" + STAGE2_REPORT.read_text(), end="")
    return 0

