"""Benchmark training throughput and peak memory of each neural ranker in the default config.

    .venv/bin/python bench/bench_train.py                    # every model in params.yaml, 60 steps each
    .venv/bin/python bench/bench_train.py --models mcan --steps 100

Each model runs in its own subprocess (its peak RSS is its own): training/fit.py's build_data, build_trainer
and train (no outputs written) with the
member's own settings from params.yaml (overrides included) except `steps` = `eval_every` = --steps,
so a run is --steps optimizer steps and one valid evaluation at the end. A callback times the
training steps alone (batch start to batch end: data, forward, backward, optimizer), so samples/s
is training throughput without the evaluation. A "sample" is one (query, image) pair scored: two
per triple for the pointwise models (positive + negative), one per row for the two-tower.
Needs features/ (run `make repro` or `dvc repro prepare` first). Results: a markdown table on
stdout and bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parent.parent


class StepTimer(L.Callback):
    """Times the training steps alone (batch start to batch end) and counts the samples they scored."""

    seconds, samples = 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self.started
        self.samples += len(batch["pos"]["input_ids"]) * (2 if "neg" in batch else 1)


def run_one(model: str, steps: int) -> dict:
    import tempfile

    import torch

    from mmrecall.config import load_params
    from mmrecall.training import fit

    params = load_params(ROOT / "params.yaml")
    overrides = dict(params.train.overrides)
    overrides[model] = {**(overrides.get(model) or {}), "steps": steps, "eval_every": steps}
    params.train.overrides = overrides
    tp = params.train.for_model(model)

    timer = StepTimer()
    started = time.perf_counter()
    setup = fit.build_data(model, 1, params)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        trainer, best = fit.build_trainer(setup, Path(ckpt_dir), progress=False, callbacks=[timer])
        fit.train(setup, trainer)
        result = {"ndcg_at_5": float(best.best_model_score), "steps": trainer.global_step}
    wall = time.perf_counter() - started
    return {
        "model": model,
        "steps": steps,
        "batch_size": tp.batch_size,
        "max_boxes": tp.max_boxes,
        "samples_per_s": timer.samples / timer.seconds,
        "s_per_step": timer.seconds / steps,
        "wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "valid_ndcg_at_5": result.get("ndcg_at_5"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="default: train.models of params.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.steps)))
        return 0

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "src"))
    from mmrecall.config import load_params

    models = args.models or load_params("params.yaml").train.models
    rows = []
    for model in models:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--child", model, "--steps", str(args.steps)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["load_before"] = load
        rows.append(row)
        print(f"{model}: {row['samples_per_s']:.0f} samples/s, peak RSS {row['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    lines = [
        "| model | batch | boxes | samples/s | s/step | peak RSS (MiB) | wall (s) | load before |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['batch_size']} | {r['max_boxes']} | {r['samples_per_s']:.0f} | {r['s_per_step']:.3f} | "
          f"{r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['load_before']:.1f} |" for r in rows),
    ]
    print("\n".join(lines))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "steps": args.steps}
    (results / "train.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
