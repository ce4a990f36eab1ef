"""The default CPU pipeline on a grid of synthetic worlds: how well it ranks data it was not shaped on.

    .venv/bin/python bench/bench_quality.py                          # every world of data/synth.py's WORLDS
    .venv/bin/python bench/bench_quality.py --worlds default hard    # some of them
    make bench-quality

For each world: a clone of this repository's HEAD under --work (bench/work/quality/<world>), the world's
data (`mmrecall synth --world <world>`), then what `make repro` runs (`dvc add data`, `dvc repro`), all
with the committed params.yaml: the same settings for every world. Collected from each clone's metrics/:
wordproto, every train member (mean and spread over seeds per model), the ensemble and the LightGBM
re-ranker (valid out-of-fold, testA), the registered ranker's submission on testA, each with and without
the candidate-frequency post-processing (pp), and the wall time of the pipeline.

The worlds and their settings are in src/mmrecall/data/synth.py (WORLDS). A world already finished under
--work is read back, not re-run (delete its folder to run it again). Results: a markdown table on stdout
and in bench/results/quality.md, the numbers in bench/results/quality.json. Not part of CI (about 4-12
minutes per world on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mmrecall.config import load_params, member_names  # noqa: E402
from mmrecall.data.synth import WORLDS  # noqa: E402

METRIC = "ndcg_at_5"


def run_world(world: str, work: Path) -> dict:
    """Clone, synthesize the world, run the pipeline; returns the wall time of each step."""
    clone = work / world
    if (clone / "metrics" / "predict.json").exists():
        print(f"[{world}] finished before: reading {clone}/metrics", flush=True)
        return json.loads((clone / "bench_times.json").read_text()) if (clone / "bench_times.json").exists() else {}
    if clone.exists():
        subprocess.run(["rm", "-rf", str(clone)], check=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    venv_bin = ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHONPATH": str(clone / "src"),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    times = {}
    for step, cmd in (("synth", ["mmrecall", "synth", "--world", world, "--no-progress"]),
                      ("dvc add", ["dvc", "add", "data", "--quiet"]),
                      ("dvc repro", ["dvc", "repro"])):
        print(f"[{world}] {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        with open(clone / "bench.log", "a") as log:
            result = subprocess.run(cmd, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
        times[step] = round(time.perf_counter() - started, 1)
        if result.returncode:
            raise SystemExit(f"[{world}] {' '.join(cmd)} failed (exit {result.returncode}); see {clone}/bench.log")
    (clone / "bench_times.json").write_text(json.dumps(times))
    return times


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def collect(world: str, clone: Path, times: dict) -> dict:
    """One world's row: NDCG@5 (and with pp) of wordproto, members, ensemble, re-ranker and submission."""
    metrics = clone / "metrics"
    row: dict = {"world": world, "settings": WORLDS[world], "pipeline_seconds": times.get("dvc repro")}
    wordproto = _load(metrics / "wordproto.json")
    row["wordproto"] = {s: wordproto[s] for s in ("valid", "testA")}
    by_model: dict[str, list[dict]] = {}
    params = load_params(clone / "params.yaml")
    for member in member_names(params, None):  # the members of this params (metrics/train may hold older ones)
        by_model.setdefault(member.rsplit("-seed", 1)[0], []).append(_load(metrics / "train" / f"{member}.json"))
    row["members"] = {}
    for model, runs in by_model.items():
        entry = {"seeds": len(runs), "best_step": [r["best_step"] for r in runs], "steps": runs[0]["steps"]}
        for split in ("valid", "testA"):
            for key in (METRIC, f"{METRIC}_pp"):
                values = [r[split][key] for r in runs]
                entry[f"{split}.{key}"] = {"mean": statistics.fmean(values),
                                           "spread": max(values) - min(values)}
        row["members"][model] = entry
    rerank = _load(metrics / "rerank.json")
    chosen = rerank["chosen"]
    row["ensemble"] = {s: rerank[chosen.replace("rerank", "ensemble")][s] for s in ("valid", "testA")}
    row["rerank"] = {s: rerank[chosen][s] for s in ("valid", "testA")}
    row["ensemble_weights"] = rerank[chosen].get("ensemble_weights")
    row["submission"] = _load(metrics / "predict.json")["testA"]
    return row


def fmt(value: dict | float, key: str = METRIC) -> str:
    return f"{value[key]:.3f}" if isinstance(value, dict) else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per world, testA before pp (valid out-of-fold for the re-ranker in brackets)."""
    models = sorted({m for r in rows for m in r["members"]})
    head = (["world", "wordproto"] + [f"{m} (mean ± spread)" for m in models]
            + ["best member", "ensemble", "re-ranker valid OOF", "submission", "submission − best member",
               "best − wordproto", "minutes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        member_test = {m: r["members"][m][f"testA.{METRIC}"] for m in r["members"]}
        best = max(v["mean"] for v in member_test.values())
        wp = r["wordproto"]["testA"][METRIC]
        sub = r["submission"][METRIC]
        cells = [r["world"], f"{wp:.3f} ({fmt(r['wordproto']['testA'], METRIC + '_pp')} pp)"]
        cells += [f"{member_test[m]['mean']:.3f} ± {member_test[m]['spread']:.3f}" if m in member_test else "–"
                  for m in models]
        cells += [f"{best:.3f}", f"{fmt(r['ensemble']['testA'])} ({fmt(r['ensemble']['testA'], METRIC + '_pp')} pp)",
                  fmt(r["rerank"]["valid"]), f"{sub:.3f}", f"{sub - best:+.3f}", f"{best - wp:+.3f}",
                  f"{(r['pipeline_seconds'] or 0) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "quality",
                        help="one clone per world here (kept: a finished world is read back)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.work = args.work.resolve()  # the clones' PYTHONPATH: a relative one would not exist from inside a clone,
    # and the stages would import this repository's working tree through the editable install instead
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode:
        print("note: the working tree has uncommitted changes; the worlds run the committed HEAD", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in args.worlds:
        times = run_world(world, args.work)
        rows.append(collect(world, args.work / world, times))
        print(table(rows[-1:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (args.out / "quality.json").write_text(json.dumps({"commit": commit, "worlds": rows}, indent=2) + "\n")
    (args.out / "quality.md").write_text(table(rows) + "\n")
    print(f"\ncommit {commit}, testA NDCG@5 before post-processing unless marked pp\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
