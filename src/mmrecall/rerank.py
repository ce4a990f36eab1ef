"""`rerank`: the ensemble of members and a LightGBM re-ranker fitted on valid, evaluated honestly.

- Ensemble (1st place, spec §3.8): per row, the weighted sum of the members' probabilities
  sigmoid(logit), weights from params `rerank.ensemble_weights` (missing = 1).
- Re-ranker (spec §3.7, one model over all members instead of one per checkpoint): LightGBM, objective
  `binary` or `lambdarank`, on features per (query, candidate) row:
    member scores, their per-query rank / z-score / gap to the query's best, the ensemble probability;
    the first `pca_dims` principal components of each member's fused vector (PCA fitted on the fused
    vectors of every evaluation split: unsupervised, no labels);
    candidate features: num_boxes, kept boxes, image size, box area / aspect statistics, label
    histogram summary, the candidate's number of rows over all evaluation files (valid + testA +
    testB), its gap to the query's least frequent candidate and to the frequency filter's threshold
    (the 5th smallest count of the query, spec §3.9); the query's word count.
- Honest evaluation: queries of valid are split into `folds` groups; every valid row gets its
  prediction from the booster of the fold that held its query out, and that booster early-stops on
  a share of ITS training queries. The out-of-fold valid NDCG@5 is the honest one. Test rows get the
  mean prediction over the fold boosters.

Outputs: outputs/ensemble[-knn]/ and outputs/rerank[-knn]/<split>.parquet (score tables; -knn = built on
the members' scores on smoothed boxes, outputs/smoothed/<member>/, when the smooth stage wrote them), models/rerank/ (the boosters of the variant
params `rerank.smoothing` picks, as LightGBM text files, the PCA and the feature spec: what the
registered model loads), metrics/rerank.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from . import tracking
from .config import Params, RerankParams, flatten, load_params, to_dict
from .evaluate import candidate_counts, eval_stores, model_report
from .metrics import K, METRIC, write_metrics
from .smoothing import SUFFIX, smoothed_folder
from .store import FeatureStore
from .text import words

MODEL_DIR = Path("models") / "rerank"
SPEC, PCA, COUNTS = "spec.json", "pca.npz", "counts.parquet"
NUM_LABELS = 33


# --- features ------------------------------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def ensemble_scores(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of member probabilities (1st place: equal weights)."""
    return sum(float(weights.get(m, 1.0)) * sigmoid(np.asarray(s, np.float64)) for m, s in scores.items())


