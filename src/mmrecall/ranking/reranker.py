"""The LightGBM re-ranker, fitted on valid with query-grouped K-fold, and its folder on disk.

The 1st place fitted one LightGBM per checkpoint on valid; here one model takes every member's features
(ranking/features.py), objective `binary` or `lambdarank`.

Honest evaluation: queries of valid are split into `folds` groups; every valid row gets its prediction
from the booster of the fold that held its query out, and that booster early-stops on a share of ITS
training queries. The out-of-fold valid NDCG@5 is the honest one. With `repeats` R > 1 this is done R
times with other folds and seeds: a valid row gets the mean of its R held-out boosters (still honest),
a test row the mean of all folds x R boosters. On valid out of fold, 3 rounds lifted the re-ranker on
the hardest world every time (BENCHMARKS.md).

The folder (models/rerank/ by default), written by `save` and read by `load`: booster_fold<i>.txt
(LightGBM text files, i over folds x repeats), pca.npz (each member's fused mean and components),
counts.parquet (candidate counts over the evaluation files), spec.json (members, feature names, preprocessing
settings, honest metrics, and the submission's rule).

The submission's rule (`submission_rule`, params rerank.submission): the re-ranker's scores or the ensemble's,
each as they are or after the post-processing of evaluate.postprocess. `auto` takes the one with the best valid
NDCG@5, out of fold for both. On a strong re-ranker that is the re-ranker (on the real valid files the frequency
filter after it cost 0.009); where the members are weak, the ensemble after the filter can beat it
(BENCHMARKS.md, "The submission's rule").
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from ..config import SUBMISSION_RULES, Params, ParamsError, RerankParams, member_names, to_dict
from ..data.store import FeatureStore
from ..errors import MissingInputError, UserError
from . import outputs
from .ensemble import learn_weights, learn_weights_oof
from .features import FeatureSpec, build_features, fit_pca, fitted_box_view, member_output
from .metrics import METRIC

log = logging.getLogger(__name__)

MODEL_DIR = Path("models") / "rerank"
SPEC, PCA, COUNTS = "spec.json", "pca.npz", "counts.parquet"


# --- query-grouped K-fold --------------------------------------------------------------------------


def query_folds(query_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row; all rows of a query share one fold; deterministic given the seed."""
    uniq = np.unique(query_ids)
    if len(uniq) < k:
        raise UserError(f"params rerank.folds = {k} but valid has only {len(uniq)} queries")
    fold_of_query = np.empty(len(uniq), np.int64)
    fold_of_query[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % k
    return fold_of_query[np.searchsorted(uniq, query_ids)]


def lgb_params(rp: RerankParams) -> tuple[dict, dict]:
    if rp.objective not in ("binary", "lambdarank"):
        raise ParamsError(f"params rerank.objective: {rp.objective!r}, expected binary or lambdarank")
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
    oof: np.ndarray  # valid predictions, each the mean of the round boosters that never saw its query
    tests: dict[str, np.ndarray]  # other splits: mean over the fold boosters
    boosters: list[lgb.Booster]
    folds: list[dict]  # per booster: its round and fold, held-out, training and early-stopping query ids, best iteration


def fit_oof(X: pd.DataFrame, y: np.ndarray, query_ids: np.ndarray, tests: dict[str, pd.DataFrame], rp: RerankParams) -> OOFResult:
    """`rp.repeats` rounds of query-grouped K-fold, round r with seed `rp.seed + r` (its own folds, early-stopping
    queries and LightGBM seed). A valid row's prediction is the mean of the boosters that never saw its query (one
    per round), a test row's the mean of all boosters."""
    params, rounds = lgb_params(rp)
    ranking = rp.objective == "lambdarank"
    oof = np.zeros(len(X))
    test_preds = {s: np.zeros(len(t)) for s, t in tests.items()}
    boosters, info = [], []
    for r in range(rp.repeats):
        seed = rp.seed + r
        fold = query_folds(query_ids, rp.folds, seed)
        for k in range(rp.folds):
            held = np.flatnonzero(fold == k)
            train_q = np.unique(query_ids[fold != k])
            rng = np.random.default_rng([seed, k])
            n_es = max(1, int(round(rp.early_stopping_share * len(train_q))))
            es_q = rng.choice(train_q, size=n_es, replace=False)
            fit_q = np.setdiff1d(train_q, es_q)
            fit_idx = np.flatnonzero(np.isin(query_ids, fit_q))
            es_idx = np.flatnonzero(np.isin(query_ids, es_q))
            dtrain = _dataset(X, y, query_ids, fit_idx, ranking)
            dvalid = _dataset(X, y, query_ids, es_idx, ranking, reference=dtrain)
            booster = lgb.train({**params, "seed": seed}, dtrain, num_boost_round=rounds["num_boost_round"],
                                valid_sets=[dvalid],
                                callbacks=[lgb.early_stopping(rounds["early_stopping_rounds"], verbose=False)])
            best = booster.best_iteration or booster.current_iteration()
            oof[held] += booster.predict(X.iloc[held], num_iteration=best) / rp.repeats
            for s, t in tests.items():
                test_preds[s] += booster.predict(t, num_iteration=best) / (rp.folds * rp.repeats)
            boosters.append(booster)
            info.append({"repeat": r, "fold": k, "held_out": np.unique(query_ids[held]).tolist(), "fit": fit_q.tolist(),
                         "early_stopping": np.sort(es_q).tolist(), "best_iteration": int(best)})
    return OOFResult(oof, test_preds, boosters, info)


# --- fitting on member outputs ------------------------------------------------------------------


def labels_of(store: FeatureStore) -> np.ndarray:
    answers = store.answers
    if not answers:
        raise MissingInputError(f"{store.root}: no answers.json; the re-ranker needs valid's answers")
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


def read_members(outputs_dir: Path, folders: list[str], stores: dict[str, FeatureStore], spec: FeatureSpec
                 ) -> tuple[dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """({split: {source: MemberOutput}}, {source: (mean, components)}) of `spec.sources` (the members, then their
    smoothed views, then their box views), read from `folders` (one per source; a box view's is its member's:
    its scores, with `box_view_features` as the fused vector and no details).

    One source at a time: its fused vectors (memory-mapped) are read in chunks by the PCA and the
    projection, one query at a time by the consensus and density features, and only their `pca_dims`
    components and those features are kept, so memory does not grow with the members.
    """
    outs: dict[str, dict] = {s: {} for s in stores}
    pca = {}
    box_member = dict(zip(spec.box_sources, spec.box_views))
    for name, folder in zip(spec.sources, folders, strict=True):
        member = {s: outputs.read_member(outputs_dir, folder, s, st) for s, st in stores.items()}
        if name in box_member:
            with_best = box_member[name] in spec.best_boxes
            where = {s: str(outputs.table_path(outputs_dir, folder, s)) for s in member}
            member = {s: (logits, fitted_box_view(stores[s], best, with_best, where[s]), None, None)
                      for s, (logits, _, _, best) in member.items()}
        if spec.uses_fused:
            pca[name] = fit_pca([fused for _, fused, _, _ in member.values()], spec.pca_dims)
        for s, (logits, fused, details, _) in member.items():
            outs[s][name] = member_output(logits, fused, details, stores[s].rows.query_id.to_numpy(), pca.get(name),
                                          spec)
    return outs, pca


def feature_spec(rp: RerankParams, members: list[str], views: list[str] = (), box_views: list[str] = ()
                 ) -> FeatureSpec:
    """The features `rp` asks for, from `members`, the smoothed `views` of some and the `box_views` of some
    (names are filled in by the first build)."""
    return FeatureSpec(members, rp.pca_dims, dict(rp.ensemble_weights), consensus=list(rp.consensus),
                       consensus_rounds=rp.consensus_rounds, density=list(rp.density), views=list(views),
                       box_views=list(box_views))


def _chosen_members(params: Params, key: str, members: list[str]) -> list[str]:
    """The members of `rerank.<key>` (a model name = its members; None = all, [] = none) that are re-ranker
    members."""
    chosen = getattr(params.rerank, key)
    named = [] if chosen == [] else member_names(params, chosen)
    left_out = [v for v in named if v not in members]
    if left_out:
        log.info("rerank.%s: %s not among the re-ranker's members %s, left out", key, left_out, members)
    return [v for v in named if v in members]


def smoothed_views(params: Params, members: list[str]) -> list[str]:
    """The members of `rerank.smoothed_views` that are re-ranker members."""
    return _chosen_members(params, "smoothed_views", members)


def box_views(params: Params, members: list[str]) -> list[str]:
    """The members of `rerank.box_views` that are re-ranker members."""
    return _chosen_members(params, "box_views", members)


def fit_variant(params: Params, stores: dict[str, FeatureStore], counts: pd.Series, smoothing: bool) -> Variant:
    """The ensemble and re-ranker on the members' outputs (`smoothing`: all of them on smoothed boxes; else the
    plain outputs, plus the smoothed views of `rerank.smoothed_views`), and the box views of `rerank.box_views`."""
    rp = params.rerank
    names = member_names(params, rp.members)
    outputs_dir = Path(params.data.outputs)
    views = [] if smoothing else smoothed_views(params, names)
    boxes = box_views(params, names)
    spec = feature_spec(rp, names, views, boxes)
    member_folder = {m: outputs.smoothed(m) if smoothing else m for m in names}
    spec.best_boxes = [m for m in boxes if outputs.has_best_box(outputs_dir, member_folder[m], "valid")]
    folders = [member_folder[m] for m in names] + [outputs.smoothed(m) for m in views] + [member_folder[m] for m in boxes]
    outs, pca = read_members(outputs_dir, folders, stores, spec)
    valid = stores["valid"]
    labels, query_ids = labels_of(valid), valid.rows.query_id.to_numpy()
    valid_ensemble = None  # with learned weights: each valid row's from weights fitted on the other folds
    if rp.learn_weights:
        valid_scores = {m: np.asarray(outs["valid"][m].logits, np.float64) for m in names}
        spec.ensemble_weights = learn_weights(valid_scores, labels)
        valid_ensemble = learn_weights_oof(valid_scores, labels, query_folds(query_ids, rp.folds, rp.seed))
    mats = {s: build_features(st, outs[s], spec, counts, valid_ensemble if s == "valid" else None)
            for s, st in stores.items()}
    spec.names = list(mats["valid"][0].columns)
    tests = {s: m[0] for s, m in mats.items() if s != "valid"}
    result = fit_oof(mats["valid"][0], labels, query_ids, tests, rp)
    preds = {"valid": result.oof, **result.tests}
    gain = sum(b.feature_importance("gain") for b in result.boosters)
    importance = dict(sorted(zip(spec.names, (gain / gain.sum()).round(4).tolist()), key=lambda kv: -kv[1])[:15])
    return Variant(spec, pca, result,
                   {s: outputs.score_table(st, mats[s][1]) for s, st in stores.items()},
                   {s: outputs.score_table(st, preds[s]) for s, st in stores.items()}, importance)


# --- the submission's rule -----------------------------------------------------------------------


@dataclass
class SubmissionRule:
    name: str  # one of config.SUBMISSION_RULES
    valid: dict[str, float]  # valid NDCG@5 of every rule that could be chosen (out of fold)
    chosen_by: str  # "valid" (rerank.submission auto) or "params"

    @property
    def scores(self) -> str:
        """Whose scores: rerank or ensemble."""
        return self.name.removesuffix("_pp")

    @property
    def postprocess(self) -> bool:
        return self.name.endswith("_pp")

    def as_spec(self) -> dict:
        return {"rule": self.name, "scores": self.scores, "postprocess": self.postprocess}


def submission_rule(valid: dict[str, dict[str, float]], setting: str = "auto") -> SubmissionRule:
    """`valid`: {"rerank": split_report, "ensemble": split_report} on valid (`ndcg_at_5`, and `ndcg_at_5_pp` when
    evaluate.postprocess switches a filter on). `setting` names a rule, or "auto": the best valid NDCG@5, the
    earlier of SUBMISSION_RULES on a tie (the re-ranker after the post-processing: the 1st place's order)."""
    values = {}
    for rule in SUBMISSION_RULES:
        key = f"{METRIC}_pp" if rule.endswith("_pp") else METRIC
        value = valid[rule.removesuffix("_pp")].get(key)
        if value is not None:
            values[rule] = float(value)
    if setting == "auto":
        best = max(values.values())
        return SubmissionRule(next(r for r in values if values[r] == best), values, "valid")
    if setting not in values:
        raise ParamsError(f"params.yaml rerank.submission: {setting!r}, but evaluate.postprocess switches no "
                          f"post-processing on; choose one of {', '.join(values)} or auto")
    return SubmissionRule(setting, values, "params")


def save(variant: Variant, params: Params, counts: pd.Series, smoothing: bool, metrics: dict, rule: SubmissionRule,
         folder: Path = MODEL_DIR, run_id: str | None = None) -> None:
    """The chosen variant as files the registered model loads: boosters, PCA, counts, spec (with the submission's
    `rule` and the post-processing it may apply, and `run_id`, the rerank stage's MLflow run)."""
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
        "consensus": variant.spec.consensus,
        "consensus_rounds": variant.spec.consensus_rounds,
        "density": variant.spec.density,
        "views": variant.spec.views,
        "box_views": variant.spec.box_views,
        "best_boxes": variant.spec.best_boxes,
        "ensemble_weights": variant.spec.ensemble_weights,
        "names": variant.spec.names,
        "objective": params.rerank.objective,
        "folds": len(variant.result.boosters),
        "smoothing": smoothing,
        "smooth": to_dict(params.smooth) | {"members": None},
        "box_cap": params.prepare.box_cap,
        "metrics": metrics,
        "submission": rule.as_spec(),
        "postprocess": to_dict(params.evaluate.postprocess),
        "mlflow_run_id": run_id,
    }
    (folder / SPEC).write_text(json.dumps(spec, indent=2) + "\n")


@dataclass
class Saved:
    """A re-ranker folder read back: its spec, the fold boosters, the PCA per member and the candidate counts."""

    spec: dict
    boosters: list[lgb.Booster]
    pca: dict[str, tuple[np.ndarray, np.ndarray]]
    counts: pd.Series

    @property
    def feature_spec(self) -> FeatureSpec:
        return _saved_feature_spec(self.spec)


def _saved_feature_spec(s: dict) -> FeatureSpec:
    """The FeatureSpec of a spec.json (older ones lack the later keys: their defaults)."""
    return FeatureSpec(s["members"], s["pca_dims"], s["ensemble_weights"], s["names"], s.get("consensus", []),
                       s.get("consensus_rounds", 1), s.get("density", []), s.get("views", []), s.get("box_views", []),
                       s.get("best_boxes", []))


def load(folder: str | Path = MODEL_DIR) -> Saved:
    folder = Path(folder)
    if not (folder / SPEC).exists():
        raise MissingInputError(f"{folder / SPEC}: no re-ranker here; run `mmrecall rerank` first")
    spec = json.loads((folder / SPEC).read_text())
    boosters = [lgb.Booster(model_file=str(folder / f"booster_fold{i}.txt")) for i in range(spec["folds"])]
    features, pca = _saved_feature_spec(spec), {}
    if features.uses_fused:
        with np.load(folder / PCA) as z:
            pca = {m: (z[f"{m}.mean"], z[f"{m}.components"]) for m in features.sources}
    counts = pd.read_parquet(folder / COUNTS).set_index("product_id")["count"]
    return Saved(spec, boosters, pca, counts)
