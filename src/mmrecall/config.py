"""One config path: `params.yaml` -> typed dataclasses, one section per pipeline stage.

The dataclasses hold the defaults (the CPU settings of `make repro`); params.yaml restates them so that
DVC can track every value, and a test keeps the two equal. Every stage calls `load_params()` once and
reads its own section. Unknown keys and wrong types are an error (a typo must not silently fall back to
a default), and so is a missing params.yaml: `load_params()` looks in the current folder and its parents.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import UserError

PARAMS_FILE = "params.yaml"
MODEL_SECTIONS = ("mcan", "visualbert", "two_tower", "word_detector", "neighbour_words")  # train.<model>: each model's architecture


@dataclass
class DataParams:
    """Where things live. Paths are relative to the repository root."""

    root: str = "data"  # the organisers' layout, tracked by data.dvc
    features: str = "features"  # prepare outputs, one folder per split
    pools: str = "pools"  # the pools stage's output: similar queries of features/train (hard negatives)
    outputs: str = "outputs"  # score tables, one folder per model
    metrics: str = "metrics"  # small JSON metrics files (DVC metrics, cache: false)
    splits: list[str] = field(default_factory=lambda: ["train", "valid", "testA"])
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "testA"])


@dataclass
class SynthParams:
    """Synthetic data in the official format (sizes and difficulty)."""

    seed: int = 2020
    train_queries: int = 3000
    rows_per_train_query: float = 2.3  # mean positives per train query (Poisson + 1)
    valid_queries: int = 120
    test_queries: int = 120
    candidates: int = 30
    answers: int = 6
    junk_prefix_rate: float = 0.04  # valid/test queries starting with "is", "'s", "and"
    long_image_rate: float = 0.002  # images with > 40 boxes
    neg_pool_per_query: float = 4.0  # size of the shared (recurring) negative pool per eval query
    fresh_negative_rate: float = 0.37  # mean share of negatives made for one query only (occur once)
    latent_dim: int = 48
    feature_noise: float = 0.35
    attribute_groups: int = 6  # categories sharing how an attribute looks (44 = every category its own look)
    near_miss_rate: float = 0.0  # extra share of each eval query's negatives: same category, one named value wrong
    main_first_rate: float = 0.6  # images whose product box comes first in the detector's list
    clutter_correlation: float = 0.0  # how much clutter boxes resemble the product (0 = independent)
    main_large_rate: float = 1.0  # images showing the product large; the others show it small, beside a large clutter box


@dataclass
class PrepareParams:
    box_cap: int = 30  # boxes kept per image (1st place: 30), in file order
    max_boxes_filter: int = 0  # solo team: drop TRAIN rows with more boxes than this (40); 0 = off
    chunk_bytes: int = 8 << 20  # bytes of TSV per worker task (below glibc's mmap threshold, see BENCHMARKS.md)
    workers: int = 2  # processes decoding one file (0 or 1 = in-process)


@dataclass
class PoolsParams:
    """TF-IDF similar-query pools of the train store (data/negatives.py), built once for every member."""

    cap: int = 64  # most similar queries kept per query: pools hold min(3 x largest group - 1, cap)
    shard_queries: int = 50_000  # similar queries are searched within shards of this many queries


@dataclass
class BaselineParams:
    name: str = "wordproto"
    min_word_count: int = 2  # words seen in fewer train rows get no prototype
    chunk_rows: int = 4096


@dataclass
class ScheduleParams:
    """The 1st place's sine wave with linear warmup (training/losses.py)."""

    warmup_ratio: float = 0.1
    cycles: int = 6
    amplitude: float = 0.3


BOX_SELECT = ("largest", "first")  # train.box_select: which boxes an image over max_boxes keeps (data/batching.py)


