"""The `pools` stage's output: the train store's TF-IDF similar queries, built once for every member.

    pools/
      indptr.npy    int64 (n_queries + 1,)   query q's neighbours are indices[indptr[q] : indptr[q + 1]]
      indices.npy   int32                    most similar first, at most `size` per query
      meta.json     size, counts, settings, and a hash of the query texts (checked by every reader)

Queries are the distinct cleaned texts of features/train in first-occurrence order (`group_queries`).
Each train member pads the lists to `size` with random queries drawn from its own seed (`pad_pools`),
so the stored pools do not depend on the seed, and memory is n_queries x size int32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MissingInputError, UserError
from .negatives import Neighbours, group_queries, pool_size, shard_bounds, similar_queries
from .store import ROWS

log = logging.getLogger(__name__)

INDPTR, INDICES, META = "indptr.npy", "indices.npy", "meta.json"


def texts_hash(texts: list[str]) -> str:
    """Fingerprint of the distinct query texts: the pools are only valid for the same queries, in order."""
    digest = hashlib.sha1()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def build(store_root: str | Path, out: str | Path, cap: int, shard_queries: int) -> dict:
    """Similar-query lists of a train feature store, written to `out`; returns the meta."""
    started = time.perf_counter()
    cleaned = pd.read_parquet(Path(store_root) / ROWS, columns=["query_clean"]).query_clean.tolist()
    texts, row_query = group_queries(cleaned)
    if len(texts) < 2:
        raise UserError(f"{store_root}: {len(texts)} distinct queries; negative pools need at least 2")
    groups = np.bincount(row_query)
    size = pool_size(groups, cap)
    shards = len(shard_bounds(len(texts), shard_queries))
    log.info("%d rows, %d queries (largest group %d): %d similar queries per query, in %d shard(s)",
             len(cleaned), len(texts), groups.max(), size, shards)
    neighbours = similar_queries(texts, size, shard_queries)
    counts = np.diff(neighbours.indptr)
    meta = {
        "rows": len(cleaned), "queries": len(texts), "largest_group": int(groups.max()), "size": size, "cap": cap,
        "shard_queries": shard_queries, "shards": shards, "neighbours": int(counts.sum()),
        "short_pools": int((counts < size).sum()), "texts_sha1": texts_hash(texts),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / INDPTR, neighbours.indptr)
    np.save(out / INDICES, neighbours.indices)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load(folder: str | Path, texts: list[str]) -> tuple[Neighbours, int]:
    """(neighbours, pool size) from `folder`, checked against the train queries `texts`."""
    folder = Path(folder)
    if not (folder / META).exists():
        raise MissingInputError(f"{folder}: no negative pools here (run `mmrecall pools` or `dvc repro pools`)")
    meta = json.loads((folder / META).read_text())
    if meta["queries"] != len(texts) or meta["texts_sha1"] != texts_hash(texts):
        raise UserError(f"{folder}: pools were built for other train queries ({meta['queries']} vs {len(texts)}); "
                        "re-run `mmrecall pools`")
    neighbours = Neighbours(np.load(folder / INDPTR), np.load(folder / INDICES))
    return neighbours, int(meta["size"])
