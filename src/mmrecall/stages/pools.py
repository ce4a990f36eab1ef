"""`mmrecall pools`: the train store's TF-IDF similar-query pools (data/pools.py), once for every train member."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_params, user_path
from ..data import pools

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall pools",
        description="Find the most similar train queries of every train query (binary TF-IDF cosine, the 1st "
        "place's hard-negative pools), at most params pools.cap per query, within shards of "
        "pools.shard_queries queries. Writes pools/ (data.pools); every train member draws its hard "
        "negatives from it.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--out", type=user_path, help="output folder (default: data.pools)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = args.out or Path(params.data.pools)
    meta = pools.build(Path(params.data.features) / "train", out, params.pools.cap, params.pools.shard_queries)
    log.info("%d queries: %d similar queries stored (%d pools shorter than %d, padded by each member) in %.1f s -> %s",
             meta["queries"], meta["neighbours"], meta["short_pools"], meta["size"], meta["seconds"], out)
    return 0
