"""Stage 2: KNN smoothing, the out-of-fold re-ranker, the champion rule, the registered pyfunc end to end."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from mmrecall import cli, tracking
from mmrecall.config import ParamsError, PrepareParams, RerankParams, SmoothParams, load_params
from mmrecall.data.ingest import ingest_tsv
from mmrecall.errors import MissingLoggedMemberError, UserError
from mmrecall.data.store import FeatureStore
from mmrecall.models.backbone import load_tokenizer
from mmrecall.models.mcan import MCAN, MCANConfig
from mmrecall.models.word_detector import WordDetector, WordDetectorConfig
from mmrecall.ranking import members, outputs, postprocess, reranker
from mmrecall.ranking.evaluation import candidate_counts, eval_stores
from mmrecall.ranking.metrics import rank
from mmrecall.ranking.ensemble import ensemble_scores, learn_weights, learn_weights_oof
from mmrecall.ranking.features import FeatureSpec, MemberOutput, box_view_features, build_features
from mmrecall.ranking.ranker import CandidateTableError, Ranker, candidate_store, read_candidates
from mmrecall.ranking.smoothing import smooth_features, smooth_pool, smoothed_store
from mmrecall.stages import predict, prepare, register, rerank, smooth
from mmrecall.training.fit import log_checkpoint

from .conftest import bench_script

# --- smoothing ---------------------------------------------------------------------------------------


def test_per_query_features_match_pandas_group_by():
    """The numpy per-query rank / z-score / gap equal pandas' group-by (ties share their average rank)."""
    from mmrecall.ranking.features import per_query

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 9, 200) * 11 + 5  # unsorted ids, groups of different sizes
    groups[:1] = 1000  # a query with one candidate
    values = np.round(rng.normal(size=200), 1)  # many ties
    got = per_query(values, groups)
    frame = pd.DataFrame({"g": groups, "v": values})
    grp = frame.groupby("g").v
    size = grp.transform("size").to_numpy()
    np.testing.assert_allclose(got["rank"], (grp.rank(ascending=False).to_numpy() - 1) / np.maximum(size - 1, 1))
    np.testing.assert_allclose(got["z"], ((frame.v - grp.transform("mean")) / (grp.transform("std").fillna(0) + 1e-6)),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got["gap"], frame.v - grp.transform("max"))
    assert got["rank"][0] == 0.0 and got["z"][0] == 0.0 and got["gap"][0] == 0.0


def test_consensus_is_the_mean_similarity_to_the_best_other_candidates():
    """consensus<k> = mean cosine of a row's centred vector to those of its query's k best-scored other rows,
    computed by brute force here; fewer when the query is small, 0 for a lone candidate."""
    from mmrecall.ranking.features import consensus

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 6, 120) * 7 + 3  # unsorted ids
    groups[:1], groups[1:3] = 1000, 2000  # a lone candidate and a pair
    fused = rng.normal(size=(120, 16)).astype(np.float16)  # as stored
    mean = rng.normal(size=16).astype(np.float32) * 0.1
    logits = rng.normal(size=120)
    got = consensus(fused, mean, logits, groups, [1, 3, 10])
    f = fused.astype(np.float32) - mean
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    for k in (1, 3, 10):
        want = np.zeros(120)
        for i in range(120):
            others = [j for j in np.flatnonzero(groups == groups[i]) if j != i]
            best = sorted(others, key=lambda j: -logits[j])[:k]
            want[i] = np.mean(f[best] @ f[i]) if best else 0.0
        np.testing.assert_allclose(got[f"consensus{k}"], want, rtol=1e-4, atol=1e-5)
    assert got["consensus1"][0] == 0.0 and got["consensus10"][1] == got["consensus1"][1]


