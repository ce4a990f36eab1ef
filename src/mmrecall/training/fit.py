"""Fitting one member (model x seed), in named steps that the train stage and the tuning study share.

    setup = build_data("mcan", 1, params)                     # seeds, train data + hard negatives, the model
    trainer, best = build_trainer(setup, ckpt_dir)            # Lightning Trainer, best-checkpoint callback
    seconds = train(setup, trainer)                           # valid NDCG@5 every eval_every steps
    best_step = load_best(setup, best)                        # the best checkpoint's weights back in the model
    report = write_member_outputs(setup, params, best_step)   # score tables, fused vectors, model.pt
    result = log_member(setup, params, report, best_step, seconds)  # metrics + the logged model

`fit_member` runs them all inside the member's MLflow run (what `mmrecall train` does); the tuning study
runs the first three only. A model with no optimizer steps (`trainable` False: neighbour_words) is fitted
by `build_data` (its memory of train images) and goes straight to its outputs and run, with no Trainer.

- Data: train rows grouped by cleaned query text; the 1st place's TF-IDF similar-query hard negatives
  (pools from the `pools` stage, padded with random queries from the member's seed), re-drawn every "epoch" (= `eval_every` steps) from a seed that depends only on (seed, epoch); the
  two-tower (the solo team's in-batch loss) and the word detectors (their multi-label loss) train on positive
  pairs, a share of each of their batches
  (`in_batch_neighbours`) being rows of TF-IDF pool neighbours of the other rows: hard in-batch negatives.
- Lightning Trainer (cpu by default; devices / strategy / precision from params). Valid NDCG@5 every
  `eval_every` steps; the best checkpoint by valid NDCG@5 is kept. An interrupted run resumes from its
  last checkpoint in checkpoints/<member>/ (kept outside DVC's outs, which DVC deletes before a stage
  runs) when it was written with the same params and data.
- Outputs: models/<model>/seed<k>/model.pt (ranking/members.py), outputs/<member>/ (ranking/outputs.py).
- MLflow: run `<model>-seed<k>` nested under a parent run `<model>` that carries mean and std of NDCG@5
  over the finished seeds; loss, lr and ndcg_at_5 as step series. model.pt is logged once, as the run's
  logged model `<model>-seed<k>` (a pyfunc scoring a candidate table: ranking/member_model.py) with the
  member's params and final NDCG@5 metrics, so the experiment's Models view lists the members and
  `mmrecall register` can assemble them from any clone; the result (metrics/train/<member>.json) records
  its `logged_model` ids. Only global rank 0 logs; the other DDP ranks train and return {}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from .. import tracking
from ..config import Params, TrainParams, flatten, member_name, to_dict
from ..console import show_bars
from ..data.batching import EvalBatches, TrainData
from ..data.store import FeatureStore
from ..errors import MissingInputError
from ..models.backbone import backbone_path, load_tokenizer
from ..models.registry import MODELS, build_model, model_config
from ..ranking import members, outputs
from ..ranking.evaluation import eval_stores, flat_metrics, model_report
from ..ranking.metrics import METRIC
from ..ranking.ranker import MEMBER_CODE, SIGNATURE
from .module import MemberDataModule, StopAfter, TrainingModule

log = logging.getLogger(__name__)


@dataclass
class TrainSetup:
    """Everything one member's training needs, built once by `build_data`."""

    model_name: str  # mcan, visualbert, two_tower, word_detector
    seed: int
    train: TrainParams  # params.train with the model's overrides applied
    config: object  # the model's config dataclass
    run_params: dict  # what the member's MLflow run logs; its hash fingerprints checkpoints
    stores: dict[str, FeatureStore]  # the evaluation splits
    eval_batches: dict[str, EvalBatches]  # tokenised once; valid is scored every eval_every steps
    module: TrainingModule
    datamodule: MemberDataModule

    @property
    def member(self) -> str:
        return member_name(self.model_name, self.seed)

    @property
    def model(self) -> torch.nn.Module:
        return self.module.model


def trainable(name: str) -> bool:
    """Whether model `name` learns by optimizer steps (False: fitted in one pass by `build_data`)."""
    return getattr(MODELS[name][0], "trainable", True)


