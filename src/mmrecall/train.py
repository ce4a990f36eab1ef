"""`train`: one neural ranker member (model x seed), as a DVC matrix stage.

- Data: train rows grouped by cleaned query text; TF-IDF similar-query hard negatives (spec §3.5),
  re-drawn every "epoch" (= `eval_every` steps) from a seed that depends only on (seed, epoch);
  the two-tower trains on positive pairs with the in-batch loss (spec §4.3); a share of each of its
  batches (`in_batch_neighbours`) are rows of TF-IDF pool neighbours of the other rows: hard in-batch negatives.
- Loss and schedule: pointwise focal loss on (query, positive) and (query, negative) pairs, AdamW,
  sine wave with linear warmup (spec §3.6).
- Lightning Trainer (cpu by default; devices / strategy / precision from params). Valid NDCG@5 every
  `eval_every` steps; the best checkpoint by valid NDCG@5 is kept. An interrupted run resumes from
  its last checkpoint in checkpoints/<model>-seed<k>/ (kept outside DVC's outs, which DVC deletes
  before a stage runs) when it was written with the same params.
- Outputs: models/<model>/seed<k>/model.pt (weights + config), outputs/<model>-seed<k>/<split>.parquet
  (score tables) and <split>_fused.npy (the vectors for the re-ranker), metrics/train/<model>-seed<k>.json.
- MLflow: run `<model>-seed<k>` nested under a parent run `<model>` that carries mean and std of
  NDCG@5 over the finished seeds; loss, lr and ndcg_at_5 as step series; model.pt as an artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from . import tracking
from .backbone import load_tokenizer
from .batching import EvalBatches, QueryTokens, image_batch
from .config import Params, TrainParams, flatten, load_params, to_dict
from .evaluate import eval_stores, flat_metrics, model_report
from .losses import focal_loss_with_logits, sine_wave_scheduler
from .mcan import MCAN, MCANConfig
from .metrics import METRIC, evaluate_scores, write_metrics
from .sampler import HardNegativeSampler, build_pools, group_queries
from .store import FeatureStore
from .two_tower import TwoTower, TwoTowerConfig
from .visualbert import VisualBERT, VisualBERTConfig

MODELS = {"mcan": (MCAN, MCANConfig), "visualbert": (VisualBERT, VisualBERTConfig), "two_tower": (TwoTower, TwoTowerConfig)}


def model_config(name: str, params: TrainParams):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cls = MODELS[name][1]
    overrides = getattr(params, name)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"params.yaml train.{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**overrides)


def build_model(name: str, cfg) -> nn.Module:
    return MODELS[name][0].from_config(cfg)


def save_member(path: Path, name: str, cfg, model: nn.Module, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": name, "config": dataclasses.asdict(cfg), "state_dict": model.state_dict(), **extra}, path)


# --- data ----------------------------------------------------------------------------------------


class TrainBatches(IterableDataset):
    """`n_batches` batches of one epoch; what they hold depends only on (seed, epoch, rank)."""

    def __init__(self, data: "TrainData", epoch: int, n_batches: int, rank: int = 0):
        self.data, self.epoch, self.n_batches, self.rank = data, epoch, n_batches, rank

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        d = self.data
        rng = np.random.default_rng([d.seed, self.epoch, self.rank])
        B = d.params.batch_size
        if d.pairwise:  # two-tower: positive pairs, the batch supplies the negatives
            n_near = round(B * d.params.in_batch_neighbours)
            n_anchor = B - n_near
            anchors = np.resize(rng.permutation(len(d.store)), self.n_batches * n_anchor)  # each row once per pass
            for i in range(self.n_batches):
                a = anchors[i * n_anchor : (i + 1) * n_anchor]
                r = np.concatenate([a, d.sampler.neighbour_rows(rng, d.row_query[a[:n_near]])])
                q = d.row_query[r]
                yield {"pos": {**d.tokens.batch(q), **image_batch(d.store, r, d.params.max_boxes)}, "query": torch.from_numpy(q)}
            return
        triples = d.sampler.sample(rng, d.params.random_negatives)
        pick = np.resize(rng.permutation(len(triples.query)), self.n_batches * B)
        for i in range(self.n_batches):
            t = pick[i * B : (i + 1) * B]
            tokens = d.tokens.batch(triples.query[t])
            yield {
                "pos": {**tokens, **image_batch(d.store, triples.positive[t], d.params.max_boxes)},
                "neg": {**tokens, **image_batch(d.store, triples.negative[t], d.params.max_boxes)},
            }


class TrainData:
    """The train store grouped by cleaned query, tokenised once, with its hard-negative sampler."""

    def __init__(self, store: FeatureStore, tokenizer, params: TrainParams, seed: int, pairwise: bool):
        self.store, self.params, self.seed, self.pairwise = store, params, seed, pairwise
        if not 0.0 <= params.in_batch_neighbours <= 0.5:
            raise ValueError(f"train.in_batch_neighbours must be in [0, 0.5], got {params.in_batch_neighbours}")
        texts, self.row_query = group_queries(store.rows.query_clean.tolist())
        self.tokens = QueryTokens.build(texts, tokenizer, params.max_query_len)
        pools = build_pools(texts, np.bincount(self.row_query), np.random.default_rng(seed))
        self.sampler = HardNegativeSampler.from_row_queries(self.row_query, pools, params.negatives)


class EvalIterable(IterableDataset):
    def __init__(self, batches: EvalBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


# --- the Lightning module ---------------------------------------------------------------------


class Ranker(L.LightningModule):
    """Wraps one model: focal loss on positive/negative pairs, or the in-batch loss (two-tower)."""

    def __init__(self, name: str, model: nn.Module, params: TrainParams, seed: int, valid: FeatureStore | None = None):
        super().__init__()
        self.name, self.model, self.params, self.seed, self.valid = name, model, params, seed, valid
        self._val_logits: list[torch.Tensor] = []
        self.samples_seen = 0

    def training_step(self, batch, batch_idx):
        p = self.params
        if "neg" not in batch:
            pos = batch["pos"]
            loss = self.model.in_batch_loss(pos, batch["query"])
            self.samples_seen += len(pos["input_ids"])
        else:
            lp, ln = self.model(batch["pos"]).logits, self.model(batch["neg"]).logits
            loss = focal_loss_with_logits(lp, torch.ones_like(lp), p.focal_alpha, p.focal_gamma) + focal_loss_with_logits(
                ln, torch.zeros_like(ln), p.focal_alpha, p.focal_gamma
            )
            self.samples_seen += 2 * len(lp)
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self):
        torch.manual_seed(self.seed * 100_003 + self.current_epoch)  # dropout depends on (seed, epoch) only

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if self.trainer.is_global_zero and mlflow.active_run() and (step % 10 == 0 or step == 1):
            mlflow.log_metrics({"loss": float(outputs["loss"]), "lr": self.optimizers().param_groups[0]["lr"]}, step=step)

    def validation_step(self, batch, batch_idx):
        self._val_logits.append(self.model(batch).logits.float().cpu())

    def on_validation_epoch_end(self):
        logits = torch.cat(self._val_logits).numpy()
        self._val_logits.clear()
        rows = self.valid.rows
        table = pd.DataFrame({"query_id": rows.query_id, "product_id": rows.product_id, "score": logits})
        value = evaluate_scores(table, self.valid.answers)
        self.log(METRIC, value, prog_bar=True)
        if self.trainer.is_global_zero and mlflow.active_run():
            mlflow.log_metric(METRIC, value, step=self.global_step)

    def configure_optimizers(self):
        p = self.params
        pretrained = {id(w) for w in self.model.pretrained_parameters()}
        trainable = [w for w in self.model.parameters() if w.requires_grad]
        groups = [
            {"params": [w for w in trainable if id(w) not in pretrained], "lr": p.lr},
            {"params": [w for w in trainable if id(w) in pretrained], "lr": p.backbone_lr or p.lr},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=p.weight_decay)
        s = p.schedule
        sched = sine_wave_scheduler(opt, p.steps, s.warmup_ratio, s.cycles, s.amplitude)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopAfter(Callback):
    """Simulates a crash after `steps` optimizer steps (used to test resuming)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.steps:
            raise InterruptedError(f"stopped after {self.steps} steps (--stop-after)")