def test_second_consensus_round_ranks_by_score_plus_first_round():
    """Round 2 is round 1's computation with the query's candidates ranked by z(score) + z(consensus5 of
    round 1) instead of the score; round 1's features are the same with or without it."""
    from mmrecall.ranking.features import consensus, per_query

    rng = np.random.default_rng(2)
    groups = rng.integers(0, 5, 150)
    fused = rng.normal(size=(150, 12)).astype(np.float32)
    mean = np.zeros(12, np.float32)
    logits = rng.normal(size=150)
    one = consensus(fused, mean, logits, groups, [1, 3])
    two = consensus(fused, mean, logits, groups, [1, 3], rounds=2)
    assert set(two) == {"consensus1", "consensus3", "consensus1_r2", "consensus3_r2"}
    for k in (1, 3):
        np.testing.assert_array_equal(two[f"consensus{k}"], one[f"consensus{k}"])
    key = per_query(logits, groups)["z"] + per_query(consensus(fused, mean, logits, groups, [5])["consensus5"], groups)["z"]
    again = consensus(fused, mean, key, groups, [1, 3])
    for k in (1, 3):
        np.testing.assert_allclose(two[f"consensus{k}_r2"], again[f"consensus{k}"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(two["consensus3_r2"], one["consensus3"])  # the reference set did change


def test_density_is_the_mean_similarity_to_the_most_similar_other_candidates():
    """density<k> = mean cosine of a row's centred vector to its query's k most similar other rows (brute force
    here), whatever the scores; fewer when the query is small, 0 for a lone candidate."""
    from mmrecall.ranking.features import density

    rng = np.random.default_rng(3)
    groups = rng.integers(0, 4, 80) * 5
    groups[:1], groups[1:4] = 1000, 2000  # a lone candidate and a query of three
    fused = rng.normal(size=(80, 10)).astype(np.float16)
    mean = rng.normal(size=10).astype(np.float32) * 0.1
    got = density(fused, mean, groups, [1, 5])
    f = fused.astype(np.float32) - mean
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    for k in (1, 5):
        want = np.zeros(80)
        for i in range(80):
            sims = sorted((float(f[i] @ f[j]) for j in np.flatnonzero(groups == groups[i]) if j != i), reverse=True)
            want[i] = np.mean(sims[:k]) if sims else 0.0
        np.testing.assert_allclose(got[f"density{k}"], want, rtol=1e-4, atol=1e-5)
    assert got["density1"][0] == 0.0 and got["density5"][1] == pytest.approx(np.mean([f[2] @ f[1], f[3] @ f[1]]), abs=1e-5)



def test_smooth_pool_hand_computed():
    x = np.array([[0, 0], [1, 0], [3, 0], [10, 0]], np.float32)
    # box 0: nearest others 1 (d=1), 2 (d=3) -> 0.7*0 + 0.2*1 + 0.1*3 = 0.5
    # box 1: 0 (d=1), 2 (d=2) -> 0.7*1 + 0.2*0 + 0.1*3 = 1.0
    # box 2: 1 (d=2), 0 (d=3) -> 0.7*3 + 0.2*1 + 0.1*0 = 2.3
    # box 3: 2 (d=7), 1 (d=9) -> 0.7*10 + 0.2*3 + 0.1*1 = 7.7
    np.testing.assert_allclose(smooth_pool(x)[:, 0], [0.5, 1.0, 2.3, 7.7], rtol=1e-6)
    np.testing.assert_allclose(smooth_pool(x)[:, 1], 0.0)


def test_smooth_pool_duplicates_small_pools_and_weights():
    dup = np.array([[1, 1], [1, 1], [5, 5]], np.float32)  # a duplicate is a neighbour, never the box itself
    np.testing.assert_allclose(smooth_pool(dup)[0], 0.7 * 1 + 0.2 * 1 + 0.1 * 5)
    two = np.array([[0.0], [10.0]], np.float32)  # one neighbour: its missing weight goes back to the box
    np.testing.assert_allclose(smooth_pool(two)[:, 0], [0.2 * 10, 0.8 * 10])
    np.testing.assert_allclose(smooth_pool(np.array([[4.0]], np.float32)), [[4.0]])
    with pytest.raises(ValueError, match="sum to 1"):
        smooth_pool(dup, 2, (0.5, 0.2, 0.1))
    with pytest.raises(ValueError, match="k \\+ 1"):
        smooth_pool(dup, 1, (0.7, 0.2, 0.1))


def test_smooth_features_pools_are_per_query():
    # rows: q7 owns boxes 0-1 and 4, q3 owns boxes 2-3; box values along one axis
    feats = np.array([[0.0], [1.0], [100.0], [104.0], [3.0]], np.float16)
    offsets, counts, groups = np.array([0, 2, 4]), np.array([2, 2, 1]), np.array([7, 3, 7])
    out = smooth_features(feats, offsets, counts, groups).astype(np.float32)[:, 0]
    np.testing.assert_allclose(out[[0, 1, 4]], smooth_pool(np.array([[0.0], [1.0], [3.0]], np.float32))[:, 0], rtol=1e-3)
    np.testing.assert_allclose(out[[2, 3]], [0.8 * 100 + 0.2 * 104, 0.8 * 104 + 0.2 * 100], rtol=1e-3)  # 2-box pool


# --- out-of-fold isolation --------------------------------------------------------------------------


def test_no_fold_ever_sees_its_own_queries():
    rng = np.random.default_rng(0)
    n_q, per_q = 40, 10
    q = np.repeat(rng.permutation(1000)[:n_q], per_q)
    secret = {qq: int(rng.integers(2)) for qq in np.unique(q)}  # a query's label, learnable only from its id
    y = np.array([secret[qq] for qq in q], np.float64)
    X = pd.DataFrame({"query_id": q.astype(np.float32), "noise": rng.normal(size=len(q)).astype(np.float32)})
    rp = RerankParams(folds=5, seed=1, repeats=1)
    rp.lgbm.min_data_in_leaf = 5
    rp.lgbm.num_boost_round = 200
    result = reranker.fit_oof(X, y, q, {"test": X.iloc[:30]}, rp)

    everything = set(np.unique(q).tolist())
    held_once = []
    for fold in result.folds:
        held, fit, es = set(fold["held_out"]), set(fold["fit"]), set(fold["early_stopping"])
        assert not held & fit and not held & es and not fit & es
        assert held | fit | es == everything
        held_once += fold["held_out"]
    assert sorted(held_once) == sorted(everything)  # each query held out exactly once
    fold_of = reranker.query_folds(q, 5, 1)
    assert all(len(set(fold_of[q == qq])) == 1 for qq in everything)  # a query never spans folds
    assert not np.isnan(result.oof).any() and len(result.tests["test"]) == 30

    # A leak would show: in-sample the boosters learn each query's label from its id, out of fold they cannot.
    in_sample = np.mean([((b.predict(X) > 0.5) == y).mean() for b in result.boosters])
    out_of_fold = ((result.oof > 0.5) == y).mean()
    assert in_sample > 0.75 and out_of_fold < 0.7, (in_sample, out_of_fold)


def test_repeated_rounds_hold_each_query_out_once_per_round():
    """repeats=3: three rounds with their own folds; a valid row's prediction is the mean of the 3 boosters that
    held its query out, a test row's the mean of all 15; the first round is the single-round fit."""
    rng = np.random.default_rng(0)
    q = np.repeat(np.arange(30), 10)
    y = (rng.random(len(q)) < 0.3).astype(np.float64)
    X = pd.DataFrame({"signal": (y + rng.normal(scale=0.8, size=len(q))).astype(np.float32),
                      "noise": rng.normal(size=len(q)).astype(np.float32)})
    rp = RerankParams(folds=5, seed=1, repeats=3)
    rp.lgbm.min_data_in_leaf = 5
    result = reranker.fit_oof(X, y, q, {"test": X.iloc[:40]}, rp)
    assert len(result.boosters) == 15 and [f["repeat"] for f in result.folds] == [0] * 5 + [1] * 5 + [2] * 5

    expected = np.zeros(len(q))
    for booster, fold in zip(result.boosters, result.folds):
        held = np.isin(q, fold["held_out"])
        expected[held] += booster.predict(X[held], num_iteration=fold["best_iteration"]) / 3
    np.testing.assert_allclose(result.oof, expected)
    tests = np.mean([b.predict(X.iloc[:40], num_iteration=f["best_iteration"]) for b, f in zip(result.boosters, result.folds)], 0)
    np.testing.assert_allclose(result.tests["test"], tests)
    for r in range(3):
        held = [sorted(f["held_out"]) for f in result.folds if f["repeat"] == r]
        assert sorted(sum(held, [])) == list(range(30))  # each query once per round
    first = [sorted(f["held_out"]) for f in result.folds[:5]]
    assert first != [sorted(f["held_out"]) for f in result.folds[5:10]]  # rounds differ

    single = reranker.fit_oof(X, y, q, {"test": X.iloc[:40]}, RerankParams(folds=5, seed=1, repeats=1, lgbm=rp.lgbm))
    assert [sorted(f["held_out"]) for f in single.folds] == first
    np.testing.assert_allclose(single.boosters[0].predict(X), result.boosters[0].predict(X))
    with pytest.raises(ParamsError, match="repeats"):
        RerankParams(repeats=0)
    with pytest.raises(ParamsError, match="consensus_rounds"):
        RerankParams(consensus_rounds=0)
    with pytest.raises(ParamsError, match="rerank.density"):
        RerankParams(density=[0])


def test_views_are_the_named_members_among_the_re_rankers(tmp_path):
    """rerank.smoothed_views / box_views: a model name stands for its members; a view of no re-ranker member is
    left out."""
    from mmrecall.ranking.reranker import box_views, smoothed_views

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"models": ["mcan", "word_detector"], "seeds": [1, 2]}}))
    p = load_params(tmp_path / "params.yaml")
    everyone = ["mcan-seed1", "mcan-seed2", "word_detector-seed1", "word_detector-seed2"]
    assert smoothed_views(p, everyone) == ["word_detector-seed1", "word_detector-seed2"]  # the default
    assert smoothed_views(p, ["mcan-seed1", "word_detector-seed2"]) == ["word_detector-seed2"]
    p.rerank.smoothed_views = ["mcan-seed2", "word_detector"]
    assert smoothed_views(p, everyone) == ["mcan-seed2", "word_detector-seed1", "word_detector-seed2"]
    p.rerank.smoothed_views = None
    assert smoothed_views(p, everyone[1:]) == everyone[1:]
    p.rerank.smoothed_views = []
    assert smoothed_views(p, everyone) == []
    assert box_views(p, everyone) == ["word_detector-seed1", "word_detector-seed2"]  # the default, resolved alike
    p.rerank.box_views = ["mcan-seed1", "two_tower"]
    assert box_views(p, everyone) == ["mcan-seed1"]  # no two_tower member: left out


