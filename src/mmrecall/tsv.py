"""The organisers' TSV format: columns, encoding, and a validating chunk parser.

Nine tab-separated columns with a header row (spec §1.2):
``product_id image_h image_w num_boxes boxes features class_labels query query_id``
where ``boxes`` is base64 float32 [n, 4] (top, left, bottom, right in pixels), ``features`` base64
float32 [n, 2048] and ``class_labels`` base64 int64 [n]. Queries are read with quoting off: real
queries contain ``"``. The parser never raises on a bad row: it reports the row (line number and
reason) and keeps every good row of the chunk.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMNS = (
    "product_id",
    "image_h",
    "image_w",
    "num_boxes",
    "boxes",
    "features",
    "class_labels",
    "query",
    "query_id",
)
HEADER = "\t".join(COLUMNS)
FEATURE_DIM = 2048
BOX_DIM = 6  # normalised top, left, bottom, right, area, aspect (spec §3.2)
NUM_LABELS = 33  # class ids 0..32 (multimodal_labels.txt)

# Reasons a row is rejected; the rejects file and the summary use these names.
REJECT_REASONS = (
    "column_count",  # not 9 tab-separated fields
    "bad_int",  # product_id, image_h, image_w, num_boxes or query_id is not an integer (or not > 0)
    "bad_base64",  # boxes, features or class_labels does not decode
    "length_mismatch",  # a decoded array does not hold num_boxes rows
    "label_out_of_range",  # a class label outside 0..32
    "non_finite",  # NaN or inf in the features
    "empty_query",
)


class DataFileError(ValueError):
    """A data file is missing, empty or not in the official format (the message names the file)."""


def encode_row(
    product_id: int,
    image_h: int,
    image_w: int,
    boxes: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    query: str,
    query_id: int,
) -> str:
    """One TSV line (without newline) in the official encoding."""
    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")  # noqa: E731
    return "\t".join(
        (
            str(product_id),
            str(image_h),
            str(image_w),
            str(len(labels)),
            b64(boxes.astype("<f4")),
            b64(features.astype("<f4")),
            b64(labels.astype("<i8")),
            query,
            str(query_id),
        )
    )


def check_header(path: Path) -> int:
    """Fail clearly on a missing, empty or header-less file; return the header's length in bytes."""
    if not path.exists():
        raise DataFileError(f"{path}: file not found")
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    if not first.strip():
        raise DataFileError(f"{path}: file is empty")
    fields = first.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
    if tuple(fields) != COLUMNS:
        if fields and fields[0].strip().isdigit():
            raise DataFileError(f"{path}: line 1 is a data row; the header row {HEADER!r} is missing")
        raise DataFileError(f"{path}: line 1 is {first[:200]!r}, expected the header {HEADER!r}")
    return len(first)


def box_features(boxes: np.ndarray, image_h: np.ndarray, image_w: np.ndarray) -> np.ndarray:
    """(n, 4) pixel boxes (top, left, bottom, right) + per-box image size -> (n, 6) (spec §3.2)."""
    b = np.empty((len(boxes), BOX_DIM), dtype=np.float32)
    b[:, 0] = boxes[:, 0] / image_h
    b[:, 1] = boxes[:, 1] / image_w
    b[:, 2] = boxes[:, 2] / image_h
    b[:, 3] = boxes[:, 3] / image_w
    height, width = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    b[:, 4] = height * width
    b[:, 5] = height / (width + 1e-6)
    return b


@dataclass
class Chunk:
    """Decoded good rows of one chunk plus the rejects, all in file order."""

    product_id: list[int] = field(default_factory=list)
    image_h: list[int] = field(default_factory=list)
    image_w: list[int] = field(default_factory=list)
    num_boxes: list[int] = field(default_factory=list)  # boxes in the file
    n_kept: list[int] = field(default_factory=list)  # boxes stored (capped)
    query: list[str] = field(default_factory=list)
    query_id: list[int] = field(default_factory=list)
    line: list[int] = field(default_factory=list)
    features: np.ndarray | None = None  # (sum n_kept, 2048) float16
    boxes: np.ndarray | None = None  # (sum n_kept, 6) float32
    labels: np.ndarray | None = None  # (sum n_kept,) uint8
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, detail)
    filtered: int = 0  # good rows dropped by the max-boxes filter
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.product_id)


