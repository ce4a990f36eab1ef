"""`mmrecall gather`: bring members trained elsewhere into this clone, from the tracking store.

For assembling a ranker in a clone that trained none of its members (they were trained in other clones or
on other machines, all logging to one tracking server): each member the re-ranker uses (params
`rerank.members`, and `smooth.members` when `rerank.smoothing` is on) is found in the tracking store like
`mmrecall register` finds it (the ids in metrics/train/<member>.json when that file came with the clone,
else the newest finished run of that member name on the same data), its checkpoint is downloaded from its
logged model to models/<model>/seed<k>/model.pt, and it scores this clone's valid / testA feature stores
into outputs/<member>/. metrics/train/<member>.json gets those NDCG@5 numbers and the member's
`logged_model` ids, so that `mmrecall smooth`, `mmrecall rerank` and `mmrecall register` then run here as
after a local training (docs/scaling-out.md).
"""

from __future__ import annotations

import argparse
import logging
import time

from .. import tracking
from ..config import Params, load_params, member_names, user_path
from ..errors import MissingInputError
from ..ranking import members, outputs
from ..ranking.evaluation import eval_stores, model_report
from ..ranking.metrics import read_metrics, write_metrics

log = logging.getLogger(__name__)


def wanted(params: Params) -> list[str]:
    """The members the re-ranker (and, with smoothing on, the smooth stage) reads."""
    names = member_names(params, params.rerank.members)
    if params.rerank.smoothing:
        names += [m for m in member_names(params, params.smooth.members) if m not in names]
    return names


def run(params: Params, names: list[str] | None = None) -> dict:
    stores = eval_stores(params)
    if "valid" not in stores:
        raise MissingInputError(f"{params.data.features}/valid: no feature store (run `mmrecall prepare --split valid`)")
    report: dict = {}
    for member in names or wanted(params):
        t0 = time.perf_counter()
        recorded = read_metrics(params.data.metrics, f"train/{member}").get("logged_model")
        found = tracking.find_member(member, params.tracking.experiment, recorded)
        path = tracking.download_checkpoint(found, members.checkpoint_path(member).parent)
        loaded = members.load(path)
        tables = {}
        for split, store in stores.items():
            tables[split], fused = members.score(loaded, store)
            outputs.write(params.data.outputs, member, split, tables[split], fused)
        report[member] = {**model_report(tables, params, stores), "logged_model": found.ids(),
                          "gathered_from": tracking.redact(tracking.tracking_uri())}
        write_metrics(params.data.metrics, f"train/{member}", report[member])
        log.info("%s: logged model %s (run %s) scored in %.1f s: %s", member, found.model_id, found.run_id,
                 time.perf_counter() - t0, {s: v for s, v in report[member].items() if s in stores})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall gather",
        description="Download the members the re-ranker uses (params rerank.members; smooth.members too when "
        "rerank.smoothing) from their logged models in the tracking store ($MLFLOW_TRACKING_URI), found by the "
        "ids in metrics/train/<member>.json or by member name and data hash, and score valid / testA with them: "
        "models/<model>/seed<k>/model.pt, outputs/<member>/ and metrics/train/<member>.json, as if trained here. "
        "Then `mmrecall rerank` and `mmrecall register` assemble the ranker in this clone.",
    )
    parser.add_argument("--member", action="append", help="<model>-seed<k> to gather (repeatable; default: the "
                        "re-ranker's members)")
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = parser.parse_args(argv)
    run(load_params(args.params), args.member)
    return 0