@dataclass
class TrainParams:
    """The neural rankers: one DVC matrix member per (model, seed)."""

    models: list[str] = field(default_factory=lambda: ["word_detector", "neighbour_words"])  # mcan: see BENCHMARKS.md
    seeds: list[int] = field(default_factory=lambda: [1])  # CPU default: one long member per model beat two short ones
    steps: int = 400  # optimizer steps per member (mcan's on CPU: 400 or 1000 give the same re-ranker, BENCHMARKS.md)
    eval_every: int = 100  # valid NDCG@5 (and a checkpoint) every N steps
    patience: int = 0  # stop after this many evaluations without a better valid NDCG@5 (0 = run all steps)
    batch_size: int = 128  # triples (query, positive, negative); pairs for the in-batch losses
    negatives: int = 10  # hard negatives per positive in the TF-IDF pool sampler (1st place: 10)
    random_negatives: float = 0.5  # share of those negatives drawn from any other query (1st place: 0)
    swap_negatives: float = 0.25  # share of negatives: the positive image under its query with one word swapped (1st place: 0)
    in_batch_neighbours: float = 0.25  # two-tower, word detectors: share of a batch drawn from the pools of the other rows
    lr: float = 1.0e-3
    backbone_lr: float | None = None  # lr of the pretrained backbone weights (None = lr)
    weight_decay: float = 0.01
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    max_query_len: int = 16
    max_boxes: int = 10  # boxes per image given to the models (<= prepare.box_cap)
    box_select: str = "largest"  # over max_boxes: the largest boxes (by area), or the first in file order (1st place)
    eval_batch_size: int = 256
    accelerator: str = "cpu"  # Lightning: cpu, gpu, auto
    devices: int = 1  # processes per node with strategy ddp
    num_nodes: int = 1  # machines (DDP across nodes: MASTER_ADDR, MASTER_PORT, NODE_RANK on each; see docs/scaling-out.md)
    strategy: str = "auto"  # ddp for several GPUs / nodes
    precision: str = "32-true"  # 16-mixed / bf16-mixed on GPUs
    num_threads: int = 0  # torch CPU threads (0 = torch's default)
    mcan: dict = field(default_factory=dict)  # MCANConfig fields (models/mcan.py holds their defaults)
    visualbert: dict = field(default_factory=dict)  # VisualBERTConfig fields
    two_tower: dict = field(default_factory=dict)  # TwoTowerConfig fields
    word_detector: dict = field(default_factory=dict)  # WordDetectorConfig fields
    neighbour_words: dict = field(default_factory=dict)  # NeighbourWordsConfig fields (no optimizer steps)
    overrides: dict = field(default_factory=lambda: {  # per model: {model: {lr: .., steps: .., ...}}
        "visualbert": {"lr": 0.002, "backbone_lr": 0.0005, "batch_size": 64, "steps": 700, "eval_every": 100,
                       "focal_gamma": 0.0, "max_boxes": 5},
        "two_tower": {"lr": 0.0005, "steps": 400, "eval_every": 100, "max_boxes": 5, "swap_negatives": 0.0},
        "word_detector": {"steps": 600, "eval_every": 100, "swap_negatives": 0.0},
    })
    best_params: bool = False  # apply the tuned values (tune.output, written by `mmrecall tune`) to overrides.<tune model>

    def __post_init__(self):
        if self.box_select not in BOX_SELECT:
            raise ParamsError(f"params.yaml train.box_select: expected one of {BOX_SELECT}, got {self.box_select!r}")

    @property
    def effective_backbone_lr(self) -> float:
        """The lr of the pretrained backbone weights: backbone_lr, or lr when it is null."""
        return self.backbone_lr or self.lr

    def for_model(self, name: str) -> "TrainParams":
        """These params with `overrides[name]` applied (e.g. a lower lr for a pretrained encoder)."""
        extra = dict(self.overrides.get(name) or {})
        allowed = {f.name for f in fields(self)} - {"models", "seeds", "overrides", "best_params", *MODEL_SECTIONS}
        if unknown := sorted(set(extra) - allowed):
            raise ParamsError(f"params.yaml train.overrides.{name}: unknown key(s) {unknown}")
        if "schedule" in extra:
            extra["schedule"] = replace(self.schedule, **extra["schedule"])
        return replace(self, **extra, overrides={})


@dataclass
class PostprocessParams:
    frequency_filter: bool = True  # 1st place: keep candidates occurring once over the eval files
    exclusivity: bool = False  # 2nd place: a product belongs to its argmax query only
    exclusivity_threshold: float = 0.92


@dataclass
class EvaluateParams:
    models: list[str] = field(default_factory=lambda: ["wordproto"])
    train_members: bool = True  # also every train member <model>-seed<k> of train.models x train.seeds
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)


@dataclass
class PrunerParams:
    kind: str = "median"  # median (stop a trial below the median of earlier trials at the same step) | none
    startup_trials: int = 2  # finished trials before the pruner stops anything
    warmup_evals: int = 1  # evaluations of a trial before it can be stopped


# Tunable train keys; `amplitude` is train.schedule.amplitude.
TUNABLE = ("focal_alpha", "focal_gamma", "amplitude", "lr", "swap_negatives")


