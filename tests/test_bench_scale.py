"""bench/bench_scale.py at a tiny size: every phase runs in its own process and the summary is complete."""

from __future__ import annotations

import json

from .conftest import bench_script


def test_bench_scale_tiny(tmp_path):
    bench = bench_script("bench_scale")
    texts = bench.query_texts(500)
    assert len(set(texts)) == 500 and all(1 <= len(t.split()) <= 6 for t in texts)
    out = tmp_path / "scale.json"
    assert bench.main(["--phases", "pools", "rerank features", "--queries", "200", "400", "--eval-rows", "120", "240",
                       "--fused-dim", "32", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["size"] for r in result["results"]["pools"]] == [200, 400]
    assert all(r["peak_rss_mib"] >= r["rss_before_mib"] > 0 for rs in result["results"].values() for r in rs)
    for name in ("pools", "rerank features"):
        assert set(result["summary"][name]) == {"exponent", "memory_exponent", "real_size", "real_seconds",
                                                "real_peak_rss_mib"}