# --- learned ensemble weights ------------------------------------------------------------------------


def test_learned_weights_favour_the_informative_member():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.2).astype(np.float64)
    scores = {"good": 3 * y + rng.normal(size=3000), "noise": rng.normal(size=3000),
              "good-too": 2 * y + rng.normal(size=3000)}
    w = learn_weights(scores, y)
    assert sum(w.values()) == pytest.approx(3.0, abs=1e-3)
    assert w["noise"] < 0.1 * min(w["good"], w["good-too"]) and w["good"] > w["good-too"]
    assert learn_weights({"only": scores["good"]}, y) == {"only": 1.0}  # one member: the plain probability

    fold = reranker.query_folds(np.arange(3000) // 30, 5, 0)
    oof = learn_weights_oof(scores, y, fold)
    held = fold == 0  # fold 0's rows are scored with weights fitted without them
    other = learn_weights({m: s[~held] for m, s in scores.items()}, y[~held])
    np.testing.assert_allclose(oof[held], ensemble_scores({m: s[held] for m, s in scores.items()}, other))


# --- champion alias ----------------------------------------------------------------------------------


def test_submission_rule_is_the_best_on_valid_or_the_named_one():
    valid = {"rerank": {"ndcg_at_5": 0.86, "ndcg_at_5_pp": 0.85}, "ensemble": {"ndcg_at_5": 0.70, "ndcg_at_5_pp": 0.88}}
    rule = reranker.submission_rule(valid, "auto")
    assert (rule.name, rule.scores, rule.postprocess, rule.chosen_by) == ("ensemble_pp", "ensemble", True, "valid")
    assert rule.valid == {"rerank_pp": 0.85, "rerank": 0.86, "ensemble_pp": 0.88, "ensemble": 0.70}
    valid["rerank"]["ndcg_at_5"] = 0.89
    assert reranker.submission_rule(valid).as_spec() == {"rule": "rerank", "scores": "rerank", "postprocess": False}
    valid["rerank"]["ndcg_at_5_pp"] = 0.89  # a tie: the re-ranker after the post-processing, the 1st place's order
    assert reranker.submission_rule(valid).name == "rerank_pp"
    named = reranker.submission_rule(valid, "ensemble")
    assert (named.name, named.chosen_by) == ("ensemble", "params")
    no_pp = {k: {"ndcg_at_5": v["ndcg_at_5"]} for k, v in valid.items()}  # evaluate.postprocess all off
    assert reranker.submission_rule(no_pp).name == "rerank"
    with pytest.raises(ParamsError, match="switches no post-processing on"):
        reranker.submission_rule(no_pp, "rerank_pp")
    with pytest.raises(ParamsError, match="rerank.submission: 'best'"):
        RerankParams(submission="best")


def test_champion_moves_only_on_improvement(tmp_path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    name = "mmrecall-ranker-test"
    client.create_registered_model(name)
    src = tmp_path / "model"
    src.mkdir()

    def new_version(score: float) -> str:
        mv = client.create_model_version(name, source=str(src))
        client.set_model_version_tag(name, mv.version, register.HONEST, f"{score:.6f}")
        return mv.version

    decisions = []
    for score in (0.70, 0.65, 0.70, 0.72):
        version = new_version(score)
        decisions.append((version, tracking.promote_if_better(client, name, "champion", version, score, register.HONEST)["moved"]))
    assert [moved for _, moved in decisions] == [True, False, False, True]  # first, worse, equal, better
    assert client.get_model_version_by_alias(name, "champion").version == decisions[-1][0]
    assert "not promoted" in client.get_model_version(name, decisions[1][0]).tags["champion_decision"]


# --- the registered model end to end ---------------------------------------------------------------

TINY_MCAN = dict(hidden=32, heads=4, ff=64, layers=1, flat_mlp=32, flat_out=32, img_mlp=64, dropout=0.0,
                 train_word_embeddings=False, feature_norm=True, pretrained=False)


@pytest.fixture(scope="module")
def ranker_repo(tmp_path_factory, micro_data):
    """Micro data prepared, random-weight tiny MCAN and word detector members (two seeds each) scored, the
    re-ranker fitted."""
    import torch

    root = tmp_path_factory.mktemp("ranker")
    shutil.copytree(micro_data, root / "data")
    old = Path.cwd()
    os.chdir(root)
    try:
        params = {"prepare": {"workers": 1}, "train": {"models": ["mcan", "word_detector"], "seeds": [1, 2]},
                  "rerank": {"members": None, "folds": 4, "pca_dims": 2,
                             "lgbm": {"min_data_in_leaf": 5, "num_boost_round": 50, "early_stopping_rounds": 10}},
                  "smooth": {"members": None}}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        for split in ("train", "valid", "testA"):
            prepare.main(["--split", split, "--no-progress"])
        p = load_params()
        train_store = FeatureStore.open(Path("features") / "train")
        tokens = load_tokenizer()(train_store.rows.query_clean.tolist(), padding=True, return_tensors="np")
        for seed in (1, 2):
            torch.manual_seed(seed)
            mcan_cfg, wd_cfg = MCANConfig(**TINY_MCAN), WordDetectorConfig(hidden=16, max_words=64)
            detector = WordDetector.from_config(wd_cfg)
            detector.fit_vocabulary(tokens["input_ids"], tokens["attention_mask"])
            for name, cfg, model in (("mcan", mcan_cfg, MCAN.from_config(mcan_cfg)), ("word_detector", wd_cfg, detector)):
                path = members.checkpoint_path(f"{name}-seed{seed}")
                members.save(path, name, cfg, model.eval(),
                             {"seed": seed, "train": {"max_query_len": 16, "max_boxes": 10, "eval_batch_size": 128}})
                m = members.load(path)
                for split in ("valid", "testA"):
                    table, fused = members.score(m, FeatureStore.open(Path("features") / split))
                    outputs.write("outputs", f"{name}-seed{seed}", split, table, fused)
        smooth.run(p)  # every member on smoothed boxes: the word detectors' smoothed views join the re-ranker
        report = rerank.run(p)
        yield root, p, report
    finally:
        os.chdir(old)


@pytest.fixture
def in_repo(ranker_repo, monkeypatch):
    monkeypatch.chdir(ranker_repo[0])
    return ranker_repo


@pytest.mark.slow
def test_rerank_outputs_and_ranker_reproduces_them(in_repo, tmp_path):
    root, params, report = in_repo
    spec = json.loads((root / "models" / "rerank" / "spec.json").read_text())
    assert spec["members"] == ["mcan-seed1", "mcan-seed2", "word_detector-seed1", "word_detector-seed2"]
    assert len(list((root / "models" / "rerank").glob("booster_fold*.txt"))) == spec["folds"] == 4 * 3  # folds x repeats
    names = spec["names"]
    assert {"word_detector-seed1.word_min", "word_detector-seed1.word_min.rank"} <= set(names)  # its details
    assert spec["consensus"] == [1, 3, 5, 10] and {"mcan-seed1.consensus3", "mcan-seed1.consensus3.z"} <= set(names)
    assert spec["consensus_rounds"] == 2 and {"word_detector-seed1.consensus5_r2.rank"} <= set(names)
    assert spec["density"] == [3, 5] and {"mcan-seed2.density3", "word_detector-seed2.density5.z"} <= set(names)
    assert spec["views"] == ["word_detector-seed1", "word_detector-seed2"]  # rerank.smoothed_views: [word_detector]
    assert {"word_detector-seed1-knn.score", "word_detector-seed2-knn.consensus1_r2", "word_detector-seed2-knn.pc1"} <= set(names)
    assert spec["box_views"] == ["word_detector-seed1", "word_detector-seed2"]  # rerank.box_views: [word_detector]
    assert {"word_detector-seed1-box.consensus3", "word_detector-seed2-box.density5", "word_detector-seed1-box.pc1"} <= set(names)
    assert not any(n.startswith("word_detector-seed1-box.word_") for n in names)  # a box view has no word details
    assert spec["best_boxes"] == spec["box_views"]  # the word detectors name their best box: it joins the largest
    best = pd.read_parquet(root / "outputs" / "word_detector-seed1" / "valid.parquet").best_box.to_numpy()
    assert (best >= 0).all() and (best < FeatureStore.open(root / "features" / "valid").rows.n_kept.to_numpy()).all()
    assert "best_box" not in pd.read_parquet(root / "outputs" / "mcan-seed1" / "valid.parquet").columns
    assert not any("best_box" in n for n in names)  # a box position is not a feature
    assert set(spec["ensemble_weights"]) == set(spec["members"])  # the ensemble is the members'; views are features
    assert 0 <= report["rerank"]["valid"]["ndcg_at_5"] <= 1
    paths = {"rerank": "models/rerank", **{f"member.{m}": str(members.checkpoint_path(m)) for m in spec["members"]}}
    ranker = Ranker.load(paths)
    table = read_candidates(root / "data" / "testA" / "testA.tsv")
    scores = ranker.score(table, kind="rerank")
    expected = pd.read_parquet(root / "outputs" / "rerank" / "testA.parquet").score.to_numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)  # the pyfunc path = the stage's path
    one = (table.query_id == table.query_id.iloc[-1]).to_numpy()  # a request of one query: nothing split-wide
    # (mcan's sums depend on the batch's padding at the ulp level, which can move a row across a tree's split)
    np.testing.assert_allclose(ranker.score(table[one].reset_index(drop=True), kind="rerank"), expected[one], rtol=0,
                               atol=2e-3)

    # By default the ranker ranks as the submission's rule says: the best valid NDCG@5 of the four.
    sub = report["submission"]
    assert spec["submission"]["rule"] == sub["rule"] and sub["valid"][sub["rule"]] == max(sub["valid"].values())
    assert set(sub["valid"]) == {"rerank", "rerank_pp", "ensemble", "ensemble_pp"} and sub["chosen_by"] == "valid"
    ensemble = ranker.score(table, kind="ensemble")
    np.testing.assert_allclose(ensemble, pd.read_parquet(root / "outputs" / "ensemble" / "testA.parquet").score, rtol=1e-4)
    counts = candidate_counts(eval_stores(params))
    shutil.copytree(root / "models" / "rerank", tmp_path / "rerank")
    for rule in ("ensemble_pp", "rerank"):  # each kind of rule, whatever valid chose here
        spec["submission"] = reranker.SubmissionRule(rule, {}, "params").as_spec()
        (tmp_path / "rerank" / "spec.json").write_text(json.dumps(spec))
        ruled = table[["query_id", "product_id"]].assign(score=ensemble if rule == "ensemble_pp" else scores)
        if rule.endswith("_pp"):
            ruled = postprocess.apply(ruled, params.evaluate.postprocess, counts)
            assert len(ruled) < len(table)  # the frequency filter drops some candidates of the micro data
        got = table[["query_id", "product_id"]].assign(score=Ranker.load({**paths, "rerank": tmp_path / "rerank"}).score(table))
        assert rank(got) == rank(ruled)


def test_features_follow_the_saved_spec(micro_data):
    """A member's details become features; a saved spec without them (an older re-ranker) still gets its own
    columns in its own order, and a spec naming a column the members do not give is an error."""
    store = candidate_store(read_candidates(micro_data / "valid" / "valid.tsv", nrows=60))
    rng = np.random.default_rng(0)
    outs = {"a": MemberOutput(rng.normal(size=60), None, {"word_min": rng.normal(size=60)}),
            "b": MemberOutput(rng.normal(size=60), None)}
    counts = store.rows.product_id.value_counts()
    X, _ = build_features(store, outs, FeatureSpec(["a", "b"], 0, {"a": 1.0, "b": 1.0}), counts)
    assert {"a.word_min", "a.word_min.rank", "a.word_min.z", "a.word_min.gap"} <= set(X.columns)
    older = [c for c in X.columns if not c.startswith("a.word_min")][::-1]
    X_old, _ = build_features(store, outs, FeatureSpec(["a", "b"], 0, {"a": 1.0, "b": 1.0}, older), counts)
    assert list(X_old.columns) == older
    np.testing.assert_array_equal(X_old.to_numpy(), X[older].to_numpy())
    with pytest.raises(UserError, match=r"missing \['b.word_min'\]"):
        build_features(store, outs, FeatureSpec(["a", "b"], 0, {"a": 1.0, "b": 1.0}, [*older, "b.word_min"]), counts)


def test_a_box_view_adds_the_members_best_box_beside_the_largest(micro_data):
    """Without a best box a box view's fused vector is each image's largest box; with one, both unit vectors
    side by side (an image whose best box is its largest gets the same vector twice)."""
    store = candidate_store(read_candidates(micro_data / "valid" / "valid.tsv", nrows=60))
    largest = box_view_features(store)
    np.testing.assert_array_equal(largest, store.largest_box_features())
    best = np.random.default_rng(0).integers(0, store.rows.n_kept.to_numpy())  # a kept box of each row
    both = box_view_features(store, best).astype(np.float32)
    assert both.shape == (60, 2 * largest.shape[1]) and both.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(both[:, :2048], axis=1), 1, atol=1e-2)
    unit = store.box_features(best).astype(np.float32)
    np.testing.assert_allclose(both[:, 2048:], unit / np.linalg.norm(unit, axis=1, keepdims=True), atol=2e-3)
    area = store.boxes[:, 4]
    offsets = store.rows.offset.to_numpy()
    same = [i for i in range(60) if np.argmax(area[offsets[i]:offsets[i] + store.rows.n_kept.iat[i]]) == best[i]]
    assert same and all(np.allclose(both[i, :2048], both[i, 2048:], atol=2e-3) for i in same)