@dataclass
class TuneParams:
    """The Optuna study over a short training of one model (`mmrecall tune`)."""

    model: str = "mcan"
    seed: int = 1  # training seed of every trial
    n_trials: int = 12  # finished (complete + pruned) trials the study should reach; a resumed study runs the rest
    steps: int = 200  # optimizer steps per trial
    eval_every: int = 50  # valid NDCG@5 is reported to the pruner every N steps
    study_name: str | None = None  # None: <model>-<hash of the setup>; the same setup resumes its study
    storage: str = "optuna-journal.log"  # a journal file (several local workers), or an RDB URL (several machines)
    sampler_seed: int = 2020
    pruner: PrunerParams = field(default_factory=PrunerParams)
    space: dict = field(default_factory=lambda: {
        "focal_alpha": {"low": 0.25, "high": 1.0},
        "focal_gamma": {"low": 0.0, "high": 3.0},
        "amplitude": {"low": 0.0, "high": 0.5},
    })  # {key in TUNABLE: {low, high, log}}
    output: str = "best_params.yaml"  # the best trial's values; train.best_params: true applies them

    def ranges(self) -> dict[str, tuple[float, float, bool]]:
        """The search space as {key: (low, high, log)}, checked."""
        out = {}
        for key, spec in (self.space or {}).items():
            if key not in TUNABLE:
                raise ParamsError(f"tune.space.{key}: not tunable; tunable: {list(TUNABLE)}")
            spec = spec or {}
            if unknown := sorted(set(spec) - {"low", "high", "log"}):
                raise ParamsError(f"tune.space.{key}: unknown key(s) {unknown}; known: low, high, log")
            low, high = float(spec["low"]), float(spec["high"])
            if not low < high or (spec.get("log") and low <= 0):
                raise ParamsError(f"tune.space.{key}: need low < high (and low > 0 with log: true), got {spec}")
            out[key] = (low, high, bool(spec.get("log", False)))
        if not out:
            raise ParamsError("tune.space is empty")
        return out


@dataclass
class SmoothParams:
    """KNN smoothing of box features within a query's pool (the solo team's inference trick)."""

    k: int = 2  # nearest OTHER boxes mixed in
    weights: list[float] = field(default_factory=lambda: [0.7, 0.2, 0.1])  # self first; sums to 1
    members: list[str] | None = None  # re-scored: <model> (x train.seeds) or <model>-seed<k>; None = all


@dataclass
class LGBMParams:
    """LightGBM settings of the re-ranker (lgb.train parameters)."""

    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    num_boost_round: int = 1000
    early_stopping_rounds: int = 50
    num_threads: int = 1  # tiny data: threads only add OpenMP waits on a shared 2-core box


# What the submission can rank by (rerank.submission); in this order, the first wins a tie of valid NDCG@5.
SUBMISSION_RULES = ("rerank_pp", "rerank", "ensemble_pp", "ensemble")
SUBMISSION_SETTINGS = ("auto", *SUBMISSION_RULES)
# What a registered model or re-ranker folder saved before rerank.submission ranks by.
RULE_BEFORE_SUBMISSION = "rerank, then evaluate.postprocess"


@dataclass
class RerankParams:
    """LightGBM re-ranker on valid, query-grouped K-fold, and the ensemble of members (the 1st place's stage 2)."""

    members: list[str] | None = None  # feature members: <model> (x train.seeds) or <model>-seed<k>; None = all
    smoothing: bool = False  # feed the members smoothed boxes (outputs/smoothed/<member>, the smooth stage)
    smoothed_views: list[str] | None = field(default_factory=lambda: ["word_detector"])  # also fed smoothed, as
    # <member>-knn: <model> (x train.seeds) or <model>-seed<k>; None = every member, [] = none
    box_views: list[str] | None = field(default_factory=lambda: ["word_detector", "neighbour_words"])  # also joined with the raw
    # ROI feature of each image's largest box as their fused vector, as <member>-box; None = every member, [] = none
    objective: str = "binary"  # binary | lambdarank
    folds: int = 5  # query-grouped folds over valid
    repeats: int = 3  # rounds of K-fold, each with its own folds and seed (folds x repeats boosters, averaged)
    seed: int = 0  # fold assignment and LightGBM seed
    early_stopping_share: float = 0.2  # share of each fold's training queries held out for early stopping
    pca_dims: int = 8  # components of each member's fused vector (0 = scores only)
    consensus: list[int] = field(default_factory=lambda: [1, 3, 5, 10])  # k's of the consensus features ([] = none)
    consensus_rounds: int = 2  # later rounds take the k best by score + the previous round's consensus at 5
    density: list[int] = field(default_factory=lambda: [3, 5])  # k's of the density features ([] = none)
    learn_weights: bool = True  # ensemble weights fitted on valid (out-of-fold for valid's own rows)
    ensemble_weights: dict = field(default_factory=dict)  # learn_weights false: member -> weight (missing = 1)
    lgbm: LGBMParams = field(default_factory=LGBMParams)
    submission: str = "auto"  # what the submission ranks by: rerank | rerank_pp | ensemble | ensemble_pp (_pp: after
    # evaluate.postprocess), or auto: the one with the best valid NDCG@5 (the re-ranker's and ensemble's out of fold)

    def __post_init__(self):
        if self.submission not in SUBMISSION_SETTINGS:
            raise ParamsError(f"params.yaml rerank.submission: {self.submission!r}, expected one of "
                              f"{', '.join(SUBMISSION_SETTINGS)}")
        if self.repeats < 1:
            raise ParamsError(f"params.yaml rerank.repeats: expected at least 1 round of K-fold, got {self.repeats}")
        if isinstance(self.consensus_rounds, bool) or not isinstance(self.consensus_rounds, int) or self.consensus_rounds < 1:
            raise ParamsError(f"params.yaml rerank.consensus_rounds: expected a whole number of rounds, at least 1, "
                              f"got {self.consensus_rounds!r}")
        for key in ("consensus", "density"):
            ks = getattr(self, key)
            if not isinstance(ks, list) or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
                raise ParamsError(f"params.yaml rerank.{key}: expected a list of positive integers (how many other "
                                  f"candidates a candidate is compared with), got {ks!r}")


