"""One split's official TSV -> a memory-mapped feature store (store.py), validating every row.

The file is cut into spans of whole lines of about `chunk_bytes` each. With `workers` > 1 a
process pool reads, decodes and validates spans while the main process writes the previous ones in
order. The main process only finds the span boundaries, so no TSV bytes go through the pool's
pipes; at most `workers + 1` spans are in flight, so peak memory depends on the chunk size, never
on the file size.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import PrepareParams
from ..console import show_bars
from . import store
from .store import FeatureStore
from .text import clean_query
from .tsv import FEATURE_DIM, Chunk, check_header, line_spans, parse_span

ROW_SCHEMA = pa.schema(
    [
        ("product_id", pa.int64()),
        ("query_id", pa.int64()),
        ("query", pa.string()),
        ("query_clean", pa.string()),
        ("num_boxes", pa.int32()),
        ("n_kept", pa.int32()),
        ("offset", pa.int64()),
        ("image_h", pa.int32()),
        ("image_w", pa.int32()),
        ("line", pa.int64()),
    ]
)


def rows_table(chunk: Chunk, offsets: np.ndarray, first_line: int) -> pa.Table:
    """The store's rows of a parsed chunk: ids, query (raw and cleaned), box counts and offsets, file line."""
    return pa.table(
        {
            "product_id": chunk.product_id,
            "query_id": chunk.query_id,
            "query": chunk.query,
            "query_clean": [clean_query(q) for q in chunk.query],
            "num_boxes": chunk.num_boxes,
            "n_kept": chunk.n_kept,
            "offset": offsets,
            "image_h": chunk.image_h,
            "image_w": chunk.image_w,
            "line": first_line + np.asarray(chunk.line, dtype=np.int64),
        },
        schema=ROW_SCHEMA,
    )


def in_memory_store(chunk: Chunk) -> FeatureStore:
    """A feature store of a parsed chunk held in memory (the registered model's requests): no files."""
    counts = np.asarray(chunk.n_kept, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(chunk) else np.zeros(0, np.int64)
    rows = rows_table(chunk, offsets, first_line=0).to_pandas()
    return FeatureStore.in_memory(rows, chunk.features, chunk.boxes, chunk.labels)


def reject_repeated_candidates(chunk: Chunk, seen: dict[tuple[int, int], int], first_line: int) -> Chunk:
    """An evaluation split ranks each (query, product) pair once: a pair's later rows become rejects.

    `seen` maps each pair already kept to its file line (updated here); `first_line` is the file line of the
    chunk's line 0. The official files hold no repeated pair; a repeat would show one product twice in a top 5.
    """
    keep = np.ones(len(chunk), dtype=bool)
    for i, pair in enumerate(zip(chunk.query_id, chunk.product_id)):
        if pair in seen:
            keep[i] = False
            chunk.rejects.append((chunk.line[i], "repeated_candidate",
                                  f"query_id {pair[0]} product_id {pair[1]} first on line {seen[pair]}"))
        else:
            seen[pair] = first_line + chunk.line[i]
    if keep.all():
        return chunk
    chunk.rejects.sort()
    return chunk.select(keep)


def ingest_tsv(
    tsv: Path,
    out_dir: Path,
    params: PrepareParams,
    answers: Path | None = None,
    train: bool = False,
    progress: bool = True,
) -> dict:
    """Write the feature store of one TSV into out_dir (replaced whole); return its summary.

    Every bad row is a reject (features/<split>/rejects.tsv), and so is, outside train, a repeat of a
    (query_id, product_id) pair already read.
    """
    tsv, out_dir = Path(tsv), Path(out_dir)
    total_bytes = tsv.stat().st_size if tsv.exists() else 0
    data_start = check_header(tsv)  # before anything is written
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    max_boxes = params.max_boxes_filter if train else 0

    started = time.perf_counter()
    reasons: Counter[str] = Counter()
    rows_read = rows_kept = filtered = offset = 0
    seen: dict[tuple[int, int], int] = {}  # evaluation splits: (query_id, product_id) -> file line
    first_line = 2  # file line of the next chunk's first line (line 1 is the header)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"prepare {tsv.name}", disable=not show_bars(progress))
    with (
        open(out_dir / store.FEATURES, "wb") as f_feat,
        open(out_dir / store.BOXES, "wb") as f_box,
        open(out_dir / store.LABELS, "wb") as f_lab,
        open(out_dir / store.REJECTS, "w") as f_rej,
        pq.ParquetWriter(out_dir / store.ROWS, ROW_SCHEMA) as rows_writer,
    ):
        f_rej.write("line\treason\tdetail\n")

        def write(chunk: Chunk) -> None:
            """Append a chunk parsed with line numbers counted from 0 at its start."""
            nonlocal rows_read, rows_kept, filtered, offset, first_line
            if not train:
                chunk = reject_repeated_candidates(chunk, seen, first_line)
            n = len(chunk)
            counts = np.asarray(chunk.n_kept, dtype=np.int64)
            offsets = offset + np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, np.int64)
            f_feat.write(np.ascontiguousarray(chunk.features))
            f_box.write(np.ascontiguousarray(chunk.boxes))
            f_lab.write(np.ascontiguousarray(chunk.labels))
            rows_writer.write_table(rows_table(chunk, offsets, first_line))
            for line, reason, detail in chunk.rejects:
                f_rej.write(f"{first_line + line}\t{reason}\t{detail}\n")
                reasons[reason] += 1
            rows_read += chunk.rows_read
            rows_kept += n
            filtered += chunk.filtered
            offset += int(counts.sum())
            first_line += chunk.lines
            bar.update(chunk.nbytes)
            bar.set_postfix(rows=rows_kept, rejected=sum(reasons.values()), refresh=False)

        spans = line_spans(tsv, data_start, params.chunk_bytes)
        if params.workers <= 1:
            for start, end in spans:
                write(parse_span(tsv, start, end, params.box_cap, max_boxes))
        else:
            with ProcessPoolExecutor(params.workers) as pool:
                pending: deque = deque()
                for start, end in spans:
                    pending.append(pool.submit(parse_span, tsv, start, end, params.box_cap, max_boxes))
                    if len(pending) > params.workers:
                        write(pending.popleft().result())
                while pending:
                    write(pending.popleft().result())
    bar.close()

    unranked: list[int] = []  # queries of the answers file with no row kept: every NDCG@5 counts them 0
    if answers is not None and answers.exists():
        given = store.load_answers(answers)  # a malformed file stops here, naming it
        kept = set(pq.read_table(out_dir / store.ROWS, columns=["query_id"]).column(0).to_pylist())
        unranked = sorted(set(given) - kept)
        shutil.copyfile(answers, out_dir / store.ANSWERS)
    seconds = time.perf_counter() - started
    summary = {
        "source": str(tsv),
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rows_filtered_max_boxes": filtered,
        "total_boxes": offset,
        "feature_dim": FEATURE_DIM,
        "box_cap": params.box_cap,
        "max_boxes_filter": max_boxes,
        "bytes": total_bytes,
        "seconds": round(seconds, 3),
        "has_answers": (out_dir / store.ANSWERS).exists(),
        **({"answer_queries_without_rows": unranked} if unranked else {}),
    }
    (out_dir / store.META).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
