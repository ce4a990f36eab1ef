"""The whole ranker on a candidate table in the official columns: decode, (smooth), members (and their smoothed
and box views), re-ranker.

    ranker = Ranker.load({"rerank": "models/rerank", "backbone": <tokenizer folder>,
                          "member.mcan-seed1": "models/mcan/seed1/model.pt", ...})
    scores = ranker.score(read_candidates("data/testA/testA.tsv"))    # one float per row, higher first

The scores rank as the submission does: the re-ranker's or the ensemble's, and, when the rule the rerank stage
chose says so (spec.json "submission"), the post-processing of evaluate.postprocess applied as a demotion (a
candidate the frequency filter drops ranks below every kept one of its query, `postprocess.demoted`).

A candidate table has the nine TSV columns (tsv.COLUMNS; boxes / features / class_labels base64 as in
the files). It is decoded by the same validating parser as `prepare` (data/ingest.py); any row that
parser would reject is an error naming the row, its ids and the reason. Scores depend on the other
candidates of the same query_id in the table (smoothing pools, per-query ranks), so pass whole
queries. A candidate's frequency feature is the larger of its count over the evaluation files seen
at training time and its count in the table.

Members score on a GPU when they were trained for one (train.accelerator gpu / auto in their checkpoint)
and one is present, with their autocast and larger batches; else on the CPU (ranking/members.py).
This module is what the registered MLflow model (ranker_model.py) runs.
"""

from __future__ import annotations

import csv
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from ..config import PostprocessParams, SmoothParams
from ..data.ingest import in_memory_store
from ..data.store import FeatureStore
from ..data.tsv import COLUMNS, parse_chunk
from ..errors import MissingInputError, UserError
from . import members as members_mod
from . import postprocess, reranker
from .features import build_features, fitted_box_view, member_output
from .outputs import box_view, table_best_box, table_details, view
from .smoothing import smoothed_store

INT_COLUMNS = ("product_id", "image_h", "image_w", "num_boxes", "query_id")
MEMBER_PREFIX = "member."
MODEL_CODE = Path(__file__).with_name("ranker_model.py")  # the registered model's code (MLflow models-from-code)
MEMBER_CODE = Path(__file__).with_name("member_model.py")  # a member's logged model's code
SIGNATURE = ModelSignature(  # the registered model's (and a member's) input (the nine official columns) and output
    inputs=Schema([ColSpec("long" if c in INT_COLUMNS else "string", c) for c in COLUMNS]),
    outputs=Schema([ColSpec("double", "score")]),
)


class CandidateTableError(UserError, ValueError):
    """A candidate table the ranker cannot score (the message names the row and column)."""


