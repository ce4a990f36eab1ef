"""`mmrecall summary`: one metrics JSON and one markdown table for the whole ranker, plus the DVC plots data.

Rows: every member (and the same member on smoothed boxes when `smooth` re-scored it), the wordproto
floor, the ensemble, the ensemble + re-ranker (valid = out-of-fold, the honest number), each with
and without smoothing, and the submission written through the registered model. Columns: NDCG@5
on valid and testA (synthetic answers), raw and after the post-processing of params
`evaluate.postprocess`. Writes metrics/stage2.json and reports/stage2.md.

Plots (dvc plots show): plots/ndcg_at_5/<member>.csv (step, ndcg_at_5) and plots/lr/<member>.csv
(step, lr), read from each member's latest finished MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import mlflow
import pandas as pd

from .. import tracking
from ..config import Params, load_params, member_names, user_path
from ..ranking import outputs
from ..ranking.evaluation import eval_stores, model_report
from ..ranking.metrics import METRIC, write_metrics

log = logging.getLogger(__name__)

REPORT = Path("reports") / "stage2.md"
PLOTS = Path("plots")


RERANK_LABEL = "ensemble + re-ranker (valid: out-of-fold)"
META = ("check", "register", "submission_rule")  # non-table entries of the summary


def rows_to_report(params: Params) -> list[tuple[str, str, str, str]]:
    """(key, label, smoothing on/off, outputs folder) of every possible row; `+knn` keys = smoothing on."""
    out = [(params.baseline.name, params.baseline.name, "off", params.baseline.name)]
    for m in member_names(params):
        out += [(m, m, "off", m), (f"{m}+knn", m, "on", outputs.smoothed(m))]
    for kind, label in (("ensemble", "ensemble"), ("rerank", RERANK_LABEL)):
        out += [(kind, label, "off", kind), (f"{kind}+knn", label, "on", outputs.knn(kind))]
    return out


def label_of(key: str, params: Params) -> tuple[str, str]:
    """(label, smoothing) of a summary key, for the table."""
    for k, label, smoothing, _ in rows_to_report(params):
        if k == key:
            return label, smoothing
    return "submission.csv via the registered model", "on" if params.rerank.smoothing else "off"


def collect(params: Params) -> dict:
    stores = eval_stores(params)
    summary: dict = {}
    for key, _, _, folder in rows_to_report(params):
        tables = outputs.read_tables(params.data.outputs, folder, stores)
        if tables:
            summary[key] = model_report(tables, params, stores)
    predict = Path(params.data.metrics) / "predict.json"
    if predict.exists():
        report = json.loads(predict.read_text())
        summary["submission"] = {s: {k: v for k, v in vals.items() if k.startswith(METRIC)}
                                 for s, vals in report.items() if isinstance(vals, dict) and METRIC in vals}
        if "rule" in report:
            summary["submission_rule"] = report["rule"]
    register = Path(params.data.metrics) / "register.json"
    if register.exists():
        summary["register"] = json.loads(register.read_text())
    singles = [m for m in member_names(params) if m in summary]
    test = next((s for s in stores if s != "valid"), None)
    if singles and test and test in summary.get("rerank", {}):
        best = max(singles, key=lambda m: summary[m].get(test, {}).get(METRIC, -1))
        rr = summary["rerank"][test]
        summary["check"] = {
            "split": test,
            "best_single_member": best,
            "best_single": summary[best].get(test),
            "ensemble_rerank": rr,
            "rerank_beats_best_single": bool(rr.get(METRIC, -1) > summary[best][test][METRIC]),
        }
    return summary


def markdown(summary: dict, params: Params) -> str:
    rows = {k: v for k, v in summary.items() if k not in META}
    splits = sorted({s for rep in rows.values() for s in rep}, key=lambda s: (s != "valid", s))
    head = ["model", "smoothing"] + [f"{s} {c}" for s in splits for c in ("NDCG@5", "+post-proc")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rep in rows.items():
        cells = list(label_of(key, params))
        for s in splits:
            vals = rep.get(s, {})
            cells += [f"{vals[k]:.4f}" if k in vals else "-" for k in (METRIC, f"{METRIC}_pp")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if "check" in summary:
        c = summary["check"]
        text += (f"\nOn {c['split']}: ensemble + re-ranker {c['ensemble_rerank'].get(METRIC, float('nan')):.4f} vs the best "
                 f"single member ({c['best_single_member']}) {c['best_single'][METRIC]:.4f} (raw NDCG@5).\n")
    if "submission_rule" in summary:
        text += (f"\nsubmission.csv ranks by `{summary['submission_rule']}` (`rerank.submission`; metrics/rerank.json has "
                 "the valid NDCG@5 of each rule).\n")
    if "register" in summary:
        r = summary["register"]
        text += (f"\nRegistered {r['name']} v{r['version']} (honest valid NDCG@5 {r['ndcg_at_5_valid_oof']:.4f}); "
                 f"`{r['alias']}` is v{r['champion']}{' (moved)' if r['moved'] else ' (not moved)'}.\n")
    return text


def write_plots(params: Params) -> list[str]:
    """Per member: NDCG@5 and lr by step from its latest finished MLflow member run (if any)."""
    exp_id = tracking.setup(params.tracking.experiment)
    client = mlflow.MlflowClient()
    written = []
    for member in member_names(params):
        runs = mlflow.search_runs(experiment_ids=[exp_id], output_format="list", max_results=1,
                                  filter_string=f"tags.mlflow.runName = '{member}' and tags.kind = 'member' "
                                                "and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            continue
        for key in (METRIC, "lr"):
            hist = client.get_metric_history(runs[0].info.run_id, key)
            if hist:
                path = PLOTS / key / f"{member}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"step": [h.step for h in hist], key: [h.value for h in hist]}).sort_values("step").to_csv(
                    path, index=False)
                written.append(str(path))
    return written


def run(params: Params) -> dict:
    for key in (METRIC, "lr"):
        (PLOTS / key).mkdir(parents=True, exist_ok=True)
    summary = collect(params)
    write_plots(params)
    write_metrics(params.data.metrics, "stage2", summary)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("# Ranker: members, ensemble, re-ranker, smoothing, post-processing\n\n"
                      "NDCG@5; valid of the re-ranker rows is out-of-fold (honest). A split is scored only where its answers "
                      "file exists (the organisers ship valid's; `mmrecall synth` also writes testA's).\n\n"
                      + markdown(summary, params))
    log.info("%d rows -> %s, %s; plots in %s/", len(summary), REPORT, Path(params.data.metrics) / "stage2.json", PLOTS)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall summary",
        description="NDCG@5 (valid, testA; raw and post-processed) of every member, with and without smoothing, "
        "the ensemble, the ensemble + re-ranker (valid out-of-fold) and the submission of the registered "
        "model, into metrics/stage2.json and reports/stage2.md; per-member NDCG@5 and lr curves from MLflow "
        "into plots/ for `dvc plots show`.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    print(markdown(run(params), params), end="")
    return 0
