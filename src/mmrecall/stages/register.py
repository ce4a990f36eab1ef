"""`mmrecall register`: log the whole ranker as an MLflow pyfunc (models-from-code), register it, move `champion`.

- Members come from the tracking store, never from local files: every member the re-ranker uses
  (models/rerank/spec.json) is found by the ids its training recorded in metrics/train/<member>.json
  (`logged_model`: run and logged-model id), or, without that file, as the newest finished run of that
  member name on the same data (data.dvc hash) in the experiment; its checkpoint is downloaded from its
  logged model. So members trained in other clones or on other machines against the same tracking
  server (`MLFLOW_TRACKING_URI=http://...`) are assembled here; `mmrecall gather` brings their valid /
  testA scores into a clone that trained none of them, for `mmrecall rerank`. A member without a logged
  checkpoint is an error that names it and its run (errors.MissingLoggedMemberError).
- The re-ranker (models/rerank/) is local: `mmrecall rerank` fits it in this clone, on this clone's
  member outputs, just before; its run id (in spec.json) tags the version.
- The model is src/mmrecall/ranking/ranker_model.py with the mmrecall package as its code; artifacts: the
  downloaded member checkpoints, models/rerank/ (LightGBM boosters as text files, PCA, counts, feature spec
  with the preprocessing settings) and the backbone's config + tokenizer files. Explicit signature (the
  nine official columns -> score) and a two-row input example: valid's first rows that prepare kept. Its scores
  rank as the submission's rule says (spec.json "submission", chosen by `mmrecall rerank`), which the model's
  metadata `submission` and the version's tag `submission_rule` name.
- Registered as params `register.name` (default mmrecall-ranker); the version's source run is the
  `register` run that logged it. The version's tags are its metrics (honest out-of-fold valid NDCG@5,
  testA, with and without post-processing), the data hash, the git commit, the params hash, every
  member's run and logged model (`member.<member>.run_id`, `member.<member>.model_id`, and `member_runs`)
  and the re-ranker's run (`rerank_run_id`).
- The alias `register.alias` (default champion) moves to the new version only when its honest valid
  NDCG@5 beats the current champion's (strictly); otherwise it stays where it is.
- Writes metrics/register.json (version, its NDCG@5, the champion before and after).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import mlflow

from .. import tracking
from ..config import RULE_BEFORE_SUBMISSION, Params, flatten, load_params, to_dict, user_path
from ..data.store import ROWS, FeatureStore
from ..models.backbone import backbone_path
from ..ranking import members as members_mod
from ..ranking import reranker
from ..ranking.metrics import METRIC, read_metrics, write_metrics
from ..ranking.ranker import MEMBER_PREFIX, MODEL_CODE, SIGNATURE, read_candidates

log = logging.getLogger(__name__)

HONEST = f"{METRIC}_valid_oof"  # the tag the champion comparison reads


def model_tags(spec: dict) -> dict[str, str]:
    """`ndcg_at_5_valid_oof`, `ndcg_at_5_valid_oof_pp`, `ndcg_at_5_testA[_pp]` ... from the re-ranker's metrics."""
    tags = {}
    for split, values in spec["metrics"].items():
        for key, value in values.items():
            tags[key.replace(METRIC, f"{METRIC}_{split}")] = f"{value:.6f}"
    return tags


def example_rows(params: Params, n: int = 2):
    """The input example: the first rows of valid's TSV that `prepare` kept (a rejected row would fail the model's
    own check of its input), or None without data."""
    tsv = Path(params.data.root) / "valid" / "valid.tsv"
    if not tsv.exists():
        return None
    store = Path(params.data.features) / "valid"
    if not (store / ROWS).exists():
        return read_candidates(tsv, nrows=n)
    return read_candidates(tsv, lines=FeatureStore.open(store).rows.line.iloc[:n].tolist())


