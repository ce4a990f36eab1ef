"""The official format: header checks, every defect kind in the rejects, good rows kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmrecall.config import PrepareParams
from mmrecall.data.ingest import ingest_tsv
from mmrecall.data.store import FeatureStore
from mmrecall.data.text import clean_query
from mmrecall.data.tsv import COLUMNS, HEADER, DataFileError, box_features, encode_row


def row(pid: int, n: int = 2, query: str = 'red "ins" dress', rng=np.random.default_rng(0), **over) -> str:
    boxes = np.array([[0, 3, 338, 207]] * n, dtype=np.float32)
    feats = rng.random((n, 2048), dtype=np.float32)
    labels = np.array([1] + [28] * (n - 1), dtype=np.int64)
    fields = encode_row(pid, 338, 209, boxes, feats, labels, query, 5).split("\t")
    for key, value in over.items():
        fields[COLUMNS.index(key)] = value
    return "\t".join(fields)


def b64(array) -> str:
    import base64

    return base64.b64encode(np.asarray(array).tobytes()).decode()


# (reason, bad line) - one of each defect kind the reader must catch
DEFECTS = {
    "column_count": lambda: "\t".join(row(900).split("\t")[:8]),
    "bad_int": lambda: row(901, product_id="12x4"),
    "bad_base64": lambda: row(902, features="!!!!" + row(902).split("\t")[5][4:]),
    "length_mismatch": lambda: row(903, num_boxes="3"),
    "label_out_of_range": lambda: row(904, class_labels=b64(np.array([1, 40], dtype=np.int64))),
    "non_finite": lambda: row(905, features=b64(np.full((2, 2048), np.nan, dtype=np.float32))),
    "empty_query": lambda: row(906, query=""),
}


def test_every_defect_is_rejected_with_its_reason_and_good_rows_kept(tmp_path):
    lines, expected, good = [HEADER], {}, []
    for i, (reason, make_bad) in enumerate(DEFECTS.items()):
        good.append(100 + i)
        lines.append(row(100 + i))
        lines.append(make_bad())
        expected[len(lines)] = reason  # 1-based file line of the bad row
    good.append(199)
    lines.append(row(199))
    path = tmp_path / "valid.tsv"
    path.write_text("\n".join(lines) + "\n")

    summary = ingest_tsv(path, tmp_path / "store", PrepareParams(workers=1), progress=False)

    rejects = pd.read_csv(tmp_path / "store" / "rejects.tsv", sep="\t")
    assert dict(zip(rejects.line, rejects.reason)) == expected
    assert summary["rejected_by_reason"] == {r: 1 for r in DEFECTS}
    assert summary["rows_read"] == len(lines) - 1
    store = FeatureStore.open(tmp_path / "store")
    assert store.rows.product_id.tolist() == good
    assert store.rows["query"].iloc[0] == 'red "ins" dress'  # quoting is off: quotes survive


def test_rejects_with_two_workers_and_tiny_chunks_match(tmp_path):
    lines = [HEADER] + [row(i) if i % 5 else DEFECTS["bad_int"]() for i in range(1, 41)]
    path = tmp_path / "t.tsv"
    path.write_text("\n".join(lines) + "\n")
    one = ingest_tsv(path, tmp_path / "a", PrepareParams(workers=1), progress=False)
    two = ingest_tsv(path, tmp_path / "b", PrepareParams(workers=2, chunk_bytes=50_000), progress=False)
    assert one["rejected_by_reason"] == two["rejected_by_reason"] == {"bad_int": 8}
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    pd.testing.assert_frame_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.features, b.features)
    assert (tmp_path / "a" / "rejects.tsv").read_text() == (tmp_path / "b" / "rejects.tsv").read_text()


@pytest.mark.parametrize(
    "content, message",
    [(None, "file not found"), ("", "file is empty"), (None, "header row"), ("a\tb\n", "expected the header")],
)
def test_bad_files_fail_clearly_naming_the_file(tmp_path, content, message):
    path = tmp_path / "valid.tsv"
    if message == "header row":
        content = row(1) + "\n"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFileError, match=message) as err:
        ingest_tsv(path, tmp_path / "store", PrepareParams(workers=1), progress=False)
    assert str(path) in str(err.value)
    assert not (tmp_path / "store").exists()  # nothing half-written


def test_box_features_follow_spec():
    b = box_features(np.array([[0, 3, 338, 207]], np.float32), np.array([338.0]), np.array([209.0]))
    top, left, bottom, right = 0, 3 / 209, 1.0, 207 / 209
    np.testing.assert_allclose(b[0], [top, left, bottom, right, (bottom - top) * (right - left),
                                      (bottom - top) / ((right - left) + 1e-6)], rtol=1e-6)


@pytest.mark.parametrize(
    "raw, cleaned",
    [("is red dress", "red dress"), ("'s women's shoes", "women's shoes"), ("and and cup", "and cup"),
     ("-cotton sock", "cotton sock"), ("however, cute hat", "cute hat"), ("wooden file cabinet", "wooden file cabinet")],
)
def test_first_place_query_cleaning(raw, cleaned):
    assert clean_query(raw) == cleaned
