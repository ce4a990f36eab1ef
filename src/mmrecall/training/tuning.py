"""The Optuna study behind `mmrecall tune`: focal-loss alpha and gamma, the schedule amplitude (and lr).

- Objective: the best valid NDCG@5 of a short training (`tune.steps`) of `tune.model`, written
  nowhere (training/fit.py's build_data, build_trainer and train, checkpoints in a temporary folder). Every evaluation (`tune.eval_every` steps) is reported to the trial,
  and the pruner (median by default) stops a trial below the median of the finished ones. TPE
  sampler seeded from `tune.sampler_seed` (plus the worker index and the trials already in the study,
  so parallel or resumed workers do not repeat each other's draws).
- Storage (`tune.storage`): a journal file by default (relative paths live in the repository root),
  which several processes on one machine (or on a shared NFS folder) can share; any RDB URL
  (postgresql://, mysql+pymysql://) for workers on several machines. The study name defaults to
  `<model>-<hash of everything the objective depends on>`: the same setup resumes its study, a
  changed one starts a new study.
- `tune.n_trials` is the number of finished (complete or pruned) trials the study should reach, counted
  over every worker: a resumed study runs only the missing ones. With several workers the last
  trials may overshoot it by up to (workers - 1).
- Workers: run `mmrecall tune` again on the same storage (another terminal, another machine for an
  RDB) or `mmrecall tune --workers N` for N local processes.
- MLflow: one parent run per study (`study-<name>`; inside `mlflow run` the project's run is the
  parent), one child `trial-<n>` per trial with its params, its ndcg_at_5 / loss / lr series and its
  state (tag `state`: complete, pruned, failed; run status FINISHED, KILLED, FAILED). The parent carries
  the study setup as params and, after every worker, the best value and params (metrics `best_*`).
- Writes `tune.output` (best_params.yaml: model + the best trial's values; `train.best_params: true`
  applies them) and metrics/tune.json.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from .. import tracking
from ..config import Params, ParamsError, flatten, repo_root, to_dict, with_model_values
from ..ranking.metrics import METRIC
from . import fit

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
PARENT_ATTR = "mlflow_parent_run_id"


def open_storage(spec: str) -> optuna.storages.BaseStorage | str:
    """An RDB URL as it is; anything else is a journal file (relative to the repository root)."""
    if "://" in spec:
        return spec
    path = Path(spec) if Path(spec).is_absolute() else repo_root() / spec
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def study_name(params: Params) -> str:
    """`tune.study_name`, or `<model>-<hash>` of what the objective depends on (not n_trials, storage, pruner)."""
    tp = params.tune
    if tp.study_name:
        return tp.study_name
    setup = {
        "tune": {k: v for k, v in to_dict(tp).items() if k in ("model", "seed", "steps", "eval_every", "space")},
        "train": {k: v for k, v in to_dict(params.train).items() if k not in ("models", "seeds", "best_params")},
        "data": tracking.data_hash(),
    }
    return f"{tp.model}-{tracking.params_hash(setup)[:8]}"


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    p, tp = params.tune.pruner, params.tune
    if p.kind == "median":
        # step = the optimizer step of the evaluation; a trial always survives its first `warmup_evals` evaluations
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials,
                                           n_warmup_steps=p.warmup_evals * tp.eval_every + 1)
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    raise ParamsError(f"params tune.pruner.kind: {p.kind!r}; known: median, none")


class ReportToTrial(Callback):
    """After every validation: report valid NDCG@5 at the current step; stop the training if the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value, step = float(trainer.callback_metrics[METRIC]), trainer.global_step
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"valid {METRIC} {value:.4f} at step {step} is below the median")


# --- MLflow: the study's parent run ----------------------------------------------------------------


def _parent_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False  # a study resumed against another (or a wiped) tracking store


