"""`mmrecall apply-config`: merge a configuration overlay (configs/*.yaml) into params.yaml (config.apply_overlay)."""

from __future__ import annotations

import argparse
import logging

from ..config import PARAMS_FILE, apply_overlay, find_params_file, user_path

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall apply-config",
        description="Merge a configuration overlay (e.g. configs/faithful.yaml, the original sizes) into "
        "params.yaml, keeping its comments. Sections merge key by key, except the model sections (train.mcan, "
        "train.visualbert, train.two_tower) and each train.overrides.<model>, which the overlay's mapping replaces "
        "whole. `mmrecall params show --model M` prints a model's resulting settings; `git diff params.yaml` "
        "shows the change; `git checkout params.yaml` undoes it.",
    )
    parser.add_argument("overlay", type=user_path, help="YAML file with params.yaml sections to override")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    target = args.params or find_params_file() or PARAMS_FILE
    apply_overlay(args.overlay, target)
    log.info("%s: merged %s", target, args.overlay)
    return 0
