"""`mmrecall prepare`: one split's official TSV -> features/<split>/ (data/ingest.py), bad rows to rejects.tsv."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_params, user_path
from ..errors import UserError
from ..data import store
from ..data.store import FeatureStore
from ..data.ingest import ingest_tsv

log = logging.getLogger(__name__)

REJECTED_WARNING = 0.1  # a split with more rejected rows than this share gets a warning


def first_reject(out: Path) -> str:
    """`line <n>: <reason> (<detail>)` of the store's first reject."""
    line, reason, detail = FeatureStore.open(out).rejects[0]
    return f"line {line}: {reason}" + (f" ({detail})" if detail else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall prepare",
        description="Decode and validate one split's official TSV (data/<split>/<split>.tsv) into a "
        "memory-mapped float16 feature store under features/<split>/. Bad rows go to "
        "features/<split>/rejects.tsv with their line number and reason; good rows are kept.",
    )
    parser.add_argument("--split", required=True, help="train, valid, testA or testB")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--tsv", type=user_path, help="input file (default: <data.root>/<split>/<split>.tsv)")
    parser.add_argument("--out", type=user_path, help="output folder (default: <data.features>/<split>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    data_root = Path(params.data.root)
    tsv = args.tsv or data_root / args.split / f"{args.split}.tsv"
    out = args.out or Path(params.data.features) / args.split
    log.info("%s: reading %s", args.split, tsv)
    summary = ingest_tsv(
        tsv,
        out,
        params.prepare,
        answers=data_root / args.split / f"{args.split}_answer.json",
        train=args.split == "train",
        progress=not args.no_progress,
    )
    mb = summary["bytes"] / 1e6
    log.info(
        "%s: %d/%d rows kept, %d rejected %s, %d boxes, %.1f MB in %.1f s (%.1f MB/s) -> %s",
        args.split, summary["rows_kept"], summary["rows_read"], summary["rows_rejected"],
        summary["rejected_by_reason"] or "", summary["total_boxes"], mb, summary["seconds"],
        mb / max(summary["seconds"], 1e-9), out,
    )
    if summary["rows_rejected"]:
        log.info("%s: rejects in %s", args.split, out / store.REJECTS)
    if not summary["rows_kept"]:  # nothing downstream can use the split: stop here, naming the first bad line
        why = []
        if summary["rows_rejected"]:
            why.append(f"{summary['rows_rejected']} rejected, first {first_reject(out)}; all in {out / store.REJECTS}")
        if summary["rows_filtered_max_boxes"]:
            why.append(f"{summary['rows_filtered_max_boxes']} over prepare.max_boxes_filter")
        raise UserError(f"{tsv}: no row kept of {summary['rows_read']} ({'; '.join(why)})")
    if summary["rows_rejected"] > REJECTED_WARNING * summary["rows_read"]:
        log.warning("%s: %d of %d rows rejected (%s), e.g. %s: is the file in the official format?", args.split,
                    summary["rows_rejected"], summary["rows_read"], summary["rejected_by_reason"], first_reject(out))
    if unranked := summary.get("answer_queries_without_rows"):
        log.warning("%s: %d query(ies) of the answers file have no row kept (e.g. query %s): every NDCG@5 of this "
                    "split counts them 0", args.split, len(unranked), unranked[0])
    return 0
