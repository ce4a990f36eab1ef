"""The official NDCG@5 and the post-processing, checked on the real competition files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mmrecall.data.store import load_answers
from mmrecall.ranking import metrics, postprocess
from mmrecall.stages import evaluate

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def real():
    valid = metrics.read_score_table(FIXTURES / "validscore_imagebert.txt")
    test_b = metrics.read_score_table(FIXTURES / "testBscore_imagebert.txt")
    return valid, test_b, load_answers(FIXTURES / "valid_answer.json")


def test_real_valid_scores_give_the_published_ndcg(real):
    valid, _, answers = real
    assert len(valid) == 14720 and len(answers) == 496
    assert round(metrics.evaluate_scores(valid, answers), 5) == 0.70981


def test_frequency_filter_over_valid_and_testB_gives_0_8632(real):
    valid, test_b, answers = real
    counts = postprocess.candidate_counts([valid.product_id, test_b.product_id])
    assert round(metrics.evaluate_scores(postprocess.frequency_filter(valid, counts), answers), 4) == 0.8632


def test_exclusivity_rule_matches_recomputed_figures(real):
    valid, _, answers = real
    assert round(metrics.evaluate_scores(postprocess.exclusivity_filter(valid, 0.92), answers), 4) == 0.8385
    assert round(metrics.evaluate_scores(postprocess.exclusivity_filter(valid, 0.0), answers), 4) == 0.7486


def test_demoted_scores_rank_as_the_filtered_table(real):
    """The registered ranker applies the post-processing as a demotion: every query ranks as the filtered table
    does (on the real files: 0.8632 and 0.8385 again), and the dropped candidates follow, in their own order."""
    valid, test_b, answers = real
    counts = postprocess.candidate_counts([valid.product_id, test_b.product_id])
    for kept in (postprocess.frequency_filter(valid, counts), postprocess.exclusivity_filter(valid, 0.92)):
        demoted = valid.assign(score=postprocess.demoted(valid, kept))
        full, top = metrics.rank(demoted, k=None), metrics.rank(kept, k=None)
        assert all(full[q][: len(top[q])] == top[q] for q in top)
        dropped = valid.drop(index=kept.index)
        rest = metrics.rank(dropped, k=None)
        assert all(full[q][len(top[q]):] == rest.get(q, []) for q in top)
        assert metrics.evaluate_scores(demoted, answers) == metrics.evaluate_scores(kept, answers)
        assert 0 < len(dropped) < len(valid)


def test_a_query_of_fewer_than_5_candidates_is_completed_with_other_products(tmp_path):
    """Its line gets products it does not list, in the fill order, so the official reader takes the file and the
    query's NDCG@5 is what its own candidates give."""
    rankings = {1: [10, 11, 12, 13, 14], 2: [20, 21, 22]}
    full, short = metrics.padded(rankings, fill=[21, 10, 11, 10, 30])
    assert short == [2] and full == {1: [10, 11, 12, 13, 14], 2: [20, 21, 22, 10, 11]}
    metrics.write_submission(full, tmp_path / "s.csv", queries={1, 2})
    answers = {1: {12}, 2: {22, 20}}
    assert metrics.ndcg_at_5(metrics.read_submission(tmp_path / "s.csv"), answers) == metrics.ndcg_at_5(rankings, answers)
    with pytest.raises(metrics.SubmissionError, match="query 2 has"):
        metrics.write_submission(rankings, tmp_path / "t.csv")


def test_ndcg_ideal_uses_min_answers_and_5():
    d = [1 / math.log2(i + 2) for i in range(5)]
    assert metrics.ndcg_at_5_query([1, 2, 3, 4, 5], {1, 2}) == 1.0  # 2 answers, both on top
    assert metrics.ndcg_at_5_query([9, 1, 8, 7, 6], {1, 2}) == pytest.approx(d[1] / (d[0] + d[1]))
    assert metrics.ndcg_at_5_query([1, 9, 8, 7, 0], {1, 2, 3, 4, 5, 6}) == pytest.approx(1 / sum(d))
    assert metrics.ndcg_at_5({1: [1, 2, 3, 4, 5], 2: [0, 0, 0, 0, 0]}, {1: {1}, 2: {9}}) == 0.5


