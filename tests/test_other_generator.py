"""bench/other_generator.py: a second generator's files are the official format, read by prepare as they are."""

from __future__ import annotations

import json

import numpy as np

from mmrecall.config import PrepareParams
from mmrecall.data.ingest import ingest_tsv
from mmrecall.data.store import FeatureStore

from .conftest import bench_script


def test_other_generator_writes_what_prepare_reads(tmp_path):
    out = tmp_path / "data"
    bench_script("other_generator").main(["--out", str(out), "--train-queries", "30", "--eval-queries", "6"])
    for split in ("train", "valid", "testA"):
        answers = out / split / f"{split}_answer.json"
        summary = ingest_tsv(out / split / f"{split}.tsv", tmp_path / split, PrepareParams(workers=0),
                             answers=answers if answers.exists() else None, train=split == "train", progress=False)
        assert summary["rows_rejected"] == 0 and summary["rows_kept"] == summary["rows_read"] > 0
        store = FeatureStore.open(tmp_path / split)
        features, boxes, _ = store.image(0)
        assert features.shape[1] == 2048 and (np.asarray(features) >= 0).all()
        assert (boxes[:, 4] > 0).all()  # areas, normalised by the image size
        if split != "train":
            candidates = store.rows.groupby("query_id").product_id.apply(set)
            given = json.loads(answers.read_text())
            assert len(given) == 6
            assert all(set(pids) <= candidates[int(qid)] for qid, pids in given.items())


def test_other_generator_same_seed_same_bytes(tmp_path):
    generator = bench_script("other_generator")
    for name in ("a", "b"):
        generator.main(["--out", str(tmp_path / name), "--train-queries", "10", "--eval-queries", "3"])
    for split in ("train", "valid", "testA"):
        tsv = f"{split}/{split}.tsv"
        assert (tmp_path / "a" / tsv).read_bytes() == (tmp_path / "b" / tsv).read_bytes()
