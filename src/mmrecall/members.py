"""Trained members at inference: names, checkpoints, loading from a given backbone folder, scoring a store.

A member is one trained (model, seed): name `<model>-seed<k>`, checkpoint models/<model>/seed<k>/model.pt,
score tables and fused vectors in outputs/<member>/. `load` rebuilds the architecture with no
pretrained weights read (the checkpoint holds them all), so it only needs the backbone's config and
tokenizer files: the shipped MiniLM folder by default, or the copy inside the registered model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .backbone import load_tokenizer
from .batching import EvalBatches
from .store import FeatureStore

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def checkpoint_path(member: str, models_dir: str | Path = "models") -> Path:
    model, _, seed = member.rpartition("-seed")
    if not model or not seed.isdigit():
        raise ValueError(f"member {member!r}: expected <model>-seed<k>")
    return Path(models_dir) / model / f"seed{seed}" / "model.pt"


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
    from .train import MODELS  # lightning and the models: imported only when a member is loaded

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


def score(member: Member, store: FeatureStore) -> tuple[pd.DataFrame, np.ndarray]:
    """Score table (query_id, product_id, score) and float16 fused vectors of every store row."""
    from .train import score_store

    return score_store(member.model, EvalBatches(store, member.tokenizer, member.max_query_len, member.batch_size,
                                                 member.max_boxes))


def copy_tokenizer_files(backbone_dir: str | Path, dest: Path) -> Path:
    """The backbone files a member needs at load time (config + tokenizer, not the weights)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(backbone_dir) / name).exists():
            shutil.copy(Path(backbone_dir) / name, dest / name)
    return dest