@dataclass
class RegisterParams:
    name: str = "mmrecall-ranker"  # registered model name
    alias: str = "champion"  # moves only to a version with a better honest valid NDCG@5


@dataclass
class PredictParams:
    model_uri: str = "models:/mmrecall-ranker@champion"
    splits: list[str] = field(default_factory=lambda: ["testA", "testB"])  # those with data/<split>/<split>.tsv
    output: str = "submission.csv"  # the first split's file; others get submission_<split>.csv


@dataclass
class TrackingParams:
    experiment: str = "mmrecall"


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    synth: SynthParams = field(default_factory=SynthParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    pools: PoolsParams = field(default_factory=PoolsParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tune: TuneParams = field(default_factory=TuneParams)
    smooth: SmoothParams = field(default_factory=SmoothParams)
    rerank: RerankParams = field(default_factory=RerankParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    predict: PredictParams = field(default_factory=PredictParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


def member_name(model: str, seed: int) -> str:
    """A trained (model, seed): `<model>-seed<k>`, its output folder, checkpoint and MLflow run name."""
    return f"{model}-seed{seed}"


def member_names(params: Params, chosen: list[str] | None = None) -> list[str]:
    """Members named by `chosen`: `<model>-seed<k>` as is, a bare model name = that model x train.seeds;
    None or empty = every train member (train.models x train.seeds)."""
    if not chosen:
        return [member_name(m, s) for m in params.train.models for s in params.train.seeds]
    out = []
    for entry in chosen:
        out += [entry] if "-seed" in entry else [member_name(entry, s) for s in params.train.seeds]
    return out


class ParamsError(UserError, ValueError):
    """params.yaml is missing, or has an unknown key or a value of the wrong type."""


def _build(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = float(value)
        elif hint in (int, float, str, bool) and not isinstance(value, hint):
            raise ParamsError(f"{where}.{name}: expected {hint.__name__}, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def find_params_file(start: Path | None = None) -> Path | None:
    """params.yaml in `start` (default: the current folder) or the nearest parent folder holding one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder / PARAMS_FILE
    return None


def repo_root() -> Path:
    """The project root: $DVC_ROOT inside DVC runs, else the nearest folder holding params.yaml (else cwd)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    found = find_params_file()
    return found.parent if found else Path.cwd().resolve()


# The folder the command was started in, when the CLI moved to the repository root (see `user_path`).
invoked_from: Path | None = None


def user_path(text: str) -> Path:
    """A path typed on the command line: relative to the folder the command was started in, even after
    the CLI moved to the repository root to run a stage there."""
    path = Path(text).expanduser()
    return path if path.is_absolute() or invoked_from is None else invoked_from / path


def load_params(path: str | os.PathLike | None = None, apply_best: bool = True) -> Params:
    """Read params.yaml into `Params`: `path`, else ./params.yaml or the nearest parent folder's.

    A missing file is a `ParamsError` (never silently the code defaults). With `train.best_params: true`
    the tuned values of `tune.output` (next to params.yaml) are applied to `train.overrides.<tuned model>`,
    so every stage sees the same train params (`apply_best=False`: the file's own values, for the study).
    """
    if path is None:
        found = find_params_file()
        if found is None:
            raise ParamsError(f"no {PARAMS_FILE} in {Path.cwd()} or any folder above it: run mmrecall from the "
                              "repository (or pass --params FILE)")
        path = found
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    params = _build(Params, raw, str(path))
    if apply_best and params.train.best_params:
        params = with_best_params(params, path.parent / params.tune.output)
    return params


def with_model_values(params: Params, model: str, values: dict[str, Any]) -> Params:
    """`params` with `values` (train keys; `amplitude` = schedule.amplitude) merged into train.overrides[model].

    The tune objective and `train.best_params` both go through here, so a tuned value wins over the
    model's own override exactly as it did in the trial.
    """
    values = dict(values)
    if "amplitude" in values:
        values["schedule"] = {**values.get("schedule", {}), "amplitude": values.pop("amplitude")}
    overrides = copy.deepcopy(params.train.overrides)
    _merge(overrides.setdefault(model, {}), values)
    train = replace(params.train, overrides=overrides)
    train.for_model(model)  # unknown keys fail here, not mid-training
    return replace(params, train=train)


def with_best_params(params: Params, path: str | os.PathLike) -> Params:
    """Apply a best_params.yaml written by `mmrecall tune` (see `with_model_values`)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"train.best_params is true but {path} does not exist: run `mmrecall tune` "
                          "(or set train.best_params: false)")
    best = yaml.safe_load(path.read_text()) or {}
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict) or "model" not in best:
        raise ParamsError(f"{path}: expected `model:` and `params:` (as written by `mmrecall tune`)")
    if unknown := sorted(set(best["params"]) - set(TUNABLE)):
        raise ParamsError(f"{path}: not tunable: {unknown}; tunable: {list(TUNABLE)}")
    return with_model_values(params, best["model"], best["params"])


def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to log a section as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# --- overlays (configs/*.yaml) ------------------------------------------------------------------


# Overlay keys whose mapping replaces the one in params.yaml instead of being merged into it: a model's
# architecture and its overrides are read as a whole, so no CPU value may survive under a faithful one.
REPLACED_BY_OVERLAY = (*(("train", m) for m in MODEL_SECTIONS), ("train", "overrides", "*"))


def _replaced(path: tuple[str, ...]) -> bool:
    return any(len(path) == len(p) and all(a == b or b == "*" for a, b in zip(path, p)) for p in REPLACED_BY_OVERLAY)


def _merge(base, overlay, path: tuple[str, ...] = ()) -> None:
    """Deep-merge `overlay` into `base`, except that the mappings at REPLACED_BY_OVERLAY paths are replaced."""
    for key, value in overlay.items():
        where = (*path, str(key))
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not _replaced(where):
            _merge(base[key], value, where)
        else:
            base[key] = value


def apply_overlay(overlay: str | os.PathLike, params: str | os.PathLike = PARAMS_FILE) -> Params:
    """Merge the YAML file `overlay` into `params` (keeping both files' comments); returns the result.

    Sections merge key by key, except the model sections (train.mcan / visualbert / two_tower / word_detector / neighbour_words) and each
    train.overrides.<model>: the overlay's mapping replaces the one in params.yaml whole. The merged
    file is validated before it is written, so a bad overlay leaves params.yaml as it was.
    """
    from ruamel.yaml import YAML  # round-trip YAML (a DVC dependency): comments, order and flow style survive

    rt = YAML()
    rt.width = 4096  # keep each line as written (no re-wrapping of long flow mappings)
    with open(params) as f:
        base = rt.load(f) or {}
    with open(overlay) as f:
        extra = rt.load(f) or {}
    if not isinstance(extra, dict):
        raise ParamsError(f"{overlay}: expected a mapping of params.yaml sections")
    _merge(base, extra)
    rt.representer.add_representer(float, _represent_float)
    rt.representer.add_representer(type(None), _represent_null)
    out = io.StringIO()
    rt.dump(base, out)
    checked = _build(Params, yaml.safe_load(out.getvalue()), str(overlay))  # as PyYAML and DVC will read it
    Path(params).write_text(out.getvalue())
    return checked


def _represent_null(representer, value: None):
    """`null` as written in params.yaml (ruamel's default writes nothing after the colon)."""
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _represent_float(representer, value: float):
    """1e-05 -> 1.0e-05: YAML 1.1 readers (PyYAML) take a float without a dot for a string."""
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)
