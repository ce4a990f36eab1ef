"""The organisers' TSV format: columns, encoding, and a validating chunk parser.

Nine tab-separated columns with a header row (the organisers' README):
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError

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
BOX_DIM = 6  # normalised top, left, bottom, right, area, aspect (the 1st place's 6-d box input)
AREA = 4  # the column of the box's area (a share of the image) in that row
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


class DataFileError(UserError, ValueError):
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
    """(n, 4) pixel boxes (top, left, bottom, right) + per-box image size -> (n, 6) (the 1st place's 6-d box input)."""
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
    lines: int = 0  # lines covered, blank ones included: the next chunk starts this many lines later
    nbytes: int = 0  # bytes of the file covered

    def __len__(self) -> int:
        return len(self.product_id)

    def select(self, keep: np.ndarray) -> Chunk:
        """The chunk with only the rows where `keep` is true; rejects and counters stay as they are."""
        rows = np.flatnonzero(keep)
        box_keep = np.repeat(keep, self.n_kept)  # (sum n_kept,): each row's mask over its boxes

        def pick(values: list) -> list:
            return [values[i] for i in rows]

        return replace(
            self, product_id=pick(self.product_id), image_h=pick(self.image_h), image_w=pick(self.image_w),
            num_boxes=pick(self.num_boxes), n_kept=pick(self.n_kept), query=pick(self.query),
            query_id=pick(self.query_id), line=pick(self.line), features=self.features[box_keep],
            boxes=self.boxes[box_keep], labels=self.labels[box_keep],
        )


TAB = b"\t"
INT_FIELDS = ("product_id", "image_h", "image_w", "num_boxes", "query_id")
BASE64_FIELDS = ("boxes", "features", "class_labels")
# A box costs at least this many base64 characters of features, which bounds the boxes in a chunk.
B64_CHARS_PER_BOX = FEATURE_DIM * 4 * 4 // 3
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
_a2b = functools.partial(binascii.a2b_base64, strict_mode=True)  # lenient mode would skip bad characters


def parse_chunk(data: bytes, first_line: int, box_cap: int = 30, max_boxes: int = 0) -> Chunk:
    """Parse whole lines of the TSV (no header). `first_line` is the 1-based file line of data[0].

    Keeps the first `box_cap` boxes of each row in file order; with `max_boxes` > 0, rows with more
    boxes are counted as filtered (the solo team's train filter), not rejected.

    Rows are several KB of base64 each, so nothing copies them: fields are located with find(),
    decoded from memoryview slices, and features are cast straight into one float16 block.
    """
    out = Chunk(nbytes=len(data))
    feats = np.empty((len(data) // B64_CHARS_PER_BOX + 1, FEATURE_DIM), np.float16)  # filled row by row
    n_feats = 0
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    view, find = memoryview(data), data.find
    pos, lineno = 0, first_line - 1
    while pos < len(data):
        start, end = pos, find(b"\n", pos)
        if end < 0:
            end = len(data)
        pos, lineno = end + 1, lineno + 1
        if end > start and data[end - 1] == ord("\r"):
            end -= 1
        # Blank lines are not rows. Only a line that starts with whitespace can be blank, so rows
        # are not copied to find out.
        if end == start or (data[start] in _WHITESPACE and not data[start:end].strip()):
            continue
        out.rows_read += 1
        tabs = [start - 1]
        while len(tabs) < 9 and (tab := find(TAB, tabs[-1] + 1, end)) >= 0:
            tabs.append(tab)
        if len(tabs) < 9 or find(TAB, tabs[-1] + 1, end) >= 0:
            out.rejects.append((lineno, "column_count", f"{data.count(TAB, start, end) + 1} fields"))
            continue
        fields = [(a + 1, b) for a, b in zip(tabs, tabs[1:] + [end])]  # [start, end) of the 9 fields

        ints = [data[a:b] for a, b in (fields[i] for i in (0, 1, 2, 3, 8))]
        try:
            pid, h, w, n, qid = map(int, ints)
        except ValueError:
            out.rejects.append((lineno, "bad_int", _bad_int_field(ints)))
            continue
        if n < 1 or h < 1 or w < 1:
            out.rejects.append((lineno, "bad_int", "num_boxes, image_h and image_w must be >= 1"))
            continue
        encoded = [view[a:b] for a, b in fields[4:7]]
        try:
            box_raw, feat_raw, lab_raw = map(_a2b, encoded)
        except (binascii.Error, ValueError) as e:
            out.rejects.append((lineno, "bad_base64", f"{_bad_base64_field(encoded)}: {e}"))
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
        a, b = fields[7]
        query = data[a:b].decode("utf-8", "replace")
        if not query.strip():
            out.rejects.append((lineno, "empty_query", ""))
            continue
        if max_boxes and n > max_boxes:
            out.filtered += 1
            continue
        k = min(n, box_cap)
        feats[n_feats : n_feats + k] = feat[: k * FEATURE_DIM].reshape(k, FEATURE_DIM)
        n_feats += k
        boxes.append(np.frombuffer(box_raw, dtype="<f4")[: k * 4])
        labels.append(lab[:k])
        out.product_id.append(pid)
        out.image_h.append(h)
        out.image_w.append(w)
        out.num_boxes.append(n)
        out.n_kept.append(k)
        out.query.append(query)
        out.query_id.append(qid)
        out.line.append(lineno)
    out.lines = lineno - first_line + 1
    out.features = feats[:n_feats]
    if boxes:
        counts = np.asarray(out.n_kept)
        out.boxes = box_features(
            np.concatenate(boxes).reshape(-1, 4),
            np.repeat(np.asarray(out.image_h, dtype=np.float32), counts),
            np.repeat(np.asarray(out.image_w, dtype=np.float32), counts),
        )
        out.labels = np.concatenate(labels).astype(np.uint8)
    else:
        out.boxes = np.zeros((0, BOX_DIM), np.float32)
        out.labels = np.zeros((0,), np.uint8)
    return out


def _bad_int_field(values: list[bytes]) -> str:
    """Name the integer field to blame: the first that does not look like an integer."""
    for name, value in zip(INT_FIELDS, values):
        if not value.strip().lstrip(b"-").isdigit():
            return name
    for name, value in zip(INT_FIELDS, values):  # looks like one but is not, e.g. b"--5"
        try:
            int(value)
        except ValueError:
            return name
    return INT_FIELDS[0]


def _bad_base64_field(encoded: list[memoryview]) -> str:
    for name, value in zip(BASE64_FIELDS, encoded):
        try:
            _a2b(value)
        except (binascii.Error, ValueError):
            return name
    return BASE64_FIELDS[0]


def line_spans(path: Path, start: int, chunk_bytes: int):
    """Yield (start, end) byte ranges of whole lines from `start` on, each about chunk_bytes long.

    A span ends at the first newline at or after start + chunk_bytes - 1, so a line longer than
    chunk_bytes makes one longer span rather than being cut.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        while start < size:
            f.seek(start + max(chunk_bytes, 1) - 1)
            f.readline()
            end = min(f.tell(), size)
            yield start, end
            start = end


def parse_span(path: Path, start: int, end: int, box_cap: int = 30, max_boxes: int = 0) -> Chunk:
    """Read and parse bytes [start, end) of the file (a worker task): line numbers count from 0.

    Only the caller knows how many lines come before the span; it adds that to the chunk's line
    numbers (`Chunk.lines` says how far to advance for the next span).
    """
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return parse_chunk(data, 0, box_cap, max_boxes)
