"""bench/legal_variants.py and bench/break_rows.py: the same data written otherwise, or with bad rows."""

from __future__ import annotations

import json

import numpy as np

from mmrecall.config import PrepareParams
from mmrecall.data.ingest import ingest_tsv
from mmrecall.data.store import FeatureStore

from .conftest import bench_script


def pairs(store: FeatureStore, shift: int = 0) -> list[tuple[int, int]]:
    return sorted(zip(store.rows.query_id, store.rows.product_id - shift))


def test_variants_hold_the_same_rows_and_answers(micro_data, tmp_path):
    script = bench_script("legal_variants")
    out = tmp_path / "data"
    script.main([str(micro_data), str(out)])
    assert b"\r\n" in (out / "testA" / "testA.tsv").read_bytes()[:4096]
    assert not (out / "valid" / "valid.tsv").read_bytes().endswith(b"\n")
    for split in ("valid", "testA"):
        stores = {}
        for name, root in (("original", micro_data), ("variant", out)):
            answers = root / split / f"{split}_answer.json"
            summary = ingest_tsv(root / split / f"{split}.tsv", tmp_path / name / split, PrepareParams(workers=1),
                                 answers=answers, progress=False)
            assert summary["rows_rejected"] == 0
            stores[name] = FeatureStore.open(tmp_path / name / split)
        original, variant = stores["original"], stores["variant"]
        assert (variant.rows.product_id > 2**32).all()
        assert pairs(variant, script.SHIFT) == pairs(original)
        assert variant.rows.product_id.tolist() != (original.rows.product_id + script.SHIFT).tolist()  # shuffled
        assert variant.answers == {q: {p + script.SHIFT for p in ps} for q, ps in original.answers.items()}
        upper = variant.rows["query"].str.isupper()
        assert 0 < upper.sum() < len(upper)
        i = int(np.flatnonzero(variant.rows.product_id.to_numpy() == original.rows.product_id.iat[0] + script.SHIFT)[0])
        np.testing.assert_array_equal(variant.image(i)[0], original.image(0)[0])  # the same boxes, box for box
    assert json.loads((out / "valid" / "valid_answer.json").read_text())


def test_broken_rows_are_rejected_and_the_rest_kept(micro_copy, tmp_path):
    bench_script("break_rows").main([str(micro_copy), "--share", "0.05"])
    summary = ingest_tsv(micro_copy / "valid" / "valid.tsv", tmp_path / "valid", PrepareParams(workers=1),
                         answers=micro_copy / "valid" / "valid_answer.json", progress=False)
    assert summary["rejected_by_reason"] == {"bad_base64": summary["rows_rejected"]}
    assert summary["rows_rejected"] >= 2 * 30 + 2 * 28 and summary["rows_kept"] > 0  # 2 whole queries, 2 cut to 2 rows
    assert len(summary["answer_queries_without_rows"]) == 2