def test_the_input_example_is_rows_that_prepare_kept(micro_copy, monkeypatch):
    """valid's first row is bad: the registered model's input example skips it (the model would refuse it)."""
    path = micro_copy / "valid" / "valid.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], bench_script("break_rows").break_row(lines[1]), *lines[2:]]) + "\n")
    monkeypatch.chdir(micro_copy.parent)
    (micro_copy.parent / "params.yaml").write_text("prepare:\n  workers: 1\n")
    prepare.main(["--split", "valid", "--no-progress"])
    example = register.example_rows(load_params())
    assert example.product_id.tolist() == [int(line.split("\t", 1)[0]) for line in lines[2:4]]
    assert len(candidate_store(example)) == 2  # what the model's own check accepts
    with pytest.raises(CandidateTableError, match="bad_base64"):
        candidate_store(read_candidates(path, nrows=2))  # the file's first rows, as before


def test_malformed_candidate_table_gives_a_clear_error(micro_data, tmp_path):
    table = read_candidates(micro_data / "valid" / "valid.tsv", nrows=4)
    bad = table.copy()
    bad.loc[2, "features"] = bad.loc[2, "features"][:-8] + "!!!!!!!!"
    with pytest.raises(CandidateTableError, match=r"row 2 .*bad_base64 \(features"):
        candidate_store(bad)
    short = table.copy()
    short.loc[1, "num_boxes"] = short.loc[1, "num_boxes"] + 1
    with pytest.raises(CandidateTableError, match=r"row 1 .*length_mismatch"):
        candidate_store(short)
    with pytest.raises(CandidateTableError, match=r"missing column\(s\) \['features'\]"):
        candidate_store(table.drop(columns=["features"]))
    tabbed = table.copy()
    tabbed.loc[3, "query"] = "red\tdress"
    with pytest.raises(CandidateTableError, match=r"row 3, column 'query'"):
        candidate_store(tabbed)


