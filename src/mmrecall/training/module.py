"""The Lightning pieces of one member's training: the module (loss, optimizer, validation) and its data.

- `TrainingModule` wraps one model: pointwise focal loss on (query, positive) and (query, negative) pairs
  (the 1st place), or the model's in-batch loss on positive pairs (two-tower, word detectors); AdamW with the
  pretrained backbone at its own lr; the sine wave with linear warmup, stepped every optimizer step.
  Valid NDCG@5 is computed after every validation pass and logged to the active MLflow run.
- `MemberDataModule` gives Lightning one "epoch" of `eval_every` training batches at a time, re-drawn
  from (seed, epoch, rank), and the valid split as evaluation batches.
"""

from __future__ import annotations

import lightning as L
import mlflow
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..config import TrainParams
from ..data.batching import EvalBatches, TrainBatches, TrainData
from ..data.store import FeatureStore
from ..ranking.metrics import METRIC, evaluate_scores
from .losses import focal_loss_with_logits, sine_wave_scheduler


class EvalIterable(IterableDataset):
    """EvalBatches as a dataset for a DataLoader (batches are already made: batch_size=None)."""

    def __init__(self, batches: EvalBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class MemberDataModule(L.LightningDataModule):
    """One epoch = `eval_every` training batches (drawn for the trainer's epoch and rank); valid to evaluate."""

    def __init__(self, data: TrainData, valid: EvalBatches, eval_every: int):
        super().__init__()
        self.data, self.valid, self.eval_every = data, valid, eval_every

    def train_dataloader(self):
        rank = self.trainer.global_rank if self.trainer else 0
        epoch = self.trainer.current_epoch if self.trainer else 0
        return DataLoader(TrainBatches(self.data, epoch, self.eval_every, rank), batch_size=None)

    def val_dataloader(self):
        return DataLoader(EvalIterable(self.valid), batch_size=None)


class TrainingModule(L.LightningModule):
    """Wraps one model: focal loss on positive/negative pairs, or the model's in-batch loss (two-tower, word detectors)."""

    def __init__(self, name: str, model: nn.Module, params: TrainParams, seed: int, valid: FeatureStore | None = None):
        super().__init__()
        self.name, self.model, self.params, self.seed, self.valid = name, model, params, seed, valid
        self._val_logits: list[torch.Tensor] = []
        self.samples_seen = 0

    def training_step(self, batch, batch_idx):
        p = self.params
        if "neg" not in batch:
            pos = batch["pos"]
            loss = self.model.in_batch_loss(pos, batch["query"], batch.get("swapped"))
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
            {"params": [w for w in trainable if id(w) in pretrained], "lr": p.effective_backbone_lr},
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
