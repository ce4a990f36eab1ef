"""The per-split feature store (written by data/ingest.py), read back memory-mapped.

features/<split>/
  rows.parquet    one row per kept TSV row: product_id, query_id, query, query_clean, num_boxes,
                  n_kept, offset, image_h, image_w, line
  features.f16    float16 (total_boxes, 2048), boxes of row i at [offset, offset + n_kept)
  boxes.f32       float32 (total_boxes, 6): normalised top, left, bottom, right, area, aspect
  labels.u8       uint8 (total_boxes,): class ids 0..32
  meta.json       counts, rejects by reason, settings
  rejects.tsv     line, reason, detail of every rejected row
  answers.json    the split's answers when data/ has them (valid; synthetic testA)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MissingInputError, UserError
from .tsv import AREA, BOX_DIM, FEATURE_DIM

ROWS, FEATURES, BOXES, LABELS, META, REJECTS, ANSWERS = (
    "rows.parquet",
    "features.f16",
    "boxes.f32",
    "labels.u8",
    "meta.json",
    "rejects.tsv",
    "answers.json",
)


def load_answers(path: str | Path) -> dict[int, set[int]]:
    """valid_answer.json style: {"qid": [pid, ...]} -> {qid: {pid, ...}} (ids as ints)."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: answers file not found")
    try:
        with open(path) as f:
            raw = json.load(f)
        return {int(q): {int(p) for p in pids} for q, pids in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not an answers file like valid_answer.json ({{\"query_id\": [product_id, ...]}}): {e}") from e


@dataclass
class FeatureStore:
    root: Path

    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        root = Path(root)
        if not (root / META).exists():
            raise MissingInputError(f"{root}: no feature store here (run `mmrecall prepare` or `dvc repro` first)")
        return cls(root)

    @classmethod
    def in_memory(cls, rows: pd.DataFrame, features: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                  answers: dict[int, set[int]] | None = None) -> "FeatureStore":
        """A store whose rows and arrays are already in memory (same layout as the files; nothing is read)."""
        out = cls(Path("<memory>"))
        out.__dict__.update(rows=rows, features=features, boxes=boxes, labels=labels, answers=answers,
                            meta={"total_boxes": len(features)})  # the cached properties' values
        return out

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / META).read_text())

    @cached_property
    def rows(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / ROWS)

    @cached_property
    def rejects(self) -> list[tuple[int, str, str]]:
        """(file line, reason, detail) of every row `prepare` rejected, in file order (rejects.tsv; none without it)."""
        path = self.root / REJECTS
        if not path.exists():
            return []
        with open(path) as f:
            f.readline()  # header: line, reason, detail
            return [(int(line), reason, detail)
                    for line, reason, detail in (row.rstrip("\n").split("\t", 2) for row in f if row.strip())]

    @property
    def total_boxes(self) -> int:
        return int(self.meta["total_boxes"])

    def _map(self, name: str, dtype, width: int | None) -> np.ndarray:
        shape = (self.total_boxes, width) if width else (self.total_boxes,)
        if self.total_boxes == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.root / name, dtype=dtype, mode="r", shape=shape)

    @cached_property
    def features(self) -> np.ndarray:
        return self._map(FEATURES, np.float16, FEATURE_DIM)

    @cached_property
    def boxes(self) -> np.ndarray:
        return self._map(BOXES, np.float32, BOX_DIM)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._map(LABELS, np.uint8, None)

    @cached_property
    def answers(self) -> dict[int, set[int]] | None:
        path = self.root / ANSWERS
        return load_answers(path) if path.exists() else None

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features (n, 2048) float16, boxes (n, 6), labels (n,)) of row i."""
        start = int(self.rows.offset.iat[i])
        end = start + int(self.rows.n_kept.iat[i])
        return self.features[start:end], self.boxes[start:end], self.labels[start:end]

    def largest_boxes(self, n: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(rows, n) store index of each row's `n` largest boxes by area, largest first (ties: the earlier box),
        -1 past a row's boxes; `rows`: only these store rows, in this order (default: all)."""
        offsets, counts = self.rows.offset.to_numpy(), self.rows.n_kept.to_numpy().astype(np.int64)
        if rows is not None:
            offsets, counts = offsets[rows], counts[rows]
        out = np.full((len(offsets), n), -1, np.int64)
        if not counts.sum():
            return out
        row_of_box = np.repeat(np.arange(len(offsets)), counts)  # row i's boxes are offsets[i] + [0, counts[i])
        boxes = np.repeat(offsets - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())  # their store index
        area = np.asarray(self.boxes[boxes, AREA], np.float64)
        order = np.lexsort((np.arange(len(boxes)), -area, row_of_box))  # by row, then largest, then earliest
        rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)  # place within its row
        keep = rank < n
        out[row_of_box[order][keep], rank[keep]] = boxes[order][keep]
        return out

    def largest_box_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(rows, 2048) the feature of each row's largest box by area (ties: the earlier box; zeros for a row
        without boxes), in the store's dtype; `rows`: only these store rows, in this order (default: all)."""
        largest = self.largest_boxes(1, rows)[:, 0]
        out = np.zeros((len(largest), FEATURE_DIM), self.features.dtype)
        out[largest >= 0] = self.features[largest[largest >= 0]]
        return out

    def box_features(self, box: np.ndarray) -> np.ndarray:
        """(rows, 2048) the feature of box `box[i]` (its position among row i's kept boxes) of every row, in the
        store's dtype; zeros for a row without boxes."""
        offsets, counts = self.rows.offset.to_numpy(), self.rows.n_kept.to_numpy()
        box = np.asarray(box, np.int64)
        if len(box) != len(offsets):
            raise ValueError(f"box_features: {len(box)} boxes for {len(offsets)} rows")
        has = counts > 0
        if (box[has] < 0).any() or (box[has] >= counts[has]).any():
            raise ValueError("box_features: a box position outside its row's boxes")
        out = np.zeros((len(offsets), FEATURE_DIM), self.features.dtype)
        out[has] = self.features[offsets[has] + box[has]]
        return out

    def mean_features(self, start: int, stop: int) -> np.ndarray:
        """Mean box feature (float32) of rows [start, stop), read as one contiguous slice."""
        offsets = self.rows.offset.to_numpy()[start:stop]
        counts = self.rows.n_kept.to_numpy()[start:stop]
        if len(offsets) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        lo, hi = int(offsets[0]), int(offsets[-1] + counts[-1])
        block = np.asarray(self.features[lo:hi], dtype=np.float32)
        sums = np.add.reduceat(block, offsets - lo, axis=0)
        return sums / counts[:, None]