def test_smoothed_store_keeps_rows_and_changes_features(micro_data, tmp_path):
    table = read_candidates(micro_data / "valid" / "valid.tsv", nrows=60)
    store = candidate_store(table)  # the pyfunc's decoding (in memory) = prepare's (on disk)
    assert store.rows.product_id.tolist() == table.product_id.tolist()
    lines = (micro_data / "valid" / "valid.tsv").read_text().splitlines(keepends=True)[:61]
    (tmp_path / "head.tsv").write_text("".join(lines))
    ingest_tsv(tmp_path / "head.tsv", tmp_path / "store", PrepareParams(workers=1), progress=False)
    disk = FeatureStore.open(tmp_path / "store")
    pd.testing.assert_frame_equal(store.rows.drop(columns="line"), disk.rows.drop(columns="line"))
    for name in ("features", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(store, name), np.asarray(getattr(disk, name)), err_msg=name)
    smooth = smoothed_store(store, SmoothParams())
    assert smooth.rows is store.rows or smooth.rows.equals(store.rows)
    assert smooth.features.shape == store.features.shape and not np.array_equal(smooth.features, store.features)
    np.testing.assert_array_equal(smooth.boxes, store.boxes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_members(names: list[str]) -> dict[str, tracking.LoggedMember]:
    """The fixture's members logged as `mmrecall train` logs them: a member run each, its checkpoint its logged model."""
    logged = {}
    for member in names:
        model, _, seed = member.rpartition("-seed")
        with tracking.start_run(member, stage="train", params={"model": model, "seed": seed},
                                tags={"kind": "member", "model": model, "seed": seed}) as run:
            model_id = log_checkpoint(member, "minilm", 30, {"model": model, "seed": seed})
        logged[member] = tracking.LoggedMember(member, run.info.run_id, model_id)
    return logged


@pytest.mark.slow
def test_register_predict_cli_and_serve(in_repo, tmp_path, mlflow_store):
    root, params, _ = in_repo
    names = ["mcan-seed1", "mcan-seed2", "word_detector-seed1", "word_detector-seed2"]
    logged = log_members(names)
    first = register.run(params)  # no metrics/train here: the members are found by name and data hash
    assert first["moved"] and first["champion"] == first["version"]
    client = mlflow.MlflowClient()
    tags = client.get_model_version(params.register.name, first["version"]).tags
    assert tags["ndcg_at_5_valid_oof"] and "ndcg_at_5_testA" in tags and "data_md5" in tags
    second = register.run(params)  # the same model again: not better, the alias stays
    assert not second["moved"] and second["champion"] == first["version"]

    # The version names where its members came from, and its source run is the register run.
    version = client.get_model_version(params.register.name, first["version"])
    for member, found in logged.items():
        assert tags[f"member.{member}.run_id"] == found.run_id and tags[f"member.{member}.model_id"] == found.model_id
        assert f"{member}={found.run_id}" in tags["member_runs"].split(",")
    assert tags["rerank_run_id"] == json.loads((root / "models" / "rerank" / "spec.json").read_text())["mlflow_run_id"]
    assert version.run_id == tags["run_id"] and client.get_run(version.run_id).info.run_name == "register"
    logged_models = mlflow.search_logged_models(experiment_ids=[tracking.setup()], output_format="list")
    assert {m.name for m in logged_models} >= set(names)  # the experiment's Models view lists the members

    # The predict stage: submission.csv through models:/mmrecall-ranker@champion.
    out = predict.run(params)
    sub = pd.read_csv(root / "submission.csv")
    assert list(sub.columns) == ["query-id", "product1", "product2", "product3", "product4", "product5"]
    assert len(sub) == out["testA"]["queries"] and 0 <= out["testA"]["ndcg_at_5_pp"] <= 1
    rule = json.loads((root / "models" / "rerank" / "spec.json").read_text())["submission"]["rule"]
    assert out["rule"] == tags["submission_rule"] == rule  # the model's metadata, and the version's tag

    # Bad testA rows: a query left with 2 good rows gets its line completed with its rejected candidates (unscored,
    # in file order), and a query with no good row a line of its own rejected candidates, not of other products.
    lines = (root / "data" / "testA" / "testA.tsv").read_text().splitlines()
    rows = [(int(line.split("\t", 1)[0]), int(line.rsplit("\t", 1)[1])) for line in lines[1:]]  # (product, query)
    few, none = rows[0][1], next(q for _, q in rows if q != rows[0][1])
    kept = [p for p, q in rows if q == few][:2]
    broken: dict[int, list[int]] = {few: [], none: []}
    break_row = bench_script("break_rows").break_row  # features: bad base64
    for i, (product, query) in enumerate(rows, 1):
        if query == none or (query == few and product not in kept):
            lines[i] = break_row(lines[i])
            broken[query].append(product)
    bad = tmp_path / "bad"
    (bad / "data" / "testA").mkdir(parents=True)
    (bad / "data" / "testA" / "testA.tsv").write_text("\n".join(lines) + "\n")
    ingest_tsv(bad / "data" / "testA" / "testA.tsv", bad / "features" / "testA", PrepareParams(workers=1),
               answers=root / "data" / "testA" / "testA_answer.json", progress=False)
    (bad / "features" / "valid").symlink_to(root / "features" / "valid")
    bad_params = copy.deepcopy(params)
    bad_params.data.root, bad_params.data.features = str(bad / "data"), str(bad / "features")
    bad_params.data.metrics, bad_params.predict.output = str(bad / "metrics"), str(bad / "submission.csv")
    got = predict.run(bad_params)["testA"]
    written = {int(r[0]): [int(x) for x in r[1:]]
               for r in (line.split(",") for line in (bad / "submission.csv").read_text().splitlines()[1:])}
    assert len(written) == len(sub) and written[none] == broken[none][:5]
    assert sorted(written[few][:2]) == sorted(kept) and written[few][2:] == broken[few][:3]
    assert got["queries_without_rows"] == 1 and got["unscored_candidates"] == 5 + 3 and "completed_queries" not in got

    # `mlflow models predict` on a small candidate file (two whole queries).
    table = read_candidates(root / "data" / "testA" / "testA.tsv")
    small = table[table.query_id.isin(table.query_id.unique()[:2])]
    small.to_csv(tmp_path / "candidates.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    uri = f"models:/{params.register.name}@champion"
    cli = subprocess.run(["mlflow", "models", "predict", "-m", uri, "-i", str(tmp_path / "candidates.csv"), "-t", "csv",
                          "-o", str(tmp_path / "pred.json"), "--env-manager", "local"], env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-3000:]
    got = [row["score"] for row in json.loads((tmp_path / "pred.json").read_text())["predictions"]]
    champion = mlflow.pyfunc.load_model(uri)
    expected = champion.predict(small)["score"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    # Each member loaded from its logged model scores like the registered ranker's copy of it.
    store = candidate_store(small)
    for member, found in logged.items():
        alone = mlflow.pyfunc.load_model(f"models:/{found.model_id}").predict(small)["score"].to_numpy()
        inside, _ = members.score(champion.unwrap_python_model().ranker.members[member], store)
        np.testing.assert_allclose(alone, inside.score.to_numpy(), rtol=1e-6)

    # `mlflow models serve` answers the same rows over REST on localhost.
    port = _free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "-p", str(port), "-h", "127.0.0.1",
                               "--env-manager", "local"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = json.dumps({"dataframe_split": json.loads(small.to_json(orient="split", index=False))}).encode()
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    served = [row["score"] for row in json.loads(resp.read())["predictions"]]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        np.testing.assert_allclose(served, expected, rtol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_register_names_a_member_whose_logged_checkpoint_is_missing(in_repo, capsys):
    root, params, _ = in_repo
    logged = log_members(["mcan-seed1", "mcan-seed2", "word_detector-seed1", "word_detector-seed2"])
    found = logged["mcan-seed2"]
    location = mlflow.MlflowClient().get_logged_model(found.model_id).artifact_location
    (Path(location.removeprefix("file://")) / "artifacts" / tracking.CHECKPOINT_FILE).unlink()  # lost in the store
    assert members.checkpoint_path("mcan-seed2").exists()  # the local file is there, and must not be used

    assert cli.main(["register"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after MLflow's own log lines)
    assert err.startswith("mmrecall register: error: member mcan-seed2: the checkpoint of its logged model"), err
    assert found.run_id in err and found.model_id in err
    with pytest.raises(MissingLoggedMemberError, match="member mcan-seed9: no finished run 'mcan-seed9' on this data"):
        tracking.find_member("mcan-seed9")  # never trained against this store