def parse_chunk(data: bytes, first_line: int, box_cap: int = 30, max_boxes: int = 0) -> Chunk:
    """Parse whole lines of the TSV (no header). `first_line` is the 1-based file line of data[0].

    Keeps the first `box_cap` boxes of each row in file order; with `max_boxes` > 0, rows with more
    boxes are counted as filtered (the solo team's train filter), not rejected.
    """
    out = Chunk()
    feats: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sizes: list[int] = []
    a2b = functools.partial(binascii.a2b_base64, strict_mode=True)  # lenient mode skips bad characters
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        lineno = first_line + i
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue  # blank lines are not rows
        out.rows_read += 1
        parts = raw.split(b"\t")
        if len(parts) != 9:
            out.rejects.append((lineno, "column_count", f"{len(parts)} fields"))
            continue
        pid_b, h_b, w_b, n_b, box_b, feat_b, lab_b, query_b, qid_b = parts
        try:
            pid, h, w, n, qid = int(pid_b), int(h_b), int(w_b), int(n_b), int(qid_b)
        except ValueError:
            bad = next(name for name, t in zip(("product_id", "image_h", "image_w", "num_boxes", "query_id"),
                                              (pid_b, h_b, w_b, n_b, qid_b)) if not t.strip().lstrip(b"-").isdigit())
            out.rejects.append((lineno, "bad_int", bad))
            continue
        if n < 1 or h < 1 or w < 1:
            out.rejects.append((lineno, "bad_int", "num_boxes, image_h and image_w must be >= 1"))
            continue
        try:
            box_raw = a2b(box_b)
            feat_raw = a2b(feat_b)
            lab_raw = a2b(lab_b)
        except (binascii.Error, ValueError) as e:
            which = "boxes"
            for name, t in (("boxes", box_b), ("features", feat_b), ("class_labels", lab_b)):
                try:
                    a2b(t)
                except (binascii.Error, ValueError):
                    which = name
                    break
            out.rejects.append((lineno, "bad_base64", f"{which}: {e}"))
            continue
        if len(box_raw) != n * 16 or len(feat_raw) != n * FEATURE_DIM * 4 or len(lab_raw) != n * 8:
            got = {"boxes": len(box_raw) / 16, "features": len(feat_raw) / (FEATURE_DIM * 4), "class_labels": len(lab_raw) / 8}
            which = ", ".join(f"{k} holds {v:g} rows" for k, v in got.items() if v != n)
            out.rejects.append((lineno, "length_mismatch", f"num_boxes={n} but {which}"))
            continue
        lab = np.frombuffer(lab_raw, dtype="<i8")
        if lab.min() < 0 or lab.max() >= NUM_LABELS:
            out.rejects.append((lineno, "label_out_of_range", f"labels span {lab.min()}..{lab.max()}"))
            continue
        feat = np.frombuffer(feat_raw, dtype="<f4")
        if not np.isfinite(feat).all():
            out.rejects.append((lineno, "non_finite", f"{int((~np.isfinite(feat)).sum())} values"))
            continue
        query = query_b.decode("utf-8", "replace")
        if not query.strip():
            out.rejects.append((lineno, "empty_query", ""))
            continue
        if max_boxes and n > max_boxes:
            out.filtered += 1
            continue
        k = min(n, box_cap)
        feats.append(feat[: k * FEATURE_DIM])
        boxes.append(np.frombuffer(box_raw, dtype="<f4")[: k * 4])
        labels.append(lab[:k])
        sizes.append(k)
        out.product_id.append(pid)
        out.image_h.append(h)
        out.image_w.append(w)
        out.num_boxes.append(n)
        out.n_kept.append(k)
        out.query.append(query)
        out.query_id.append(qid)
        out.line.append(lineno)
    if feats:
        out.features = np.concatenate(feats).astype(np.float16).reshape(-1, FEATURE_DIM)
        box_px = np.concatenate(boxes).reshape(-1, 4)
        counts = np.asarray(sizes)
        out.boxes = box_features(
            box_px,
            np.repeat(np.asarray(out.image_h, dtype=np.float32), counts),
            np.repeat(np.asarray(out.image_w, dtype=np.float32), counts),
        )
        out.labels = np.concatenate(labels).astype(np.uint8)
    else:
        out.features = np.zeros((0, FEATURE_DIM), np.float16)
        out.boxes = np.zeros((0, BOX_DIM), np.float32)
        out.labels = np.zeros((0,), np.uint8)
    return out


def iter_chunks(path: Path, chunk_bytes: int):
    """Yield (bytes of whole lines, 1-based line number of its first line) after the header."""
    header_len = check_header(path)
    line = 2
    with open(path, "rb") as f:
        f.seek(header_len)
        rest = b""
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                rest = block  # a single line longer than chunk_bytes: keep reading
                continue
            data, rest = block[: cut + 1], block[cut + 1 :]
            yield data, line
            line += data.count(b"\n")
        if rest:
            yield rest, line