def per_query(values: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Rank (0 = best, as a share of the query's candidates), z-score and gap to the best, per query."""
    df = pd.DataFrame({"g": groups, "v": np.asarray(values, np.float64)})
    grp = df.groupby("g", sort=False).v
    size = grp.transform("size").to_numpy()
    return {
        "rank": ((grp.rank(ascending=False, method="average").to_numpy() - 1) / np.maximum(size - 1, 1)),
        "z": ((df.v - grp.transform("mean")) / (grp.transform("std").fillna(0.0) + 1e-6)).to_numpy(),
        "gap": (df.v - grp.transform("max")).to_numpy(),
    }


def candidate_features(store: FeatureStore, counts: pd.Series) -> dict[str, np.ndarray]:
    """Per row: box, label and frequency features of the candidate; query length."""
    rows = store.rows
    offsets, n = rows.offset.to_numpy(), rows.n_kept.to_numpy().astype(np.float64)
    boxes, labels = np.asarray(store.boxes), np.asarray(store.labels).astype(np.int64)
    area, aspect = boxes[:, 4].astype(np.float64), np.log(np.maximum(boxes[:, 5], 1e-6)).astype(np.float64)
    hist = np.zeros((len(labels), NUM_LABELS), np.float64)
    hist[np.arange(len(labels)), labels] = 1.0
    if len(rows) and len(offsets):
        sums = lambda a: np.add.reduceat(a, offsets, axis=0)  # noqa: E731 (rows own contiguous, ordered blocks)
        hist_rows = sums(hist)
        area_max = np.maximum.reduceat(area, offsets)
        area_mean, aspect_mean = sums(area) / n, sums(aspect) / n
    else:
        hist_rows = np.zeros((0, NUM_LABELS))
        area_max = area_mean = aspect_mean = np.zeros(0)
    count = rows.product_id.map(counts).fillna(1).to_numpy(np.float64)
    groups = rows.query_id.to_numpy()
    by_query = pd.Series(count).groupby(groups)
    count_min = by_query.transform("min").to_numpy()
    # The frequency filter's threshold (spec §3.9): the 5th smallest count of the query.
    count_kth = by_query.transform(lambda c: np.sort(c.to_numpy())[min(K, len(c)) - 1]).to_numpy()
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
        "cand_count": count,
        "cand_count_gap": count - count_min,
        "cand_count_kth_gap": count - count_kth,  # <= 0: the frequency filter keeps it
        "query_words": rows.query_clean.map(lambda q: len(words(q))).to_numpy(np.float64),
        "query_candidates": pd.Series(groups).groupby(groups).transform("size").to_numpy(np.float64),
    }


def fit_pca(blocks: list[np.ndarray], dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (dims, D)) of the stacked rows, by an eigendecomposition of the covariance.

    torch with one thread: numpy's threaded BLAS took seconds for this on a shared 2-core machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(np.concatenate([np.asarray(b, np.float64) for b in blocks]))
        mean = x.mean(0)
        xc = x - mean
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        comps = vecs.flip(1)[:, :dims].T.numpy().copy()
    finally:
        torch.set_num_threads(threads)
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]  # a fixed sign
    return mean.numpy().astype(np.float32), comps.astype(np.float32)


@dataclass
class FeatureSpec:
    """What turns member outputs + a store into the re-ranker's matrix (saved with the boosters)."""

    members: list[str]
    pca_dims: int
    ensemble_weights: dict
    names: list[str] = field(default_factory=list)


def build_features(
    store: FeatureStore,
    outputs: dict[str, tuple[np.ndarray, np.ndarray]],
    spec: FeatureSpec,
    pca: dict[str, tuple[np.ndarray, np.ndarray]],
    counts: pd.Series,
) -> tuple[pd.DataFrame, np.ndarray]:
    """(feature matrix, ensemble probability) of every store row; `outputs`: member -> (logits, fused)."""
    groups = store.rows.query_id.to_numpy()
    cols: dict[str, np.ndarray] = {}
    scores = {m: np.asarray(outputs[m][0], np.float64) for m in spec.members}
    ens = ensemble_scores(scores, spec.ensemble_weights)
    for m in spec.members:
        cols[f"{m}.score"] = scores[m]
        for key, value in per_query(scores[m], groups).items():
            cols[f"{m}.{key}"] = value
        if spec.pca_dims:
            mean, comps = pca[m]
            proj = (np.asarray(outputs[m][1], np.float32) - mean) @ comps.T
            for j in range(proj.shape[1]):
                cols[f"{m}.pc{j}"] = proj[:, j]
    cols["ensemble"] = ens
    for key, value in per_query(ens, groups).items():
        cols[f"ensemble.{key}"] = value
    cols.update(candidate_features(store, counts))
    X = pd.DataFrame(cols).astype(np.float32)
    if spec.names and list(X.columns) != spec.names:
        extra, missing = sorted(set(X.columns) - set(spec.names)), sorted(set(spec.names) - set(X.columns))
        raise ValueError(f"re-ranker features differ from the saved spec (models/rerank/spec.json): new {extra}, "
                         f"missing {missing}; re-run `mmrecall rerank`")
    return X, ens


# --- query-grouped K-fold --------------------------------------------------------------------------


