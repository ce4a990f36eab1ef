"""prepare: the store holds exactly what the TSV holds (float16), capped, filtered, in order."""

from __future__ import annotations

import base64
import csv

import numpy as np
import pandas as pd
import pytest

from mmrecall import cli
from mmrecall.config import PrepareParams
from mmrecall.data.ingest import ingest_tsv
from mmrecall.data.store import FeatureStore
from mmrecall.data.tsv import HEADER
from mmrecall.ranking.metrics import evaluate_scores
from mmrecall.ranking.ranker import (CandidateTableError, candidate_store, prepared_candidates, read_candidates,
                                     rejected_candidates)
from mmrecall.stages import prepare

from .test_tsv import DEFECTS, row


def test_store_round_trip(micro_data, tmp_path):
    tsv = micro_data / "valid" / "valid.tsv"
    summary = ingest_tsv(tsv, tmp_path / "valid", PrepareParams(box_cap=3, workers=2, chunk_bytes=1 << 20),
                                    answers=micro_data / "valid" / "valid_answer.json", progress=False)
    store = FeatureStore.open(tmp_path / "valid")
    raw = pd.read_csv(tsv, sep="\t", quoting=csv.QUOTE_NONE)
    assert summary["rows_kept"] == len(raw) == len(store) and summary["rows_rejected"] == 0
    assert store.rows.product_id.tolist() == raw.product_id.tolist()
    assert (store.rows.n_kept == raw.num_boxes.clip(upper=3)).all()
    for i in (0, 7, len(raw) - 1):
        feats, boxes, labels = store.image(i)
        n = int(raw.num_boxes[i])
        want = np.frombuffer(base64.b64decode(raw.features[i]), "<f4").reshape(n, 2048)[:3]
        np.testing.assert_array_equal(feats, want.astype(np.float16))
        np.testing.assert_array_equal(labels, np.frombuffer(base64.b64decode(raw.class_labels[i]), "<i8")[:3])
        assert boxes.shape == (min(n, 3), 6) and (boxes[:, 4] >= 0).all()
    assert store.answers and set(store.answers) == set(raw.query_id)
    means = store.mean_features(0, 5)
    feats0 = store.image(0)[0].astype(np.float32)
    np.testing.assert_allclose(means[0], feats0.mean(0), rtol=1e-5)


def test_max_boxes_filter_applies_to_train_only(micro_data, tmp_path):
    tsv = micro_data / "train" / "train.tsv"
    raw = pd.read_csv(tsv, sep="\t", quoting=csv.QUOTE_NONE, usecols=["num_boxes"])
    params = PrepareParams(max_boxes_filter=4, workers=1)
    s_train = ingest_tsv(tsv, tmp_path / "a", params, train=True, progress=False)
    s_eval = ingest_tsv(tsv, tmp_path / "b", params, train=False, progress=False)
    assert s_train["rows_filtered_max_boxes"] == int((raw.num_boxes > 4).sum()) > 0
    assert s_train["rows_kept"] == int((raw.num_boxes <= 4).sum())
    assert s_eval["rows_kept"] == len(raw)