# --- one member ---------------------------------------------------------------------------------


@torch.no_grad()
def score_store(model: nn.Module, batches: EvalBatches) -> tuple[pd.DataFrame, np.ndarray]:
    """Score table (query_id, product_id, score) and the fused vectors (float16) of every row."""
    model.eval()
    logits, fused = [], []
    for batch in batches:
        out = model(batch)
        logits.append(out.logits.float().numpy())
        fused.append(out.fused.float().numpy().astype(np.float16))
    rows = batches.store.rows
    table = pd.DataFrame({"query_id": rows.query_id, "product_id": rows.product_id, "score": np.concatenate(logits)})
    return table, np.concatenate(fused)


def fit(
    name: str,
    seed: int,
    params: Params,
    progress: bool = True,
    stop_after: int | None = None,
    resume: bool = True,
    callbacks: list[Callback] | None = None,
    dry: bool = False,
) -> dict:
    """Train one member and write its outputs; returns its metrics report.

    `callbacks`: extra Lightning callbacks (the tune objective reports every evaluation to its trial).
    `dry`: train only (checkpoints in a temporary folder; no outputs, model, metrics file or MLflow run
    of its own; valid NDCG@5 still goes to the active MLflow run) and return {ndcg_at_5 (best), steps}.
    Only global rank 0 logs to MLflow; other DDP ranks train and return {}.
    """
    tp = params.train.for_model(name)
    if tp.num_threads:
        torch.set_num_threads(tp.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)
    cfg = model_config(name, tp)
    member = tracking.run_name(name, seed)
    run_params = {
        **flatten({"train": {k: v for k, v in to_dict(tp).items() if k not in MODELS and k not in ("models", "seeds", "overrides")}}),
        **flatten({name: dataclasses.asdict(cfg)}),
        "model": name,
        "seed": seed,
    }
    fingerprint = tracking.params_hash({**run_params, "data": tracking.data_hash()})
    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"{member}-")) if dry else Path("checkpoints") / member
    marker = ckpt_dir / "params_hash"
    if ckpt_dir.exists() and (not resume or not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(ckpt_dir)  # stale: written with other params or data
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    last = ckpt_dir / "last.ckpt"

    features = Path(params.data.features)
    train_store = FeatureStore.open(features / "train")
    stores = eval_stores(params)
    tokenizer = load_tokenizer(cfg.backbone)
    data = TrainData(train_store, tokenizer, tp, seed, pairwise=name == "two_tower")
    eval_batches = {  # tokenised once; valid is scored every eval_every steps
        split: EvalBatches(store, tokenizer, tp.max_query_len, tp.eval_batch_size, tp.max_boxes)
        for split, store in stores.items()
    }
    model = build_model(name, cfg)
    module = Ranker(name, model, tp, seed, stores["valid"])

    class Loaders(L.LightningDataModule):
        def train_dataloader(self):
            rank = self.trainer.global_rank if self.trainer else 0
            epoch = self.trainer.current_epoch if self.trainer else 0
            return DataLoader(TrainBatches(data, epoch, tp.eval_every, rank), batch_size=None)

        def val_dataloader(self):
            return DataLoader(EvalIterable(eval_batches["valid"]), batch_size=None)

    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=METRIC, mode="max", save_top_k=1, save_last=True,
                                 save_on_train_epoch_end=True)  # an epoch boundary: resumes exactly
    callbacks = [checkpoint, *(callbacks or [])]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
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
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(ckpt_dir),
    )
    if dry:
        try:
            trainer.fit(module, datamodule=Loaders())
            best = checkpoint.best_model_score
            return {METRIC: float(best), "steps": trainer.global_step} if trainer.is_global_zero else {}
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    lead = is_global_rank_zero()  # DDP: the other ranks re-run this function and must not log runs
    parent_id = parent_run(name, run_params, params.tracking.experiment) if lead else None
    started = time.perf_counter()
    member_run = tracking.start_run(member, stage="train", params=run_params, experiment=params.tracking.experiment,
                                    tags={"model": name, "seed": str(seed), "mlflow.parentRunId": parent_id,
                                          "kind": "member"}) if lead else contextlib.nullcontext()
    with member_run as run:
        trainer.fit(module, datamodule=Loaders(), ckpt_path=str(last) if resume and last.exists() else None)
        seconds = time.perf_counter() - started
        if not trainer.is_global_zero:
            return {}
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        model.load_state_dict({k.removeprefix("model."): v for k, v in best["state_dict"].items()})
        best_step = int(best["global_step"])

        out_dir = Path(params.data.outputs) / member
        out_dir.mkdir(parents=True, exist_ok=True)
        tables = {}
        for split, batches in eval_batches.items():
            tables[split], fused = score_store(model, batches)
            tables[split].to_parquet(out_dir / f"{split}.parquet", index=False)
            np.save(out_dir / f"{split}_fused.npy", fused)
        report = model_report(tables, params, stores)
        model_path = Path("models") / name / f"seed{seed}" / "model.pt"
        save_member(model_path, name, cfg, model, {"seed": seed, "best_step": best_step, "train": to_dict(tp)})
        metrics = flat_metrics(report)
        mlflow.log_metrics({f"best_{k}" if k == METRIC else k: v for k, v in metrics.items()})
        mlflow.log_metrics({"best_step": best_step, "train_seconds": seconds,
                            "samples_per_s": module.samples_seen / max(seconds, 1e-9)})
        mlflow.log_artifact(str(model_path), artifact_path="checkpoint")
        run_id = run.info.run_id
    update_parent(parent_id)
    result = {**report, "best_step": best_step, "steps": tp.steps, "train_seconds": round(seconds, 1),
              "samples_per_s": round(module.samples_seen / max(seconds, 1e-9), 1), "mlflow_run_id": run_id}
    write_metrics(params.data.metrics, f"train/{member}", result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: nothing to resume
    return result


def is_global_rank_zero() -> bool:
    """Before the Trainer exists: Lightning's DDP launcher starts ranks > 0 with LOCAL_RANK / NODE_RANK set
    (torchrun and SLURM set RANK)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


# --- parent runs ----------------------------------------------------------------------------------


def parent_run(model: str, run_params: dict, experiment: str) -> str:
    """The parent run `<model>` of members trained with the same params (but the seed) and data."""
    shared = {k: v for k, v in run_params.items() if k != "seed"}
    group = tracking.params_hash(shared | {"data": tracking.data_hash()})
    exp_id = tracking.setup(experiment)
    found = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.kind = 'parent' and tags.group = '{group}'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    tags = {**tracking.standard_tags("train"), "kind": "parent", "group": group, "model": model}
    run = client.create_run(exp_id, run_name=model, tags=tags)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in shared.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def update_parent(parent_id: str) -> None:
    """Mean and std over the parent's finished members of every final NDCG@5 metric."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
    )
    cols = [c for c in children.columns if c.startswith(f"metrics.best_{METRIC}") or c.startswith(f"metrics.{METRIC}_")]
    for col in cols:
        values = children[col].dropna().to_numpy()
        key = col.removeprefix("metrics.").removeprefix("best_")
        client.log_metric(parent_id, f"{key}_mean", float(values.mean()))
        client.log_metric(parent_id, f"{key}_std", float(values.std()))
    client.log_metric(parent_id, "members", len(children))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall train",
        description="Train one ranker member (a model and a seed from params.yaml `train`): hard negatives, "
        "focal loss, sine-wave schedule, valid NDCG@5 every train.eval_every steps, best checkpoint kept, "
        "resumes an interrupted run. Writes models/<model>/seed<k>/model.pt, outputs/<model>-seed<k>/ and "
        "metrics/train/<model>-seed<k>.json, and logs MLflow run <model>-seed<k> under parent <model>.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--seed", required=True, type=lambda s: int(float(s)))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    parser.add_argument("--stop-after", type=int, help="simulate a crash after N steps (to test resuming)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = fit(args.model, args.seed, load_params(args.params), progress=not args.no_progress,
                 stop_after=args.stop_after, resume=not args.no_resume)
    if result:
        print(f"{tracking.run_name(args.model, args.seed)}: " + json.dumps({k: v for k, v in result.items() if k != 'mlflow_run_id'}),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