def logged_members(params: Params, names: list[str]) -> dict[str, tracking.LoggedMember]:
    """Each member's run and logged model in the tracking store (by the ids metrics/train/<member>.json
    recorded, else by name and data hash)."""
    return {m: tracking.find_member(m, params.tracking.experiment,
                                    read_metrics(params.data.metrics, f"train/{m}").get("logged_model"))
            for m in names}


def member_tags(found: dict[str, tracking.LoggedMember]) -> dict[str, str]:
    tags = {"member_runs": ",".join(f"{m}={f.run_id}" for m, f in found.items())}
    for member, f in found.items():
        tags[f"member.{member}.run_id"] = f.run_id
        tags[f"member.{member}.model_id"] = f.model_id
    return tags


def run(params: Params, rerank_dir: Path = reranker.MODEL_DIR) -> dict:
    started = time.perf_counter()
    spec = reranker.load(rerank_dir).spec
    score = float(spec["metrics"]["valid_oof"][METRIC])
    rp = params.register
    found = logged_members(params, spec["members"])
    with tempfile.TemporaryDirectory(prefix="mmrecall-register-") as tmp:
        artifacts = {"rerank": str(rerank_dir),
                     "backbone": str(members_mod.copy_tokenizer_files(backbone_path(), Path(tmp) / "backbone"))}
        for member, f in found.items():
            artifacts[f"{MEMBER_PREFIX}{member}"] = str(tracking.download_checkpoint(f, Path(tmp) / "members" / member))
            log.info("%s: checkpoint of logged model %s (run %s)", member, f.model_id, f.run_id)
        code = tracking.package_copy(Path(tmp))
        with tracking.start_run("register", stage="register", params=flatten({"register": to_dict(rp)}),
                                experiment=params.tracking.experiment, tags={"model": rp.name}) as run:
            info = mlflow.pyfunc.log_model(
                name="ranker",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(code)],
                signature=SIGNATURE,
                input_example=example_rows(params),
                pip_requirements=tracking.pip_requirements(),
                registered_model_name=rp.name,
                metadata={"submission": spec["submission"]["rule"]} if "submission" in spec else None,
            )
            mlflow.log_metric(METRIC, score)
            run_id = run.info.run_id
    client = mlflow.MlflowClient()
    version_ = str(info.registered_model_version)
    tags = {**model_tags(spec), **tracking.standard_tags("register", to_dict(params.rerank)), "run_id": run_id,
            "members": ",".join(spec["members"]), **member_tags(found),
            "rerank_run_id": spec.get("mlflow_run_id") or "unknown", "smoothing": str(spec["smoothing"]).lower(),
            "submission_rule": spec.get("submission", {}).get("rule", RULE_BEFORE_SUBMISSION)}
    for key, value in tags.items():
        client.set_model_version_tag(rp.name, version_, key, value)
    decision = tracking.promote_if_better(client, rp.name, rp.alias, version_, score, HONEST)
    report = {"name": rp.name, "version": version_, HONEST: score, "alias": rp.alias, **decision,
              "model_uri": f"models:/{rp.name}/{version_}", "seconds": round(time.perf_counter() - started, 1)}
    write_metrics(params.data.metrics, "register", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall register",
        description="Log the ranker (members + LightGBM re-ranker + tokenizer files + settings) as an MLflow pyfunc "
        "with an explicit signature (the members' checkpoints downloaded from their logged models in the tracking "
        "store: by the ids in metrics/train/<member>.json, else by member name and data hash), register it as params register.name, tag the version with its metrics and "
        "data hash, and move the alias register.alias to it only if its honest (out-of-fold) valid NDCG@5 beats "
        "the current holder's. Writes metrics/register.json.",
    )
    parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = parser.parse_args(argv)
    report = run(load_params(args.params))
    log.info("%s v%s (honest valid %s %.4f); %s -> v%s%s", report["name"], report["version"], METRIC, report[HONEST],
             report["alias"], report["champion"], " (moved)" if report["moved"] else " (not moved)")
    return 0
