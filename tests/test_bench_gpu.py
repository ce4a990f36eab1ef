"""bench/bench_gpu.py at tiny sizes on the CPU: every model trains through the Lightning Trainer and scores."""

from __future__ import annotations

import json

from .conftest import bench_script


def test_bench_gpu_tiny_runs_on_cpu(tmp_path, capsys):
    bench = bench_script("bench_gpu")
    out = tmp_path / "gpu.json"
    assert bench.main(["--tiny", "--steps", "3", "--score-batches", "1", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    done = [r for r in runs if "skipped" not in r]
    assert {(r["model"], r["precision"]) for r in done} == {(m, "bf16-mixed") for m in ("mcan", "visualbert", "two_tower")}
    assert all(r["samples_per_s"] > 0 and r["score_pairs_per_s"] > 0 and r["peak_gpu_gib"] is None for r in done)
    assert all(r["skipped"] == "16-mixed needs a GPU" for r in runs if "skipped" in r)  # on a CPU machine
    assert "| mcan | bf16-mixed |" in capsys.readouterr().out