def read_candidates(path: str | Path, nrows: int | None = None, lines: Collection[int] | None = None) -> pd.DataFrame:
    """An official TSV (header row, quoting off) as a candidate table; ids as int64, the rest as text.

    `lines`: read only these file lines (1-based, the header is line 1; blank lines count), as a store's
    `rows.line` names the rows `prepare` kept.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    dtypes = {c: (np.int64 if c in INT_COLUMNS else str) for c in COLUMNS}
    keep = None if lines is None else frozenset(int(n) for n in lines)
    skip = None if keep is None else (lambda i: i > 0 and i + 1 not in keep)  # i: 0-based file line
    try:
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=dtypes, nrows=nrows, keep_default_na=False,
                           skiprows=skip)
    except ValueError as e:
        raise CandidateTableError(f"{path}: not a candidate table in the official columns ({e})") from e


def prepared_candidates(path: str | Path, store: FeatureStore, split: str) -> pd.DataFrame:
    """The rows of an official TSV that `prepare` kept in `store`, in file order: its rejects (bad rows, repeated
    candidates) are left out, so one bad row costs that row, not the submission."""
    table = read_candidates(path, lines=store.rows.line.tolist())
    if len(table) != len(store) or (table.product_id.to_numpy() != store.rows.product_id.to_numpy()).any():
        raise CandidateTableError(f"{path}: its rows are not the ones features/{split} holds ({len(table)} against "
                                  f"{len(store)}); prepare it again: dvc repro prepare@{split}")
    return table


def rejected_candidates(path: str | Path, store: FeatureStore) -> dict[int, list[int]]:
    """query_id -> product ids, in file order, of the rows of an official TSV that `prepare` rejected (the store's
    rejects.tsv), where such a row still has every column and whole-number product and query ids. They cannot be
    scored, but they are the query's candidates: ranked after its scored ones they complete a short line better
    than products that are not its candidates, and a query whose rows were all rejected still gets its line."""
    lines = {line for line, reason, _ in store.rejects if reason != "repeated_candidate"}  # scored on its first line
    if not lines:
        return {}
    found: dict[int, list[int]] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number in lines:
                fields = raw.rstrip(b"\r\n").split(b"\t")
                product, query = fields[0].strip(), fields[-1].strip()
                if len(fields) == len(COLUMNS) and product.isdigit() and query.isdigit():
                    found.setdefault(int(query), []).append(int(product))
    return found


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def candidate_store(table: pd.DataFrame, box_cap: int = 30) -> FeatureStore:
    """Decode and validate a candidate table into an in-memory feature store (in table order)."""
    if not isinstance(table, pd.DataFrame):
        raise CandidateTableError(f"expected a pandas DataFrame with columns {list(COLUMNS)}, got {type(table).__name__}")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise CandidateTableError(f"candidate table: missing column(s) {missing}; expected {list(COLUMNS)}")
    if len(table) == 0:
        raise CandidateTableError("candidate table: no rows")
    cols = {c: [_text(v) for v in table[c].tolist()] for c in COLUMNS}
    for c, values in cols.items():
        for i, v in enumerate(values):
            if "\t" in v or "\n" in v or "\r" in v:
                raise CandidateTableError(f"candidate table row {i}, column {c!r}: contains a tab or line break")
    lines = ("\t".join(cols[c][i] for c in COLUMNS) for i in range(len(table)))
    chunk = parse_chunk(("\n".join(lines) + "\n").encode(), first_line=0, box_cap=box_cap)  # line = row index
    if chunk.rejects:
        row, reason, detail = chunk.rejects[0]
        ids = f"product_id={cols['product_id'][row]!r}, query_id={cols['query_id'][row]!r}"
        raise CandidateTableError(
            f"candidate table row {row} ({ids}): {reason}" + (f" ({detail})" if detail else "")
            + (f"; {len(chunk.rejects) - 1} more bad row(s)" if len(chunk.rejects) > 1 else "")
        )
    return in_memory_store(chunk)


class Ranker:
    """The registered model's logic: members + LightGBM re-ranker over one candidate table."""

    def __init__(self, saved: reranker.Saved, members: dict[str, members_mod.Member]):
        self.spec, self.members, self.boosters, self.pca, self.counts = (saved.spec, members, saved.boosters, saved.pca,
                                                                          saved.counts)
        self.feature_spec = saved.feature_spec

    @classmethod
    def load(cls, paths: dict[str, str]) -> "Ranker":
        """`paths`: rerank (models/rerank folder), backbone (config + tokenizer folder), member.<name> (model.pt)."""
        saved = reranker.load(paths["rerank"])
        members = {m: members_mod.load(paths[f"{MEMBER_PREFIX}{m}"], paths.get("backbone")) for m in saved.spec["members"]}
        return cls(saved, members)

    @property
    def rule(self) -> dict:
        """What `score` ranks by: spec.json's "submission" (a folder saved before it: the re-ranker alone)."""
        return self.spec.get("submission") or {"rule": "rerank", "scores": "rerank", "postprocess": False}

    def score(self, table: pd.DataFrame, kind: str | None = None) -> np.ndarray:
        """One score per row, higher first. By default as the submission ranks (`rule`); kind 'rerank': the
        re-ranker's mean fold prediction, 'ensemble': the members' ensemble, neither post-processed."""
        store = candidate_store(table, int(self.spec.get("box_cap", 30)))
        views, knn = self.feature_spec.views, None
        if self.spec["smoothing"] or views:
            s = self.spec["smooth"]
            knn = smoothed_store(store, SmoothParams(k=s["k"], weights=s["weights"]))
        members_see = knn if self.spec["smoothing"] else store
        sources = [(name, name, members_see) for name in self.members] + [(view(name), name, knn) for name in views]
        outputs, tables = {}, {}
        for source, name, boxes in sources:  # each member, then each smoothed view of one
            scores, fused = members_mod.score(self.members[name], boxes)
            tables[source] = scores
            outputs[source] = member_output(scores.score.to_numpy(), fused, table_details(scores),
                                            boxes.rows.query_id.to_numpy(), self.pca.get(source), self.feature_spec)
        for name in self.feature_spec.box_views:  # the member's scores, in the raw features of its image's boxes
            fused = fitted_box_view(store, table_best_box(tables[name]), name in self.feature_spec.best_boxes,
                                    f"member {name!r}")
            outputs[box_view(name)] = member_output(tables[name].score.to_numpy(), fused, None,
                                                    store.rows.query_id.to_numpy(), self.pca.get(box_view(name)),
                                                    self.feature_spec)
        in_table = store.rows.product_id.value_counts()
        counts = pd.concat([self.counts.reindex(in_table.index).fillna(0), in_table], axis=1).max(axis=1)
        X, ensemble = build_features(store, outputs, self.feature_spec, counts)
        scores = ensemble if (kind or self.rule["scores"]) == "ensemble" else self._rerank(X)
        if kind is not None or not self.rule["postprocess"]:
            return scores
        table_scores = pd.DataFrame({"query_id": store.rows.query_id.to_numpy(),
                                     "product_id": store.rows.product_id.to_numpy(), "score": scores})
        kept = postprocess.apply(table_scores, PostprocessParams(**self.spec["postprocess"]), counts)
        return postprocess.demoted(table_scores, kept)

    def _rerank(self, X: pd.DataFrame) -> np.ndarray:
        values = X.to_numpy()  # once, not a DataFrame check per booster
        return np.mean([b.predict(values) for b in self.boosters], axis=0)