def test_cli_uses_params_paths(micro_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(micro_copy.parent)
    (micro_copy.parent / "params.yaml").write_text("prepare:\n  workers: 1\n")
    assert prepare.main(["--split", "testA", "--no-progress"]) == 0
    store = FeatureStore.open(micro_copy.parent / "features" / "testA")
    assert len(store) > 0 and store.answers is not None


def test_a_valid_query_whose_rows_are_all_rejected_counts_zero(tmp_path, caplog, monkeypatch):
    """Query 7's only row is bad: prepare keeps the rest and names the query, and NDCG@5 counts it 0 (not an error)."""
    rng = np.random.default_rng(6)
    (tmp_path / "data" / "valid").mkdir(parents=True)
    path = tmp_path / "data" / "valid" / "valid.tsv"
    path.write_text("\n".join([HEADER, row(1, rng=rng), row(2, rng=rng),
                               DEFECTS["bad_base64"]().rsplit("\t", 1)[0] + "\t7"]) + "\n")
    (tmp_path / "data" / "valid" / "valid_answer.json").write_text('{"5": [1], "7": [902]}')
    (tmp_path / "params.yaml").write_text("prepare:\n  workers: 1\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert prepare.main(["--split", "valid", "--no-progress"]) == 0
    assert "1 query(ies) of the answers file have no row kept (e.g. query 7)" in caplog.text
    store = FeatureStore.open(tmp_path / "features" / "valid")
    assert store.meta["answer_queries_without_rows"] == [7] and store.answers == {5: {1}, 7: {902}}
    scores = pd.DataFrame({"query_id": store.rows.query_id, "product_id": store.rows.product_id, "score": [2.0, 1.0]})
    assert evaluate_scores(scores, store.answers) == 0.5


def test_a_split_with_no_good_row_stops_prepare_naming_the_first_bad_line(tmp_path, monkeypatch, capsys, caplog):
    (tmp_path / "data" / "testA").mkdir(parents=True)
    path = tmp_path / "data" / "testA" / "testA.tsv"
    (tmp_path / "params.yaml").write_text("prepare:\n  workers: 1\n")
    monkeypatch.chdir(tmp_path)
    path.write_text("\n".join([HEADER, row(1), row(2), DEFECTS["bad_base64"]()]) + "\n")  # 1 of 3: a warning
    with caplog.at_level("WARNING"):
        assert prepare.main(["--split", "testA", "--no-progress"]) == 0
    assert "testA: 1 of 3 rows rejected ({'bad_base64': 1}), e.g. line 4: bad_base64" in caplog.text
    path.write_text("\n".join([HEADER, DEFECTS["label_out_of_range"](), DEFECTS["label_out_of_range"]()]) + "\n")
    assert cli.main(["prepare", "--split", "testA", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmrecall prepare: error: data/testA/testA.tsv: no row kept of 2 (2 rejected, first line 2: "
                          "label_out_of_range"), err


def test_spans_and_workers_do_not_change_the_store(tmp_path):
    """Many tiny spans, one row longer than a span, defects, blank and CRLF lines, no final newline."""
    rng = np.random.default_rng(3)
    defects = list(DEFECTS.values())
    lines, bad_lines, good_lines = [HEADER], [], []
    for i in range(1, 70):
        if i % 5 == 0:
            lines.append(defects[i // 5 % len(defects)]())
            bad_lines.append(len(lines))
            continue
        if i % 13 == 0:
            lines.append("" if i % 2 else " \t ")  # blank lines are not rows
            continue
        n = 12 if i == 33 else 1 + i % 3  # 12 boxes: ~130 KB, several chunks long
        lines.append(row(i, n=n, rng=rng) + ("\r" if i % 7 == 0 else ""))
        good_lines.append(len(lines))
    path = tmp_path / "t.tsv"
    path.write_text("\n".join(lines))

    def run(name, **kw):
        ingest_tsv(path, tmp_path / name, PrepareParams(box_cap=5, **kw), progress=False)
        return FeatureStore.open(tmp_path / name), (tmp_path / name / "rejects.tsv").read_text()

    ref, ref_rejects = run("whole", workers=1)  # the whole file in one span
    assert ref.rows.line.tolist() == good_lines
    assert pd.read_csv(tmp_path / "whole" / "rejects.tsv", sep="\t").line.tolist() == bad_lines
    assert ref.rows.n_kept.max() == 5
    for workers in (1, 2):
        got, rejects = run(f"w{workers}", workers=workers, chunk_bytes=20_000)
        pd.testing.assert_frame_equal(got.rows, ref.rows)
        np.testing.assert_array_equal(got.features, ref.features)
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        np.testing.assert_array_equal(got.labels, ref.labels)
        assert rejects == ref_rejects


def test_a_repeated_candidate_is_a_reject_outside_train(tmp_path):
    """(query 5, product 2) twice: an evaluation split keeps its first row only; train keeps both."""
    rng = np.random.default_rng(4)
    lines = [HEADER, row(1, rng=rng), row(2, n=3, rng=rng), row(3, rng=rng), row(2, n=1, rng=rng), row(4, rng=rng)]
    path = tmp_path / "valid.tsv"
    path.write_text("\n".join(lines) + "\n")
    for workers, chunk_bytes in ((1, 1 << 20), (2, 20_000)):  # the first row and its repeat in one chunk or in two
        out = tmp_path / f"valid{workers}"
        params = PrepareParams(workers=workers, chunk_bytes=chunk_bytes)
        summary = ingest_tsv(path, out, params, progress=False)
        store = FeatureStore.open(out)
        assert store.rows.product_id.tolist() == [1, 2, 3, 4] and store.rows.line.tolist() == [2, 3, 4, 6]
        assert store.rows.n_kept.tolist() == [2, 3, 2, 2] and len(store.features) == 9  # the repeat's box is gone
        assert summary["rejected_by_reason"] == {"repeated_candidate": 1}
        rejects = pd.read_csv(out / "rejects.tsv", sep="\t")
        assert rejects.line.tolist() == [5] and "first on line 3" in rejects.detail[0]
        np.testing.assert_array_equal(store.image(3)[0], FeatureStore.open(tmp_path / "valid1").image(3)[0])
    train = ingest_tsv(path, tmp_path / "train", PrepareParams(workers=1), train=True, progress=False)
    assert train["rows_kept"] == 5 and train["rows_rejected"] == 0


def test_predict_reads_the_rows_prepare_kept(tmp_path):
    """A bad row, a repeated candidate and a blank line in testA: the candidate table is the store's rows."""
    rng = np.random.default_rng(5)
    lines = [HEADER, row(1, rng=rng), DEFECTS["bad_base64"](), "", row(2, n=3, rng=rng) + "\r", row(2, rng=rng),
             DEFECTS["column_count"](), row(3, rng=rng)]
    path = tmp_path / "testA.tsv"
    path.write_text("\n".join(lines) + "\n")
    summary = ingest_tsv(path, tmp_path / "testA", PrepareParams(workers=1), progress=False)
    store = FeatureStore.open(tmp_path / "testA")
    assert summary["rows_rejected"] == 3 and store.rows.line.tolist() == [2, 5, 8]
    with pytest.raises(CandidateTableError):
        candidate_store(read_candidates(path))  # the whole file: the ranker refuses its bad rows
    table = prepared_candidates(path, store, "testA")
    assert table.product_id.tolist() == [1, 2, 3] and table.num_boxes.tolist() == [2, 3, 2]
    decoded = candidate_store(table)  # what the registered model decodes: the store's rows, box for box
    np.testing.assert_array_equal(decoded.features, store.features)
    assert rejected_candidates(path, store) == {5: [902]}  # the bad_base64 row's (the column_count row has no
    # query_id, and the repeated candidate (2, 5) is scored on its first line)
    lost = tmp_path / "lost.tsv"  # query 7's only row is bad: its id is still found, for its submission line
    lost.write_text("\n".join([HEADER, row(1, rng=rng), DEFECTS["bad_base64"]().rsplit("\t", 1)[0] + "\t7",
                               DEFECTS["column_count"](), row(3, rng=rng)]) + "\n")
    ingest_tsv(lost, tmp_path / "lost", PrepareParams(workers=1), progress=False)
    assert rejected_candidates(lost, FeatureStore.open(tmp_path / "lost")) == {7: [902]}
    other = tmp_path / "other.tsv"
    other.write_text("\n".join([HEADER, row(1, rng=rng), row(9, rng=rng), row(3, rng=rng)]) + "\n")
    with pytest.raises(CandidateTableError, match="dvc repro prepare@testA"):
        prepared_candidates(other, store, "testA")  # features/testA from another file
