"""All MLflow glue: tracking URI, experiment, standard tags, run names, parent runs, the champion alias.

- URI: $MLFLOW_TRACKING_URI, else an ABSOLUTE `sqlite:///<repo>/mlflow.db`, where <repo> is
  $DVC_ROOT when DVC runs the stage (queued experiments run in a temp copy; a relative URI would
  silently log into a throwaway database there). A relative sqlite URI in the environment (what
  `mlflow run` exports by default) is made absolute against <repo> for the same reason.
- Several processes on one sqlite store (tuning workers, queued experiments): the first use of the
  store (schema creation) and experiment creation are serialised by a lock file next to the database;
  MLflow's own busy timeout (20 s) covers the writes after that.
- Every run is tagged with the git commit and dirty flag, the `data.dvc` hash, the DVC stage and
  experiment name, and a hash of the params it ran with.
- Members as logged models: each train member logs its checkpoint as an MLflow 3 logged model (a pyfunc)
  linked to its run; `find_member` finds it again (by the ids its training recorded, or by the member's
  name and data hash) and `download_checkpoint` fetches its model.pt, from any store, a tracking server
  included. A missing one is a `MissingLoggedMemberError`, never a fall-back to a local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import yaml  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from .config import member_name, repo_root  # noqa: E402
from .errors import MissingLoggedMemberError  # noqa: E402

DEFAULT_EXPERIMENT = "mmrecall"
# This experiment is model training (its runs and charts), not GenAI development (traces); MLflow 3 reads the kind
# from this tag (its UI's starting mode still needs `workflowType=machine_learning` in the link: experiment_url).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = f"sqlite:///{repo_root() / path}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative as written), None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock (a `.lock` file next to a sqlite database) across processes; no-op for servers."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_name(model: str, seed: int | None = None) -> str:
    """`<model>-seed<k>` for members (their member name), `<model>` for parents and the baseline."""
    return model if seed is None else member_name(model, seed)


def _experiment_exists(experiment_id: str) -> bool:
    try:
        return mlflow.get_experiment(experiment_id) is not None  # (also creates a fresh store's schema)
    except MlflowException:
        return False


def _create_experiment(name: str) -> str:
    try:
        return mlflow.create_experiment(name, tags=EXPERIMENT_TAGS)
    except MlflowException:  # created meanwhile by another client of the same tracking server
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the project store and create the experiment once; return its id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # parallel first uses of a fresh sqlite store race on schema + experiment creation
        # Inside `mlflow run` (or after an earlier `set_experiment`, which exports the same variable)
        # keep that experiment, but only if it lives in this store: a stale id from another store is ignored.
        env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        chosen = mlflow.get_experiment(env_id) if env_id and _experiment_exists(env_id) else None
        found = chosen or mlflow.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else _create_experiment(experiment)
        if found and any(k not in found.tags for k in EXPERIMENT_TAGS):
            for key, value in EXPERIMENT_TAGS.items():  # made by `mlflow run`, or before the tag: set it once
                mlflow.MlflowClient().set_experiment_tag(exp_id, key, value)
    if chosen is None:
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def experiment_url(base: str, experiment_id: str) -> str:
    """The UI link that opens an experiment on its training runs (MLflow 3's UI otherwise starts in GenAI mode)."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def claim_project_run() -> str | None:
    """The run `mlflow run` created for this command, taken out of the environment (None outside `mlflow run`).

    MLflow's `start_run()` resumes $MLFLOW_RUN_ID whenever no run is active; a process that opens
    several runs (the tuning trials) takes the id first and uses it deliberately (as the study's parent).
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


def redact(uri: str) -> str:
    """A storage URL without its password, for tags and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@", 1)
    return uri


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def data_hash(root: Path | None = None) -> str | None:
    """The md5 of the raw data recorded in data.dvc (the `.dir` hash), if there is one."""
    path = (root or repo_root()) / "data.dvc"
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def standard_tags(stage: str, params: Mapping[str, Any] | None = None) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "data_md5": data_hash() or "unknown",
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "stage": stage,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if params is not None:
        tags["params_hash"] = params_hash(params)
    return tags


def log_params(params: Mapping[str, Any]) -> None:
    """Log flat params in batches (MLflow caps one call at 100 params)."""
    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


@contextlib.contextmanager
def start_run(
    name: str,
    stage: str,
    params: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A run in the project store with the standard tags and the given (flat) params."""
    setup(experiment)
    all_tags = {**standard_tags(stage, params), **(tags or {})}
    if os.environ.get("MLFLOW_RUN_ID") and parent_run_id is None and mlflow.active_run() is None:
        # `mlflow run` created the run: resume it (and give it our readable name).
        with mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"], run_name=name, tags=all_tags) as run:
            if params:
                log_params(params)
            yield run
        return
    nested = parent_run_id is None and mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id, nested=nested, tags=all_tags) as run:
        if params:
            log_params(params)
        yield run


class RunOutcome:
    """How a `child_run` ended; set `status` to override what the exit says (e.g. KILLED for a pruned trial)."""

    status: str | None = None


@contextlib.contextmanager
def child_run(
    name: str,
    stage: str,
    parent_run_id: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[tuple[mlflow.ActiveRun, RunOutcome]]:
    """A run nested under `parent_run_id`, active in this thread, ended FINISHED, or FAILED on an exception
    (unless `outcome.status` says otherwise). The parent may be finished already (a resumed study):
    nesting is the `mlflow.parentRunId` tag, which MLflow sets from `parent_run_id`."""
    outcome = RunOutcome()
    all_tags = {**standard_tags(stage, params), **(tags or {})}
    run = mlflow.start_run(run_name=name, parent_run_id=parent_run_id, tags=all_tags)
    try:
        if params:
            log_params(params)
        yield run, outcome
    except BaseException:
        mlflow.end_run(outcome.status or "FAILED")
        raise
    mlflow.end_run(outcome.status or "FINISHED")


# --- parent runs of members ----------------------------------------------------------------------


def member_parent(model: str, run_params: Mapping[str, Any], experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The parent run `<model>` of members trained with the same params (but the seed) and data."""
    shared = {k: v for k, v in run_params.items() if k != "seed"}
    group = params_hash(shared | {"data": data_hash()})
    exp_id = setup(experiment)
    found = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.kind = 'parent' and tags.group = '{group}'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    tags = {**standard_tags("train"), "kind": "parent", "group": group, "model": model}
    run = client.create_run(exp_id, run_name=model, tags=tags)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in shared.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def update_parent(parent_id: str, metric: str) -> None:
    """Mean and std over the parent's finished members of every final `metric` (best_<metric>, <metric>_<split>...)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
    )
    cols = [c for c in children.columns if c.startswith(f"metrics.best_{metric}") or c.startswith(f"metrics.{metric}_")]
    for col in cols:
        values = children[col].dropna().to_numpy()
        key = col.removeprefix("metrics.").removeprefix("best_")
        client.log_metric(parent_id, f"{key}_mean", float(values.mean()))
        client.log_metric(parent_id, f"{key}_std", float(values.std()))
    client.log_metric(parent_id, "members", len(children))


# --- the registered model's champion alias ----------------------------------------------------------


def current_champion(client, name: str, alias: str, score_tag: str) -> tuple[str, float] | None:
    """(version, its `score_tag` value) of the version holding the alias, or None."""
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return str(mv.version), float(mv.tags.get(score_tag, "-inf"))


def promote_if_better(client, name: str, alias: str, new_version: str, score: float, score_tag: str) -> dict:
    """Move the alias to `new_version` only if `score` beats the current holder's `score_tag`; return the decision."""
    current = current_champion(client, name, alias, score_tag)
    moved = current is None or score > current[1]
    if moved:
        client.set_registered_model_alias(name, alias, new_version)
    decision = {
        "previous_champion": None if current is None else {"version": current[0], score_tag: current[1]},
        "moved": moved,
        "champion": new_version if moved else current[0],
    }
    why = ("first version" if current is None else
           f"{score:.6f} {'>' if moved else '<='} v{current[0]}'s {current[1]:.6f}")
    client.set_model_version_tag(name, new_version, "champion_decision", f"{'promoted' if moved else 'not promoted'}: {why}")
    return decision


# --- shipping code and models --------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).parent
REQUIREMENTS = ("torch", "transformers", "lightning", "lightgbm", "faiss-cpu", "numpy", "pandas", "pyarrow", "scipy",
                "pyyaml", "tqdm", "mlflow")


def pip_requirements() -> list[str]:
    """Pinned to what is installed (explicit: MLflow's inference would load the model in a subprocess)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def package_copy(dest: Path) -> Path:
    """A copy of the mmrecall package (no caches): the `code_paths` of a logged pyfunc."""
    code = dest / "mmrecall"
    shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__"))
    return code


# --- members as logged models ----------------------------------------------------------------------------

MEMBER_MODEL_TYPE = "mmrecall-member"
CHECKPOINT_FILE = "model.pt"  # inside the logged model: artifacts/model.pt


@dataclass
class LoggedMember:
    """Where a member lives in the tracking store: its training run and its logged model."""

    member: str
    run_id: str
    model_id: str

    def ids(self) -> dict[str, str]:
        return {"run_id": self.run_id, "model_id": self.model_id}


def member_tags(member: str) -> dict[str, str]:
    """A member's logged-model tags: its name and the data it was trained on (to filter the Models view by)."""
    return {"member": member, "data_md5": data_hash() or "unknown"}


def _store() -> str:
    return redact(mlflow.get_tracking_uri())


def _member_model_of(member: str, run_id: str) -> str:
    """The logged model a member run produced (the newest, if several)."""
    run = mlflow.MlflowClient().get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise MissingLoggedMemberError(
            f"member {member}: its run {run_id} has no logged model (no logged checkpoint) in {_store()}; "
            "retrain it with this version of mmrecall")
    return outputs[-1].model_id


def find_member(member: str, experiment: str = DEFAULT_EXPERIMENT, recorded: Mapping[str, str] | None = None) -> LoggedMember:
    """A member's run and logged model in the tracking store.

    `recorded`: the ids its training wrote into metrics/train/<member>.json (run_id, model_id), if any;
    without them, the newest finished member run of that name on the same data (data.dvc hash).
    """
    exp_id = setup(experiment)
    client = mlflow.MlflowClient()
    if recorded and recorded.get("model_id"):
        run_id, model_id = recorded.get("run_id", "unknown"), recorded["model_id"]
        try:
            client.get_logged_model(model_id)
        except MlflowException as e:
            raise MissingLoggedMemberError(
                f"member {member}: its logged model {model_id} (run {run_id}, recorded in metrics/train/{member}.json) "
                f"is not in {_store()}") from e
        return LoggedMember(member, run_id, model_id)
    data = data_hash() or "unknown"
    runs = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=(f"tags.mlflow.runName = '{member}' and tags.kind = 'member' and tags.data_md5 = '{data}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise MissingLoggedMemberError(
            f"member {member}: no finished run {member!r} on this data (data_md5 {data}) in experiment {experiment!r} "
            f"of {_store()}; train it against this tracking store (mmrecall train)")
    run_id = runs[0].info.run_id
    return LoggedMember(member, run_id, _member_model_of(member, run_id))


def log_member_model(member: str, code: Path, artifacts: Mapping[str, str], signature, params: Mapping[str, Any],
                     model_config: Mapping[str, Any]) -> str:
    """Log the active member run's checkpoint as a logged model (a pyfunc, models-from-code `code` with the
    mmrecall package), named after the member and tagged to be found again; returns its model id."""
    with tempfile.TemporaryDirectory(prefix="mmrecall-member-") as tmp, warnings.catch_warnings():
        # The signature is given; an input example would make MLflow load and run the member while logging it.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=member,
            python_model=str(code),
            artifacts=dict(artifacts),
            code_paths=[str(package_copy(Path(tmp)))],
            signature=signature,
            pip_requirements=pip_requirements(),
            model_config=dict(model_config),
            params={k: "" if v is None else str(v)[:6000] for k, v in params.items()},
            tags=member_tags(member),
            model_type=MEMBER_MODEL_TYPE,
        )
    return info.model_id


def download_checkpoint(found: LoggedMember, dest: Path) -> Path:
    """The member's model.pt from its logged model, into folder `dest`."""
    model = mlflow.MlflowClient().get_logged_model(found.model_id)
    uri = f"{model.artifact_location.rstrip('/')}/artifacts/{CHECKPOINT_FILE}"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except (MlflowException, OSError) as e:
        raise MissingLoggedMemberError(
            f"member {found.member}: the checkpoint of its logged model {found.model_id} (run {found.run_id}) "
            f"is missing from {_store()} ({' '.join(str(e).split())[:300]})") from e