def query_folds(query_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row; all rows of a query share one fold; deterministic given the seed."""
    uniq = np.unique(query_ids)
    if len(uniq) < k:
        raise ValueError(f"rerank.folds = {k} but valid has only {len(uniq)} queries")
    fold_of_query = np.empty(len(uniq), np.int64)
    fold_of_query[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % k
    return fold_of_query[np.searchsorted(uniq, query_ids)]


def lgb_params(rp: RerankParams) -> tuple[dict, dict]:
    if rp.objective not in ("binary", "lambdarank"):
        raise ValueError(f"rerank.objective: {rp.objective!r}, expected binary or lambdarank")
    extra = {"metric": "binary_logloss"} if rp.objective == "binary" else {"metric": "ndcg", "eval_at": [5]}
    p = to_dict(rp.lgbm)
    rounds = {k: p.pop(k) for k in ("num_boost_round", "early_stopping_rounds")}
    return {"objective": rp.objective, **extra, **p, "seed": rp.seed, "deterministic": True, "force_col_wise": True,
            "verbosity": -1}, rounds


def _dataset(X: pd.DataFrame, y: np.ndarray, q: np.ndarray, idx: np.ndarray, ranking: bool, reference=None):
    idx = idx[np.argsort(q[idx], kind="stable")]  # lambdarank needs each query's rows together
    group = np.unique(q[idx], return_counts=True)[1] if ranking else None
    return lgb.Dataset(X.iloc[idx], y[idx], group=group, reference=reference, free_raw_data=False)


@dataclass
class OOFResult:
    oof: np.ndarray  # valid predictions, each from the booster that never saw its query
    tests: dict[str, np.ndarray]  # other splits: mean over the fold boosters
    boosters: list[lgb.Booster]
    folds: list[dict]  # per fold: held-out, training and early-stopping query ids, best iteration


def fit_oof(X: pd.DataFrame, y: np.ndarray, query_ids: np.ndarray, tests: dict[str, pd.DataFrame], rp: RerankParams) -> OOFResult:
    params, rounds = lgb_params(rp)
    ranking = rp.objective == "lambdarank"
    fold = query_folds(query_ids, rp.folds, rp.seed)
    oof = np.full(len(X), np.nan)
    test_preds = {s: np.zeros(len(t)) for s, t in tests.items()}
    boosters, info = [], []
    for k in range(rp.folds):
        held = np.flatnonzero(fold == k)
        train_q = np.unique(query_ids[fold != k])
        rng = np.random.default_rng([rp.seed, k])
        n_es = max(1, int(round(rp.early_stopping_share * len(train_q))))
        es_q = rng.choice(train_q, size=n_es, replace=False)
        fit_q = np.setdiff1d(train_q, es_q)
        fit_idx = np.flatnonzero(np.isin(query_ids, fit_q))
        es_idx = np.flatnonzero(np.isin(query_ids, es_q))
        dtrain = _dataset(X, y, query_ids, fit_idx, ranking)
        dvalid = _dataset(X, y, query_ids, es_idx, ranking, reference=dtrain)
        booster = lgb.train(params, dtrain, num_boost_round=rounds["num_boost_round"], valid_sets=[dvalid],
                            callbacks=[lgb.early_stopping(rounds["early_stopping_rounds"], verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        oof[held] = booster.predict(X.iloc[held], num_iteration=best)
        for s, t in tests.items():
            test_preds[s] += booster.predict(t, num_iteration=best) / rp.folds
        boosters.append(booster)
        info.append({"fold": k, "held_out": np.unique(query_ids[held]).tolist(), "fit": fit_q.tolist(),
                     "early_stopping": np.sort(es_q).tolist(), "best_iteration": int(best)})
    return OOFResult(oof, test_preds, boosters, info)


# --- the stage --------------------------------------------------------------------------------


def read_member_outputs(outputs_dir: Path, member: str, split: str, store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """(logits, fused) of a member on a split, checked against the store's rows."""
    folder = outputs_dir / member
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no score table for member {member!r} (params rerank.members; "
                                f"smoothed members come from `mmrecall smooth`)")
    table = pd.read_parquet(path)
    fused = np.load(folder / f"{split}_fused.npy")
    rows = store.rows
    if len(table) != len(rows) or len(fused) != len(rows) or not (
        (table.query_id.to_numpy() == rows.query_id.to_numpy()).all()
        and (table.product_id.to_numpy() == rows.product_id.to_numpy()).all()
    ):
        raise ValueError(f"{path}: rows do not match the feature store of {split} (re-run the member's stage)")
    return table.score.to_numpy(), fused


def score_table(store: FeatureStore, score: np.ndarray) -> pd.DataFrame:
    rows = store.rows
    return pd.DataFrame({"query_id": rows.query_id.to_numpy(), "product_id": rows.product_id.to_numpy(),
                         "score": np.asarray(score, np.float64)})


def labels_of(store: FeatureStore) -> np.ndarray:
    answers = store.answers
    if not answers:
        raise FileNotFoundError(f"{store.root}: no answers.json; the re-ranker needs valid's answers")
    rows = store.rows
    return np.array([p in answers.get(q, ()) for q, p in zip(rows.query_id, rows.product_id)], dtype=np.float64)


@dataclass
class Variant:
    spec: FeatureSpec
    pca: dict
    result: OOFResult
    ensemble: dict[str, pd.DataFrame]
    rerank: dict[str, pd.DataFrame]
    importance: dict[str, float]


def fit_variant(params: Params, stores: dict[str, FeatureStore], counts: pd.Series, smoothing: bool) -> Variant:
    rp = params.rerank
    names = tracking.member_names(params, rp.members)
    outputs_dir = Path(params.data.outputs)
    folder = smoothed_folder if smoothing else str
    outs = {s: {m: read_member_outputs(outputs_dir, folder(m), s, st) for m in names} for s, st in stores.items()}
    spec = FeatureSpec(names, rp.pca_dims, dict(rp.ensemble_weights))
    pca = {m: fit_pca([outs[s][m][1] for s in stores], rp.pca_dims) for m in names} if rp.pca_dims else {}
    mats = {s: build_features(st, outs[s], spec, pca, counts) for s, st in stores.items()}
    spec.names = list(mats["valid"][0].columns)
    valid = stores["valid"]
    tests = {s: m[0] for s, m in mats.items() if s != "valid"}
    result = fit_oof(mats["valid"][0], labels_of(valid), valid.rows.query_id.to_numpy(), tests, rp)
    preds = {"valid": result.oof, **result.tests}
    gain = sum(b.feature_importance("gain") for b in result.boosters)
    importance = dict(sorted(zip(spec.names, (gain / gain.sum()).round(4).tolist()), key=lambda kv: -kv[1])[:15])
    return Variant(spec, pca, result,
                   {s: score_table(st, mats[s][1]) for s, st in stores.items()},
                   {s: score_table(st, preds[s]) for s, st in stores.items()}, importance)


def save_model(variant: Variant, params: Params, counts: pd.Series, smoothing: bool, metrics: dict, folder: Path = MODEL_DIR) -> None:
    """The chosen variant as files the registered model loads: boosters, PCA, counts, spec."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, booster in enumerate(variant.result.boosters):
        booster.save_model(str(folder / f"booster_fold{i}.txt"), num_iteration=variant.result.folds[i]["best_iteration"])
    np.savez(folder / PCA, **{f"{m}.mean": v[0] for m, v in variant.pca.items()},
             **{f"{m}.components": v[1] for m, v in variant.pca.items()})
    counts.rename("count").rename_axis("product_id").reset_index().to_parquet(folder / COUNTS, index=False)
    spec = {
        "members": variant.spec.members,
        "pca_dims": variant.spec.pca_dims,
        "ensemble_weights": variant.spec.ensemble_weights,
        "names": variant.spec.names,
        "objective": params.rerank.objective,
        "folds": len(variant.result.boosters),
        "smoothing": smoothing,
        "smooth": to_dict(params.smooth) | {"members": None},
        "box_cap": params.prepare.box_cap,
        "metrics": metrics,
    }
    (folder / SPEC).write_text(json.dumps(spec, indent=2) + "\n")


def run_stage(params: Params, progress: bool = True) -> dict:
    import mlflow

    started = time.perf_counter()
    stores = eval_stores(params)
    if "valid" not in stores:
        raise FileNotFoundError(f"{params.data.features}/valid: the re-ranker is fitted on valid; run prepare first")
    counts = candidate_counts(stores)
    names = tracking.member_names(params, params.rerank.members)
    outputs_dir = Path(params.data.outputs)
    have_knn = all((outputs_dir / smoothed_folder(m) / "valid.parquet").exists() for m in names)
    if params.rerank.smoothing and not have_knn:
        raise FileNotFoundError("params rerank.smoothing is true but outputs/smoothed/<member>/ are missing for some of "
                                f"{names}: run `mmrecall smooth` with them in params smooth.members")
    for kind in ("ensemble", "rerank"):  # the stage's outs, even when there is nothing smoothed to build on
        for suffix in ("", SUFFIX):
            (outputs_dir / f"{kind}{suffix}").mkdir(parents=True, exist_ok=True)
    report: dict = {}
    chosen = None
    for smoothing in [False, True] if have_knn else [False]:
        t0 = time.perf_counter()
        variant = fit_variant(params, stores, counts, smoothing)
        suffix = SUFFIX if smoothing else ""
        for kind, tables in (("ensemble", variant.ensemble), ("rerank", variant.rerank)):
            folder = outputs_dir / f"{kind}{suffix}"
            folder.mkdir(parents=True, exist_ok=True)
            for split, table in tables.items():
                table.to_parquet(folder / f"{split}.parquet", index=False)
            report[f"{kind}{suffix}"] = model_report(tables, params, stores)
        report[f"rerank{suffix}"].update(
            best_iterations=[f["best_iteration"] for f in variant.result.folds],
            seconds=round(time.perf_counter() - t0, 1), top_features=variant.importance)
        if smoothing == params.rerank.smoothing:
            chosen = variant, smoothing
        if progress:
            print(f"rerank{suffix}: " + json.dumps({k: v for k, v in report[f'rerank{suffix}'].items() if k != 'top_features'}),
                  file=sys.stderr)
    variant, smoothing = chosen
    key = f"rerank{SUFFIX if smoothing else ''}"
    honest = {"valid_oof": report[key]["valid"], **{s: v for s, v in report[key].items() if s in stores and s != "valid"}}
    save_model(variant, params, counts, smoothing, honest)
    report["chosen"] = key
    report["seconds"] = round(time.perf_counter() - started, 1)
    with tracking.start_run("rerank", stage="rerank", params=flatten({"rerank": to_dict(params.rerank)}),
                            experiment=params.tracking.experiment, tags={"model": "rerank"}):
        flat = {f"{METRIC}_{k}_{s}" + ("_pp" if m.endswith("_pp") else ""): v
                for k in ("ensemble", "rerank") for s, vals in report[k].items() if isinstance(vals, dict) and s in stores
                for m, v in vals.items()}
        mlflow.log_metrics({METRIC: report[key]["valid"][METRIC], **flat, "seconds": report["seconds"]})
        mlflow.log_dict(report, "rerank.json")
    write_metrics(params.data.metrics, "rerank", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall rerank",
        description="Ensemble of the members (weighted sum of probabilities) and a LightGBM re-ranker fitted on "
        "valid with query-grouped K-fold: every valid row is scored by a booster that never saw its query "
        "(the honest NDCG@5), test rows by the mean of the fold boosters. Writes outputs/ensemble/, "
        "outputs/rerank/ (and -knn variants when `mmrecall smooth` ran), models/rerank/ and metrics/rerank.json.",
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = run_stage(load_params(args.params), progress=not args.no_progress)
    print(json.dumps({k: report[k] for k in ("ensemble", "rerank")}, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
