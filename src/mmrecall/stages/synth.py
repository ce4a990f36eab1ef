"""`mmrecall synth`: write the synthetic dataset (data/synth.py) where params `data.root` points."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..config import load_params, user_path
from ..data.synth import WORLDS, generate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall synth",
        description="Write a synthetic dataset in the official KDD Cup 2020 format and layout "
        "(data/train/train.tsv, data/valid/valid.tsv + valid_answer.json, data/testA/testA.tsv + "
        "testA_answer.json, data/multimodal_labels.txt). Sizes and seed come from the `synth` "
        "section of params.yaml; the same seed gives byte-identical files.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--out", type=user_path, help="output folder (default: data.root from params)")
    parser.add_argument("--seed", type=int, help="override synth.seed")
    parser.add_argument("--train-queries", type=int, help="override synth.train_queries")
    parser.add_argument("--world", choices=sorted(WORLDS), default="default",
                        help="a named variation of the params' world, harder in one known way (near-miss: half "
                        "the negatives one attribute off; looks: per-category attribute looks; noise: 2x feature "
                        "noise; small: half the train queries; clutter: product box rarely first, look-alike "
                        "clutter; scene: half the images show the product small beside a large clutter box; "
                        "hard: milder versions of the first five, 1,500 train queries)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    synth = dataclasses.replace(params.synth, **WORLDS[args.world])
    if args.seed is not None:
        synth.seed = args.seed
    if args.train_queries is not None:
        synth.train_queries = args.train_queries
    out = args.out or Path(params.data.root)
    log.info("writing the %s synthetic world (seed %d, %d train queries) to %s", args.world, synth.seed,
             synth.train_queries, out)
    counts = generate(out, synth, progress=not args.no_progress)
    log.info("done: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