def create_parent(study: optuna.Study, params: Params, storage_label: str, exp_id: str) -> str:
    """The study's parent run: the `mlflow run` project run if there is one, else a new run."""
    client = mlflow.MlflowClient()
    name = f"study-{study.study_name}"
    # (not n_trials: it changes when a study is resumed, and MLflow params are immutable)
    setup = flatten({"tune": {k: v for k, v in to_dict(params.tune).items() if k not in ("n_trials", "study_name")}})
    tags = {**tracking.standard_tags("tune", setup), "kind": "study", "optuna.study_name": study.study_name,
            "optuna.storage": storage_label, "model": params.tune.model}
    run_id = tracking.claim_project_run()
    if run_id:
        client.update_run(run_id, name=name)
    else:
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, "" if v is None else str(v)) for k, v in setup.items()])
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def open_study(params: Params, worker: int, wait_s: float = 120.0) -> tuple[optuna.Study, str, bool]:
    """(study, parent run id, whether this process created the study).

    Creating the study is the one atomic step every storage offers, so its creator makes the MLflow parent
    and records it on the study; a worker that finds the study waits (briefly) for that record.
    """
    tp = params.tune
    storage = open_storage(tp.storage)
    label = tracking.redact(tp.storage)
    name = study_name(params)
    pruner = make_pruner(params)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        created = False
    # Seeded, but not identical across workers or resumptions (a repeated seed would repeat the draws).
    seed = tp.sampler_seed + 1000 * worker + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, tp.n_trials // 3)))

    exp_id = tracking.setup(params.tracking.experiment)
    parent = study.user_attrs.get(PARENT_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while not created and parent is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the creator is making the parent run
        parent = study.user_attrs.get(PARENT_ATTR)
    if not _parent_exists(parent):
        parent = create_parent(study, params, label, exp_id)
    else:
        project = tracking.claim_project_run()  # `mlflow run` joining an existing study: point at its parent
        if project:
            mlflow.MlflowClient().set_tag(project, "optuna.study_parent_run_id", parent)
    return study, parent, created


# --- one trial ---------------------------------------------------------------------------------------


def train_trial(params: Params, progress: bool, report: Callback) -> float:
    """A short training of `tune.model` (checkpoints in a temporary folder, no outputs); its best valid NDCG@5."""
    tp = params.tune
    setup = fit.build_data(tp.model, tp.seed, params)
    with tempfile.TemporaryDirectory(prefix=f"{setup.member}-") as ckpt_dir:
        trainer, best = fit.build_trainer(setup, Path(ckpt_dir), progress, callbacks=[report])
        fit.train(setup, trainer)
        return float(best.best_model_score)


def make_objective(params: Params, parent_id: str, progress: bool, worker: int = 0):
    tp = params.tune
    ranges = tp.ranges()

    def objective(trial: optuna.Trial) -> float:
        values = {key: trial.suggest_float(key, low, high, log=is_log) for key, (low, high, is_log) in ranges.items()}
        trial_params = with_model_values(params, tp.model, {**values, "steps": tp.steps, "eval_every": tp.eval_every})
        run_params = {**values, "model": tp.model, "seed": tp.seed, "steps": tp.steps, "trial": trial.number}
        tags = {"kind": "trial", "model": tp.model, "optuna.study_name": trial.study.study_name,
                "optuna.trial_number": str(trial.number), "optuna.worker": str(worker)}
        with tracking.child_run(f"trial-{trial.number}", "tune", parent_id, run_params, tags) as (run, outcome):
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            state = "failed"
            try:
                best = train_trial(trial_params, progress, ReportToTrial(trial))
                state = "complete"
            except optuna.TrialPruned:
                state = "pruned"
                raise
            finally:
                outcome.status = MLFLOW_STATUS[state]
                mlflow.set_tags({"state": state, "optuna.state": state})
            mlflow.log_metric(f"best_{METRIC}", best)
            return best

    return objective


# --- results -----------------------------------------------------------------------------------------


def summarise(study: optuna.Study, params: Params, parent_id: str) -> dict | None:
    """Write best_params.yaml and metrics/tune.json, log the best trial on the parent; None without a complete trial."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state.name.lower() == state for t in trials) for state in ("complete", "pruned", "fail")}
    client = mlflow.MlflowClient()
    client.log_batch(parent_id, metrics=[mlflow.entities.Metric(f"trials_{k}", v, int(time.time() * 1000), 0)
                                         for k, v in counts.items()])
    if not counts["complete"]:
        return None
    best = study.best_trial
    out = {
        "model": params.tune.model,
        "params": dict(best.params),
        METRIC: best.value,
        "trial": best.number,
        "study": study.study_name,
        "storage": tracking.redact(params.tune.storage),
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
    }
    header = ("# Written by `mmrecall tune`: the best trial of the study. `train.best_params: true` in params.yaml\n"
              f"# applies `params` to train.overrides.{params.tune.model} (amplitude = schedule.amplitude).\n")
    write_atomic(Path(params.tune.output), header + yaml.safe_dump(out, sort_keys=False))
    metrics = {f"best_{METRIC}": best.value, "best_trial": best.number, **{f"trials_{k}": v for k, v in counts.items()}}
    write_atomic(Path(params.data.metrics) / "tune.json", json.dumps(metrics, indent=2) + "\n")
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[mlflow.entities.Metric(f"best_{METRIC}", best.value, now, 0),
                                         mlflow.entities.Metric("best_trial", best.number, now, 0),
                                         *[mlflow.entities.Metric(f"best.{k}", v, now, 0) for k, v in best.params.items()]],
                     tags=[mlflow.entities.RunTag("best_params", json.dumps(best.params)),
                           mlflow.entities.RunTag("best_trial_run_id", str(out["mlflow_run_id"]))])
    return out


def write_atomic(path: Path, text: str) -> None:
    """Several workers may write the same file: a rename is all-or-nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_study(params: Params, worker: int = 0, extra_workers: int = 0, progress: bool = True,
              params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict | None:
    """Open (or resume) the study, run this worker's share of the trials, summarise; returns best_params."""
    study, parent_id, created = open_study(params, worker)
    # Helpers start once the study and its parent exist (no creation race); they share the trial budget.
    helpers = [subprocess.Popen([sys.executable, "-m", "mmrecall.cli", "tune", "--params", params_file,
                                 "--worker", str(worker + k), "--no-progress", *(overrides or [])],
                                env={k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"})
               for k in range(1, extra_workers + 1)]
    ok = False
    try:
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        remaining = params.tune.n_trials - finished
        log.info("study %s (%s): %d finished trial(s), running up to %d more (worker %d)", study.study_name,
                 tracking.redact(params.tune.storage), finished, max(remaining, 0), worker)
        if remaining > 0:
            study.optimize(make_objective(params, parent_id, progress, worker), n_trials=remaining,
                           callbacks=[optuna.study.MaxTrialsCallback(params.tune.n_trials, states=FINISHED)])
        failed = [p.args for p in helpers if p.wait() != 0]
        if failed:
            raise RuntimeError(f"tuning worker(s) failed: {failed}")
        ok = True
        return summarise(study, params, parent_id)
    finally:
        for p in helpers:
            if p.poll() is None:
                p.terminate()
        end_parent(parent_id, ok, created)


def end_parent(parent_id: str, ok: bool, created: bool) -> None:
    """Mark the study's parent ended (any worker may end it; later workers still log to it). `mlflow run` ends
    its own run."""
    client = mlflow.MlflowClient()
    if "mlflow.project.entryPoint" in client.get_run(parent_id).data.tags:
        return
    if ok:
        client.set_terminated(parent_id, "FINISHED")
    elif created:
        client.set_terminated(parent_id, "FAILED")