def build_data(name: str, seed: int, params: Params) -> TrainSetup:
    """Seed everything, then the train data with its hard-negative sampler, the eval batches and the model."""
    tp = params.train.for_model(name)
    if not trainable(name):
        tp = dataclasses.replace(tp, steps=0)  # fitted in one pass (neighbour_words: its memory), no optimizer
    if tp.num_threads:
        torch.set_num_threads(tp.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)
    cfg = model_config(name, tp)
    run_params = {
        **flatten({"train": {k: v for k, v in to_dict(tp).items() if k not in MODELS and k not in ("models", "seeds", "overrides")}}),
        **flatten({name: dataclasses.asdict(cfg)}),
        "model": name,
        "seed": seed,
    }
    train_store = FeatureStore.open(Path(params.data.features) / "train")
    stores = eval_stores(params)
    if "valid" not in stores:
        raise MissingInputError(f"{params.data.features}/valid: no feature store (run `mmrecall prepare --split valid`)")
    tokenizer = load_tokenizer(cfg.backbone)
    pairwise = hasattr(MODELS[name][0], "in_batch_loss")  # trained on positive pairs with its own in-batch loss
    data = TrainData(train_store, tokenizer, tp, seed, pairwise=pairwise, pools=params.data.pools)
    eval_batches = {split: EvalBatches(store, tokenizer, tp.max_query_len, tp.eval_batch_size, tp.max_boxes,
                                         tp.box_select)
                    for split, store in stores.items()}
    model = build_model(name, cfg)  # after seed_everything: the same seed gives the same initial weights
    if hasattr(model, "fit_vocabulary"):  # word_detector: a detector for each frequent token of the train queries
        model.fit_vocabulary(data.tokens.ids, data.tokens.mask)
    if hasattr(model, "fit_memory"):  # neighbour_words: every train image's largest boxes and its query's words
        t0 = time.perf_counter()
        keep = model.memory_subset(len(train_store), seed)
        boxes = train_store.largest_boxes(model.cfg.boxes, keep)  # (images, boxes), -1 past an image's boxes
        image, _ = np.nonzero(boxes >= 0)
        query = data.row_query[keep[image]]
        model.fit_memory(train_store.features[boxes[boxes >= 0]], data.tokens.ids[query], data.tokens.mask[query])
        log.info("%s: remembered %d boxes of %d train images in %.1f s", member_name(name, seed), len(model.memory),
                 len(keep), time.perf_counter() - t0)
    module = TrainingModule(name, model, tp, seed, stores["valid"])
    datamodule = MemberDataModule(data, eval_batches["valid"], tp.eval_every)
    return TrainSetup(name, seed, tp, cfg, run_params, stores, eval_batches, module, datamodule)


class LogEvaluations(Callback):
    """One log line per evaluation: step / steps, valid NDCG@5, elapsed and estimated time left."""

    def __init__(self, member: str, steps: int):
        self.member, self.steps, self.started = member, steps, time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step, elapsed = trainer.global_step, time.perf_counter() - self.started
        left = elapsed / max(step, 1) * (self.steps - step)
        log.info("%s: step %d/%d, valid %s %.4f, %.0f s elapsed, ~%.0f s left", self.member, step, self.steps, METRIC,
                 float(trainer.callback_metrics[METRIC]), elapsed, left)


