"""The re-ranker's features per (query, candidate) row, from member outputs and the feature store.

- member scores, their per-query rank / z-score / gap to the query's best, the ensemble probability;
- each member's details (RankerOutput.details, e.g. the word detector's weakest word), with the same
  per-query rank / z-score / gap;
- each member's consensus (pseudo-relevance feedback, `consensus`): how much a candidate's fused vector
  resembles those of the member's k best other candidates of the query, for each k of `rerank.consensus`,
  with the same per-query rank / z-score / gap. A query's answers share what the query names, so they
  resemble each other; a near-miss differs in one named value, a random negative in most;
- each member's density (`density`): how much a candidate's fused vector resembles its k most similar other
  candidates of the query, whatever their scores (a query's answers form a tight group);
- the first `pca_dims` principal components of each member's fused vector (PCA fitted on the fused
  vectors of every evaluation split: unsupervised, no labels; one member at a time, in chunks of rows);
- all of the above again for each *view* of a member, a source of its own: the member scored on smoothed
  boxes (`<member>-knn`), and its scores with the raw ROI feature of each image's largest box as the fused
  vector (`<member>-box`: its best candidates compared by everything the detector saw; no details); for a
  member that names the box it scored (the word detector), that box's ROI feature beside the largest's
  (`box_view_features`);
- candidate features: num_boxes, kept boxes, image size, box area / aspect statistics, label histogram
  summary, the candidate's number of rows over all evaluation files (valid + testA + testB), its gap to
  the query's least frequent candidate and to the frequency filter's threshold (the 5th smallest count
  of the query, the 1st place's post-processing); the query's word count.

`FeatureSpec` is saved with the boosters, so the registered ranker builds the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..data.store import FeatureStore
from ..data.text import words
from ..errors import UserError
from .ensemble import ensemble_scores
from .metrics import K
from .outputs import box_view, view

NUM_LABELS = 33
CHUNK_VALUES = 1 << 22  # values of fused vectors read at a time by the PCA (16 MB as float32)


def _group_codes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code per row, rows per code, first position of each code once rows are sorted by code): the
    distinct query ids numbered 0..G-1."""
    _, codes, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    return codes.reshape(-1), sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]])


