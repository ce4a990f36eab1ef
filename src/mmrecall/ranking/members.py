"""Trained members: checkpoints (write and read), loading for inference, scoring a feature store.

A member is one trained (model, seed): name `<model>-seed<k>`, checkpoint models/<model>/seed<k>/model.pt
(weights + model config + the train settings it ran with); its score tables live in outputs/<member>/
(ranking/outputs.py). `load` rebuilds the architecture with no pretrained weights read (the checkpoint
holds them all), so it only needs the backbone's config and tokenizer files: the shipped MiniLM folder
by default, or the copy inside the registered model.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.batching import EvalBatches
from ..data.store import FeatureStore
from ..errors import UserError
from ..models.backbone import load_tokenizer
from ..models.registry import MODELS

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def checkpoint_path(member: str, models_dir: str | Path = "models") -> Path:
    model, _, seed = member.rpartition("-seed")
    if not model or not seed.isdigit():
        raise UserError(f"member {member!r}: expected <model>-seed<k>")
    return Path(models_dir) / model / f"seed{seed}" / "model.pt"


def save(path: Path, name: str, cfg, model: nn.Module, extra: dict) -> None:
    """Write a member checkpoint: model name, config, weights and `extra` (seed, best_step, train settings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": name, "config": dataclasses.asdict(cfg), "state_dict": model.state_dict(), **extra}, path)


@dataclass
class Member:
    name: str  # the model name (mcan, visualbert, two_tower)
    model: nn.Module
    tokenizer: object
    max_query_len: int
    max_boxes: int
    batch_size: int


def load(path: str | Path, backbone: str | None = None) -> Member:
    """A member checkpoint in eval mode; `backbone`: a folder with config + tokenizer files (default: the saved one)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    name = blob["model"]
    model_cls, cfg_cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    config = dict(blob["config"])
    # Same architecture, no pretrained weights read: the checkpoint's state_dict has every weight.
    config.update({k: False for k in ("pretrained", "init_text_from_backbone") if k in known})
    if backbone is not None:
        config["backbone"] = str(backbone)
    model = model_cls.from_config(cfg_cls(**config))
    model.load_state_dict(blob["state_dict"])
    train = blob.get("train", {})
    return Member(name, model.eval(), load_tokenizer(config["backbone"]), int(train.get("max_query_len", 16)),
                  int(train.get("max_boxes", 10)), int(train.get("eval_batch_size", 256)))


@torch.no_grad()
def score_batches(model: nn.Module, batches: EvalBatches) -> tuple[pd.DataFrame, np.ndarray]:
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


def score(member: Member, store: FeatureStore) -> tuple[pd.DataFrame, np.ndarray]:
    """Score table and float16 fused vectors of every store row."""
    return score_batches(member.model, EvalBatches(store, member.tokenizer, member.max_query_len, member.batch_size,
                                                   member.max_boxes))


def copy_tokenizer_files(backbone_dir: str | Path, dest: Path) -> Path:
    """The backbone files a member needs at load time (config + tokenizer, not the weights)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(backbone_dir) / name).exists():
            shutil.copy(Path(backbone_dir) / name, dest / name)
    return dest