def checkpoint_dir(setup: TrainSetup, resume: bool = True, root: str | Path = "checkpoints") -> Path:
    """checkpoints/<member>/, emptied unless it holds checkpoints of the same params and data (then resumable)."""
    fingerprint = tracking.params_hash({**setup.run_params, "data": tracking.data_hash()})
    folder = Path(root) / setup.member
    marker = folder / "params_hash"
    if folder.exists() and (not resume or not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(folder)  # stale: written with other params or data
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return folder


def build_trainer(setup: TrainSetup, ckpt_dir: Path, progress: bool = True, callbacks: list[Callback] | None = None,
                  stop_after: int | None = None) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Lightning Trainer of a member and its best-checkpoint callback (by valid NDCG@5)."""
    tp = setup.train
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=METRIC, mode="max", save_top_k=1, save_last=True,
                           save_on_train_epoch_end=True)  # an epoch boundary: resumes exactly
    callbacks = [best, LogEvaluations(setup.member, tp.steps), *(callbacks or [])]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
    if tp.patience:  # checked after every evaluation; the best checkpoint is what the member keeps anyway
        callbacks.append(EarlyStopping(monitor=METRIC, mode="max", patience=tp.patience, check_on_train_epoch_end=False))
    trainer = L.Trainer(
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy=tp.strategy,
        precision=tp.precision,
        max_steps=tp.steps,
        max_epochs=-1,  # max_steps ends the run: a resumed run recounts epochs and would stop one early
        limit_train_batches=tp.eval_every,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=show_bars(progress),
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(ckpt_dir),
    )
    return trainer, best


# Warnings of Lightning that say nothing about the run: torch's pytree deprecation raised inside Lightning's own
# code, a note on multi-worker loading (batches are built in-process), both repeated at every evaluation period,
# and "Checkpoint directory ... exists and is not empty" (checkpoint_dir keeps its params_hash marker there).
QUIET_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)", r"Your `IterableDataset` has `__len__` defined",
                     r"Checkpoint directory .* exists and is not empty")


def train(setup: TrainSetup, trainer: L.Trainer, resume_from: Path | None = None) -> float:
    """Run the training (from `resume_from`, a last.ckpt, if given); returns the wall time in seconds."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(setup.module, datamodule=setup.datamodule, ckpt_path=str(resume_from) if resume_from else None)
    return time.perf_counter() - started


def load_best(setup: TrainSetup, best: ModelCheckpoint) -> int:
    """Load the best checkpoint's weights into the model; returns its step."""
    blob = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    setup.model.load_state_dict({k.removeprefix("model."): v for k, v in blob["state_dict"].items()})
    return int(blob["global_step"])


def write_member_outputs(setup: TrainSetup, params: Params, best_step: int) -> dict:
    """Score every evaluation split (outputs/<member>/), save models/<model>/seed<k>/model.pt; returns the NDCG@5 report."""
    tables, tp = {}, setup.train
    device = members.scoring_device(tp.accelerator)  # Lightning hands the model back on the CPU after fit
    for split, batches in setup.eval_batches.items():
        batches = batches.with_batch_size(members.eval_batch_size(batches.batch_size, device))
        tables[split], fused = members.score_batches(setup.model, batches, device, tp.precision)
        outputs.write(params.data.outputs, setup.member, split, tables[split], fused)
    members.save(members.checkpoint_path(setup.member), setup.model_name, setup.config, setup.model,
                 {"seed": setup.seed, "best_step": best_step, "train": to_dict(setup.train)})
    return model_report(tables, params, setup.stores)


def log_checkpoint(member: str, backbone: str, box_cap: int, run_params: dict) -> str:
    """models/<model>/seed<k>/model.pt as the logged model of the active member run; returns its id."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmrecall-backbone-") as tmp:
        artifacts = {"checkpoint": str(members.checkpoint_path(member)),
                     "backbone": str(members.copy_tokenizer_files(backbone_path(backbone), Path(tmp)))}
        model_id = tracking.log_member_model(member, MEMBER_CODE, artifacts, SIGNATURE, run_params, {"box_cap": box_cap})
    log.info("%s: logged model %s in %.1f s", member, model_id, time.perf_counter() - t0)
    return model_id


def log_member(setup: TrainSetup, params: Params, report: dict, best_step: int, seconds: float) -> dict:
    """Log the member's checkpoint as a logged model of its (active) MLflow run, and its final metrics to both;
    returns the member's result, with the run and logged-model ids under `logged_model`."""
    samples_per_s = setup.module.samples_seen / max(seconds, 1e-9)
    model_id = log_checkpoint(setup.member, setup.config.backbone, params.prepare.box_cap, setup.run_params)
    metrics = flat_metrics(report)
    mlflow.log_metrics({f"best_{k}" if k == METRIC else k: v for k, v in metrics.items()}, model_id=model_id)
    mlflow.log_metrics({"best_step": best_step, "train_seconds": seconds, "samples_per_s": samples_per_s})
    run_id = mlflow.active_run().info.run_id
    return {**report, "best_step": best_step, "steps": setup.train.steps, "steps_run": setup.module.global_step,
            "train_seconds": round(seconds, 1), "samples_per_s": round(samples_per_s, 1), "mlflow_run_id": run_id,
            "logged_model": {"run_id": run_id, "model_id": model_id}}


def is_global_rank_zero() -> bool:
    """Before the Trainer exists: Lightning's DDP launcher starts ranks > 0 with LOCAL_RANK / NODE_RANK set
    (torchrun and SLURM set RANK)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def fit_member(name: str, seed: int, params: Params, progress: bool = True, stop_after: int | None = None,
               resume: bool = True) -> dict:
    """Train one member and write its outputs, inside its MLflow run; returns its result ({} on DDP ranks > 0)."""
    started = time.perf_counter()
    setup = build_data(name, seed, params)
    if not trainable(name):
        return _fit_untrained(setup, params, time.perf_counter() - started)
    ckpt_dir = checkpoint_dir(setup, resume)
    last = ckpt_dir / "last.ckpt"
    trainer, best = build_trainer(setup, ckpt_dir, progress, stop_after=stop_after)
    run, parent_id = member_run(setup, params)
    with run:
        if resume and last.exists():
            log.info("%s: resuming from %s", setup.member, last)
        seconds = train(setup, trainer, last if resume and last.exists() else None)
        if not trainer.is_global_zero:
            return {}
        best_step = load_best(setup, best)
        report = write_member_outputs(setup, params, best_step)
        result = log_member(setup, params, report, best_step, seconds)
    tracking.update_parent(parent_id, METRIC)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: nothing to resume
    return result


def member_run(setup: TrainSetup, params: Params) -> tuple[contextlib.AbstractContextManager, str | None]:
    """(the member's MLflow run under its model's parent run, the parent's id) on global rank 0; elsewhere no run:
    the other DDP ranks re-run `fit_member` and must not log runs."""
    if not is_global_rank_zero():
        return contextlib.nullcontext(), None
    parent_id = tracking.member_parent(setup.model_name, setup.run_params, params.tracking.experiment)
    tags = {"model": setup.model_name, "seed": str(setup.seed), "mlflow.parentRunId": parent_id, "kind": "member"}
    return tracking.start_run(setup.member, stage="train", params=setup.run_params,
                              experiment=params.tracking.experiment, tags=tags), parent_id


def _fit_untrained(setup: TrainSetup, params: Params, seconds: float) -> dict:
    """A member fitted by `build_data` alone (no optimizer steps): its outputs and MLflow run, as `fit_member`'s.
    Every DDP rank would fit the same member, so only global rank 0 does anything."""
    if not is_global_rank_zero():
        return {}
    run, parent_id = member_run(setup, params)
    with run:
        report = write_member_outputs(setup, params, 0)
        result = log_member(setup, params, report, 0, seconds)
    tracking.update_parent(parent_id, METRIC)
    return result