def per_query(values: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Rank (0 = best, as a share of the query's candidates), z-score and gap to the best, per query.

    Ties share their average rank; the z-score uses the sample standard deviation (0 for a lone row).
    numpy throughout: a served request is one query, where pandas' group-by machinery cost ~15 ms.
    """
    v = np.asarray(values, np.float64)
    codes, sizes, starts = _group_codes(groups)
    size = sizes[codes].astype(np.float64)
    order = np.lexsort((-v, codes))  # by query, best first
    sv, sc = v[order], codes[order]
    tie = np.cumsum(np.concatenate([[True], (sc[1:] != sc[:-1]) | (sv[1:] != sv[:-1])])) - 1  # block of equal values
    mean_place = np.bincount(tie, weights=np.arange(len(v)) - starts[sc]) / np.bincount(tie)
    place = np.empty(len(v))
    place[order] = mean_place[tie]
    mean = np.bincount(codes, weights=v) / sizes
    centred = v - mean[codes]
    var = np.bincount(codes, weights=centred**2) / np.maximum(sizes - 1, 1)
    std = np.where(sizes > 1, np.sqrt(var), 0.0)
    best = np.full(len(sizes), -np.inf)
    np.maximum.at(best, codes, v)
    return {
        "rank": place / np.maximum(size - 1, 1),
        "z": centred / (std[codes] + 1e-6),
        "gap": v - best[codes],
    }


def candidate_features(store: FeatureStore, counts: pd.Series) -> dict[str, np.ndarray]:
    """Per row: box, label and frequency features of the candidate; query length."""
    rows = store.rows
    offsets, n = rows.offset.to_numpy(), rows.n_kept.to_numpy().astype(np.float64)
    boxes, labels = np.asarray(store.boxes), np.asarray(store.labels).astype(np.int64)
    area, aspect = boxes[:, 4].astype(np.float64), np.log(np.maximum(boxes[:, 5], 1e-6)).astype(np.float64)
    hist = np.zeros((len(labels), NUM_LABELS), np.float64)
    hist[np.arange(len(labels)), labels] = 1.0
    codes, sizes, _ = _group_codes(rows.query_id.to_numpy())
    if len(rows) and len(offsets):
        sums = lambda a: np.add.reduceat(a, offsets, axis=0)  # noqa: E731 (rows own contiguous, ordered blocks)
        hist_rows = sums(hist)
        area_max = np.maximum.reduceat(area, offsets)
        area_mean, aspect_mean = sums(area) / n, sums(aspect) / n
    else:
        hist_rows = np.zeros((0, NUM_LABELS))
        area_max = area_mean = aspect_mean = np.zeros(0)
    return {
        "num_boxes": rows.num_boxes.to_numpy(np.float64),
        "n_kept": n,
        "image_h": rows.image_h.to_numpy(np.float64),
        "image_w": rows.image_w.to_numpy(np.float64),
        "image_aspect": np.log(rows.image_h.to_numpy(np.float64) / rows.image_w.to_numpy(np.float64)),
        "box_area_mean": area_mean,
        "box_area_max": area_max,
        "box_aspect_mean": aspect_mean,
        "labels_distinct": (hist_rows > 0).sum(1).astype(np.float64),
        "label_major": hist_rows.argmax(1).astype(np.float64) if len(hist_rows) else np.zeros(0),
        "label_major_share": hist_rows.max(1) / n if len(hist_rows) else np.zeros(0),
        **count_features(rows.product_id, rows.query_id.to_numpy(), counts),
        "query_words": rows.query_clean.map(lambda q: len(words(q))).to_numpy(np.float64),
        "query_candidates": sizes[codes].astype(np.float64),
    }


def count_features(product_ids: pd.Series, groups: np.ndarray, counts: pd.Series) -> dict[str, np.ndarray]:
    """Per row: the candidate's number of rows over the evaluation files (`counts`), and its gap to the query's
    least frequent candidate and to the frequency filter's threshold (`groups`: query id per row)."""
    count = product_ids.map(counts).fillna(1).to_numpy(np.float64)
    codes, sizes, starts = _group_codes(groups)
    order = np.lexsort((count, codes))  # by query, smallest count first
    count_min = count[order][starts][codes]
    # The frequency filter's threshold (the 1st place's post-processing): the 5th smallest count of the query.
    count_kth = count[order][starts + np.minimum(K, sizes) - 1][codes]
    return {
        "cand_count": count,
        "cand_count_gap": count - count_min,
        "cand_count_kth_gap": count - count_kth,  # <= 0: the frequency filter keeps it
    }


def _chunk_rows(dim: int) -> int:
    return max(1, CHUNK_VALUES // max(dim, 1))


def _centered_chunks(blocks: list[np.ndarray], mean, dtype):
    """The rows of every block minus `mean`, as torch tensors of at most CHUNK_VALUES values."""
    import torch

    chunk_rows = _chunk_rows(len(mean))
    for block in blocks:
        for start in range(0, len(block), chunk_rows):
            yield torch.from_numpy(np.asarray(block[start : start + chunk_rows], dtype)) - mean


def fit_pca(blocks: list[np.ndarray], dims: int, exact_max_dim: int = 1024, iterations: int = 8,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (dims, D)) of the stacked rows, float32, reading CHUNK_VALUES values at a time.

    Memory does not grow with the number of rows (blocks may be memory-mapped). Up to `exact_max_dim`
    dimensions: an eigendecomposition of the covariance (float64, D x D). Above (the faithful members'
    fused vectors have thousands of dimensions, a D x D float64 matrix and its eigendecomposition would
    cost GBs and minutes): randomized subspace iteration in float32 (Halko et al.), `iterations` passes
    over the data with `dims` + 10 vectors. `dims` 0: the mean and no components. torch with one thread:
    numpy's threaded BLAS took seconds for this on a shared 2-core machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, step = sum(len(b) for b in blocks), _chunk_rows(blocks[0].shape[1])
        total = sum(np.asarray(b[s : s + step], np.float64).sum(0) for b in blocks for s in range(0, len(b), step))
        mean = torch.from_numpy(np.asarray(total / n))
        D = len(mean)
        if dims == 0:  # the mean only (the consensus features centre on it)
            comps = np.zeros((0, D))
        elif D <= exact_max_dim:
            cov = torch.zeros(D, D, dtype=torch.float64)
            for c in _centered_chunks(blocks, mean, np.float64):
                cov += c.T @ c
            comps = torch.linalg.eigh(cov)[1].flip(1)[:, :dims].T.numpy().copy()
        else:
            mean32, k = mean.float(), min(dims + 10, D)
            q = torch.linalg.qr(torch.randn(D, k, generator=torch.Generator().manual_seed(seed))).Q
            for _ in range(iterations):
                z = sum(c.T @ (c @ q) for c in _centered_chunks(blocks, mean32, np.float32))
                q = torch.linalg.qr(z).Q
            small = sum((c @ q).T @ (c @ q) for c in _centered_chunks(blocks, mean32, np.float32))
            comps = (q @ torch.linalg.eigh(small)[1]).flip(1)[:, :dims].T.numpy().copy()
    finally:
        torch.set_num_threads(threads)
    if len(comps):
        comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]  # a fixed sign
    return mean.numpy().astype(np.float32), comps.astype(np.float32)


def project(fused: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    """(rows, dims) float32 principal components of fused vectors, CHUNK_VALUES values at a time."""
    out, chunk_rows = np.empty((len(fused), len(comps)), np.float32), _chunk_rows(len(mean))
    for start in range(0, len(fused), chunk_rows):
        out[start : start + chunk_rows] = (np.asarray(fused[start : start + chunk_rows], np.float32) - mean) @ comps.T
    return out


def _query_vectors(fused: np.ndarray, mean: np.ndarray, groups: np.ndarray):
    """(rows, (n, D) L2-normalised fused vectors minus `mean`) of each query in turn, rows in row order."""
    codes, sizes, starts = _group_codes(groups)
    by_query = np.argsort(codes, kind="stable")  # each query's rows together, in row order
    for start, size in zip(starts, sizes):
        rows = by_query[start : start + size]
        f = np.asarray(fused[rows], np.float32) - mean  # (n, D)
        f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-6
        yield rows, f


def _top_k_similarity(f: np.ndarray, key: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """One query: each candidate's mean similarity to the k best-keyed OTHER candidates (fewer when the
    query has fewer; 0 for a lone candidate), per k. `f`: (n, D) L2-normalised vectors; `key`: (n,) scores."""
    size = len(key)
    order = np.argsort(-key, kind="stable")  # best first; ties in row order
    top = order[: max(ks) + 1]
    sim = f @ f[top].T  # (n, min(n, max k + 1)): each row against the best ones
    self_sim = np.einsum("nd,nd->n", f, f)
    place = np.empty(size, np.int64)
    place[order] = np.arange(size)
    out = {}
    for k in ks:
        k_eff = min(k, size - 1)
        if k_eff == 0:
            out[k] = np.zeros(size)
            continue
        best = sim[:, : k_eff + 1].sum(1)
        # A row among the k + 1 best leaves itself out of them; any other row takes the k best.
        out[k] = np.where(place <= k_eff, best - self_sim, best - sim[:, k_eff]) / k_eff
    return out


def consensus(fused: np.ndarray, mean: np.ndarray, logits: np.ndarray, groups: np.ndarray,
              ks: list[int], rounds: int = 1) -> dict[str, np.ndarray]:
    """Pseudo-relevance feedback: `consensus<k>` per row, the mean cosine similarity of its fused vector
    (minus `mean`, the member's mean over the evaluation splits) to those of the k best-scored OTHER
    candidates of its query (fewer when the query has fewer; 0 for a lone candidate).

    With `rounds` R > 1, round r (features `consensus<k>_r<r>`) takes the k best by a refined key instead:
    the z-score of the member's score plus the z-score of round r - 1's consensus at K (5), so an answer the
    member ranked low but that resembles its best candidates moves into the reference set. On valid out of
    fold, a second round lifted the re-ranker by +0.005 on average over 17 member sets on 8 worlds
    (BENCHMARKS.md).

    No labels: only the member's own scores and vectors of the query's candidates, so a served query
    gets the same values as in the stage. One query at a time (a query is ~30 rows).
    """
    logits = np.asarray(logits, np.float64)
    names = {(r, k): f"consensus{k}" + (f"_r{r}" if r > 1 else "") for r in range(1, rounds + 1) for k in ks}
    out = {name: np.zeros(len(logits)) for name in names.values()}
    if not ks or not len(logits):
        return out
    key, wanted = logits, sorted(set(ks) | ({K} if rounds > 1 else set()))
    score_z = per_query(logits, groups)["z"] if rounds > 1 else None
    for r in range(1, rounds + 1):
        at_k = np.zeros(len(logits))
        for rows, f in _query_vectors(fused, mean, groups):
            sims = _top_k_similarity(f, key[rows], wanted)
            for k in ks:
                out[names[r, k]][rows] = sims[k]
            if K in sims:
                at_k[rows] = sims[K]
        if r < rounds:
            key = score_z + per_query(at_k, groups)["z"]
    return out


def density(fused: np.ndarray, mean: np.ndarray, groups: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """`density<k>` per row: the mean cosine similarity of its fused vector (minus `mean`) to its k most
    similar OTHER candidates of its query (fewer when the query has fewer; 0 for a lone candidate).

    The consensus features look at the candidates the member scores best; this looks at none of the scores.
    A query's answers all show what it names, so they form a tight group, which a candidate the member
    misjudges still belongs to. On valid out of fold, it lifted the re-ranker by +0.003 on average over 17
    member sets on 8 worlds (BENCHMARKS.md). No labels; one query at a time.
    """
    out = {f"density{k}": np.zeros(len(groups)) for k in ks}
    if not ks or not len(groups):
        return out
    for rows, f in _query_vectors(fused, mean, groups):
        sim = f @ f.T  # (n, n)
        np.fill_diagonal(sim, -np.inf)
        nearest = -np.sort(-sim, axis=1)  # (n, n) each row's similarities, largest first, itself last
        for k in ks:
            k_eff = min(k, len(rows) - 1)
            if k_eff > 0:
                out[f"density{k}"][rows] = nearest[:, :k_eff].mean(1)
    return out


class MemberOutput(NamedTuple):
    """What the re-ranker reads of one member on one split, row by row."""

    logits: np.ndarray  # (rows,)
    components: np.ndarray | None  # (rows, pca_dims): principal components of its fused vectors (`project`)
    details: dict[str, np.ndarray] | None = None  # name -> (rows,): its score table's extra columns (+ consensus)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def box_view_features(store: FeatureStore, best_box: np.ndarray | None = None) -> np.ndarray:
    """A box view's fused vectors: each image's largest-box ROI feature; with `best_box` (the member's best
    box per row, `FeatureStore.box_features`), float16 (rows, 4096): both L2-normalised, side by side. The
    largest box is usually the product; the best box is where the member saw the query, which the largest
    misses when the product is not the large box or clutter fills the frame."""
    largest = store.largest_box_features()
    if best_box is None:
        return largest
    return np.concatenate([_unit(largest), _unit(store.box_features(best_box))], axis=1).astype(np.float16)



def fitted_box_view(store: FeatureStore, best_box: np.ndarray | None, with_best: bool, where: str) -> np.ndarray:
    """`box_view_features` as the re-ranker was fitted: with the member's best box when `with_best` (a member in
    `FeatureSpec.best_boxes`; an error naming `where` if this table names none), else the largest box alone."""
    if with_best and best_box is None:
        raise UserError(f"{where}: no best box, which the re-ranker was fitted with (re-run `mmrecall evaluate`)")
    return box_view_features(store, best_box if with_best else None)

def member_output(logits: np.ndarray, fused: np.ndarray, details: dict | None, groups: np.ndarray,
                  pca: tuple[np.ndarray, np.ndarray] | None, spec: FeatureSpec) -> MemberOutput:
    """One member's MemberOutput on one split (the stage and the served ranker both build it here).

    `pca`: the member's (mean, components) (`fit_pca`; None without PCA, consensus and density); `groups`:
    query id per row; `spec`: which consensus and density features."""
    details = dict(details or {})
    if spec.consensus:
        details.update(consensus(fused, pca[0], logits, groups, spec.consensus, spec.consensus_rounds))
    if spec.density:
        details.update(density(fused, pca[0], groups, spec.density))
    components = project(fused, *pca) if pca is not None and len(pca[1]) else None
    return MemberOutput(np.asarray(logits), components, details or None)


@dataclass
class FeatureSpec:
    """What turns member outputs + a store into the re-ranker's matrix (saved with the boosters)."""

    members: list[str]
    pca_dims: int
    ensemble_weights: dict
    names: list[str] = field(default_factory=list)
    consensus: list[int] = field(default_factory=list)  # k's of the consensus features (none in older specs)
    consensus_rounds: int = 1  # rounds of them (1 in older specs)
    density: list[int] = field(default_factory=list)  # k's of the density features (none in older specs)
    views: list[str] = field(default_factory=list)  # members that also join on smoothed boxes, as <member>-knn
    box_views: list[str] = field(default_factory=list)  # members that also join in raw box features, as <member>-box
    best_boxes: list[str] = field(default_factory=list)  # box views that add their member's best box (none in older specs)

    @property
    def sources(self) -> list[str]:
        """Every source of features, in column order: the members, their smoothed views (<member>-knn), then
        their box views (<member>-box)."""
        return self.members + [view(m) for m in self.views] + [box_view(m) for m in self.box_views]

    @property
    def box_sources(self) -> list[str]:
        return [box_view(m) for m in self.box_views]

    @property
    def uses_fused(self) -> bool:
        """Whether the members' fused vectors are read: PCA components, consensus or density."""
        return bool(self.pca_dims or self.consensus or self.density)


def build_features(
    store: FeatureStore,
    outputs: dict[str, MemberOutput],
    spec: FeatureSpec,
    counts: pd.Series,
    ensemble: np.ndarray | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """(feature matrix, ensemble probability) of every store row.

    `outputs`: source (a member or one of its views, `spec.sources`) -> its MemberOutput (components None
    without PCA).
    `ensemble`: the rows' ensemble probability when the caller has it (valid's out-of-fold one);
    otherwise the weighted sum with `spec.ensemble_weights`.
    """
    groups = store.rows.query_id.to_numpy()
    cols: dict[str, np.ndarray] = {}
    scores = {m: np.asarray(outputs[m].logits, np.float64) for m in spec.sources}
    members = {m: scores[m] for m in spec.members}  # the ensemble is the members' (their views are features only)
    ens = ensemble_scores(members, spec.ensemble_weights) if ensemble is None else ensemble
    for m in spec.sources:
        cols[f"{m}.score"] = scores[m]
        for key, value in per_query(scores[m], groups).items():
            cols[f"{m}.{key}"] = value
        if spec.pca_dims:
            proj = outputs[m].components
            for j in range(proj.shape[1]):
                cols[f"{m}.pc{j}"] = proj[:, j]
        for name, detail in (outputs[m].details or {}).items():
            cols[f"{m}.{name}"] = np.asarray(detail, np.float64)
            for key, value in per_query(cols[f"{m}.{name}"], groups).items():
                cols[f"{m}.{name}.{key}"] = value
    cols["ensemble"] = ens
    for key, value in per_query(ens, groups).items():
        cols[f"ensemble.{key}"] = value
    cols.update(candidate_features(store, counts))
    X = pd.DataFrame(cols).astype(np.float32)
    if spec.names and list(X.columns) != spec.names:
        missing = sorted(set(spec.names) - set(X.columns))
        if missing:
            raise UserError(f"re-ranker features differ from the saved spec (models/rerank/spec.json): missing "
                             f"{missing}; re-run `mmrecall rerank`")
        X = X[spec.names]  # columns the saved boosters never saw (a member now reporting details) are left out
    return X, ens