def test_missing_query_is_an_error_in_a_submission_and_zero_in_a_score_table():
    with pytest.raises(metrics.SubmissionError, match="no ranking"):
        metrics.ndcg_at_5({1: [1, 2, 3, 4, 5]}, {1: {1}, 2: {2}})
    assert metrics.ndcg_at_5({1: [1, 2, 3, 4, 5]}, {1: {1}, 2: {2}}, strict=False) == 0.5
    table = pd.DataFrame({"query_id": [1, 1], "product_id": [1, 9], "score": [0.9, 0.1]})  # no row of query 2
    assert metrics.evaluate_scores(table, {1: {1}, 2: {2}}) == 0.5


@pytest.mark.parametrize("line, message", [("3,1,2,3,4", "exactly 5"), ("3,1,2,3,4,4", "distinct"), ("3,1,2,3,4,x", "exactly 5")])
def test_submission_checks(tmp_path, line, message):
    path = tmp_path / "submission.csv"
    path.write_text("query-id,product1,product2,product3,product4,product5\n" + line + "\n")
    with pytest.raises(metrics.SubmissionError, match=message):
        metrics.read_submission(path)


def test_submission_round_trip_and_cli(tmp_path, real, capsys):
    valid, _, answers = real
    path = tmp_path / "submission.csv"
    metrics.write_submission(metrics.rank(valid), path, queries=set(answers))
    assert metrics.read_submission(path) == metrics.rank(valid)
    assert evaluate.main(["--submission", str(path), "--answers", str(FIXTURES / "valid_answer.json")]) == 0
    assert "ndcg_at_5\t0.70981" in capsys.readouterr().out
    # a score table works too, and with the evaluation files for counts, the post-processed figure
    evaluate.main(["--submission", str(FIXTURES / "validscore_imagebert.txt"), "--answers", str(FIXTURES / "valid_answer.json"),
                   "--counts-from", str(FIXTURES / "validscore_imagebert.txt"), str(FIXTURES / "testBscore_imagebert.txt")])
    out = capsys.readouterr().out
    assert "ndcg_at_5\t0.70981" in out and "ndcg_at_5_pp\t0.86320" in out


def test_write_submission_refuses_missing_queries(tmp_path):
    with pytest.raises(metrics.SubmissionError, match="missing"):
        metrics.write_submission({1: [1, 2, 3, 4, 5]}, tmp_path / "s.csv", queries={1, 2})


def test_cli_scores_a_parquet_score_table(tmp_path, real, capsys):
    valid, _, _ = real
    path = tmp_path / "scores.parquet"
    valid.to_parquet(path, index=False)
    assert evaluate.main(["--submission", str(path), "--answers", str(FIXTURES / "valid_answer.json")]) == 0
    assert "ndcg_at_5\t0.70981" in capsys.readouterr().out


def test_a_score_table_scoring_a_pair_twice_is_refused(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text("7\t100\t0.9\n7\t101\t0.5\n8\t100\t0.4\n7\t101\t0.3\n")  # would count 101 twice in query 7's top 5
    with pytest.raises(metrics.SubmissionError, match="query 7 scores product 101 twice"):
        metrics.read_score_table(path)


def test_cli_warns_when_no_submitted_product_is_an_answer(tmp_path, real, capsys, caplog):
    """Another split's submission against these answers: same query ids, none of its products: 0 and a warning."""
    _, _, answers = real
    path = tmp_path / "submission.csv"
    metrics.write_submission({q: [1, 2, 3, 4, 5] for q in answers}, path)
    with caplog.at_level("WARNING"):
        assert evaluate.main(["--submission", str(path), "--answers", str(FIXTURES / "valid_answer.json")]) == 0
    assert "ndcg_at_5\t0.00000" in capsys.readouterr().out
    assert "same split" in caplog.text
    caplog.clear()
    evaluate.main(["--submission", str(FIXTURES / "validscore_imagebert.txt"),
                   "--answers", str(FIXTURES / "valid_answer.json")])
    assert "same split" not in caplog.text  # a real score: no warning
