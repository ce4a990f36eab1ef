"""Score outputs on disk: the one module that reads and writes them.

    outputs/<name>/<split>.parquet       score table (query_id, product_id, score), rows in feature-store order;
                                         a member that scores one box adds `best_box` (that box's position
                                         in the image), and a member may add columns of its own
                                         (RankerOutput.details), which the re-ranker reads as features
    outputs/<name>/<split>_fused.npy     float16 (rows, D): the vector behind each score (members only),
                                         what the LightGBM re-ranker projects with PCA

<name> is a member `<model>-seed<k>`, the baseline `wordproto`, `ensemble`, `rerank`, or a member scored
on KNN-smoothed boxes, `smoothed/<member>` (see `smoothed`); `ensemble-knn` / `rerank-knn` are built on
those smoothed members (`knn`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..data.store import FeatureStore
from ..errors import MissingInputError, UserError
from .metrics import read_score_table

SMOOTHED = "smoothed"  # outputs/smoothed/<member>/: a member's scores on smoothed boxes (the smooth stage's out)
KNN_SUFFIX = "-knn"  # outputs/ensemble-knn/, outputs/rerank-knn/: the same built on smoothed members


def smoothed(member: str) -> str:
    """The output name of a member scored on smoothed boxes."""
    return f"{SMOOTHED}/{member}"


def knn(name: str, smoothing: bool = True) -> str:
    """`ensemble` -> `ensemble-knn` (built on smoothed members) when `smoothing`."""
    return f"{name}{KNN_SUFFIX}" if smoothing else name


def view(member: str) -> str:
    """A member scored on smoothed boxes as a second source of re-ranker features (`rerank.smoothed_views`)."""
    return knn(member)


def box_view(member: str) -> str:
    """A member's scores read with each image's largest-box ROI feature as its fused vector (beside its best
    box's, for a member that names one): a third source of re-ranker features (`rerank.box_views`; nothing on
    disk, built from the member's table and the store)."""
    return f"{member}-box"


def table_path(outputs_dir: str | Path, name: str, split: str) -> Path:
    return Path(outputs_dir) / name / f"{split}.parquet"


def fused_path(outputs_dir: str | Path, name: str, split: str) -> Path:
    return Path(outputs_dir) / name / f"{split}_fused.npy"


def score_table(store: FeatureStore, score: np.ndarray) -> pd.DataFrame:
    """A score table of every store row, in store order."""
    rows = store.rows
    return pd.DataFrame({"query_id": rows.query_id.to_numpy(), "product_id": rows.product_id.to_numpy(),
                         "score": np.asarray(score, np.float64)})


def write(outputs_dir: str | Path, name: str, split: str, table: pd.DataFrame, fused: np.ndarray | None = None) -> None:
    """Write the score table of `name` on `split` (and its fused vectors, for members)."""
    path = table_path(outputs_dir, name, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    if fused is not None:
        np.save(fused_path(outputs_dir, name, split), fused)


def exists(outputs_dir: str | Path, name: str, split: str) -> bool:
    return table_path(outputs_dir, name, split).exists()


def read_tables(outputs_dir: str | Path, name: str, splits) -> dict[str, pd.DataFrame]:
    """{split: score table} of the splits for which `name` has one."""
    return {s: read_score_table(table_path(outputs_dir, name, s)) for s in splits if exists(outputs_dir, name, s)}


BEST_BOX = "best_box"  # score table column of a member that scores one box: that box's position in the image
SCORE_COLUMNS = ("query_id", "product_id", "score", BEST_BOX)


def table_details(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """A member's details: the columns of its score table after (query_id, product_id, score[, best_box]), by name."""
    return {c: table[c].to_numpy() for c in table.columns if c not in SCORE_COLUMNS}


def table_best_box(table: pd.DataFrame) -> np.ndarray | None:
    """The member's best box of every row, or None for a member that does not name one."""
    return table[BEST_BOX].to_numpy() if BEST_BOX in table.columns else None


def has_best_box(outputs_dir: str | Path, name: str, split: str) -> bool:
    """Whether a member's score table on disk names its best box (read from the parquet schema alone)."""
    return BEST_BOX in pq.read_schema(table_path(outputs_dir, name, split)).names


def read_member(outputs_dir: str | Path, name: str, split: str, store: FeatureStore
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """(logits, fused, details, best box) of a member on a split, checked row by row against the split's feature
    store (fused memory-mapped; details: the table's columns after the score, by name; best box: None for a
    member that names none)."""
    path = table_path(outputs_dir, name, split)
    if not path.exists():
        raise MissingInputError(f"{path}: no score table for member {name!r} (params rerank.members; "
                                "smoothed members come from `mmrecall smooth`)")
    table = pd.read_parquet(path)
    fused = np.load(fused_path(outputs_dir, name, split), mmap_mode="r")  # read in chunks by the re-ranker's PCA
    rows = store.rows
    if len(table) != len(rows) or len(fused) != len(rows) or not (
        (table.query_id.to_numpy() == rows.query_id.to_numpy()).all()
        and (table.product_id.to_numpy() == rows.product_id.to_numpy()).all()
    ):
        raise UserError(f"{path}: rows do not match the feature store of {split} (re-run the member's stage)")
    return table.score.to_numpy(), fused, table_details(table), table_best_box(table)
