"""Trained members: checkpoints (write and read), loading for inference, scoring a feature store.

A member is one trained (model, seed): name `<model>-seed<k>`, checkpoint models/<model>/seed<k>/model.pt
(weights + model config + the train settings it ran with); its score tables live in outputs/<member>/
(ranking/outputs.py). `load` rebuilds the architecture with no pretrained weights read (the checkpoint
holds them all), so it only needs the backbone's config and tokenizer files: the shipped MiniLM folder
by default, or the copy inside the registered model.

Scoring runs where train.accelerator asks (`scoring_device`): on a CUDA device when it is gpu / auto and
one is present, with autocast per train.precision and GPU_EVAL_BATCH_FACTOR times larger batches;
otherwise on the CPU in float32, exactly as before. Fitting, the smooth stage and the registered model
(which reads the accelerator and precision a member was trained with from its checkpoint) all go through here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
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
from .outputs import BEST_BOX

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
GPU_EVAL_BATCH_FACTOR = 4  # on a GPU, score 4 x train.eval_batch_size rows per batch (no activations are kept)
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}  # train.precision -> autocast dtype
CPU = torch.device("cpu")


def scoring_device(accelerator: str, cuda_available: bool | None = None) -> torch.device:
    """Where members score: CUDA for train.accelerator gpu / cuda / auto when a CUDA device is present, else the CPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return torch.device("cuda") if accelerator in ("gpu", "cuda", "auto") and cuda_available else CPU


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    """Rows per scoring batch on `device`: train.eval_batch_size on the CPU, GPU_EVAL_BATCH_FACTOR times it on a GPU."""
    return batch_size * GPU_EVAL_BATCH_FACTOR if device.type == "cuda" else batch_size


def autocast(device: torch.device, precision: str):
    """torch.autocast for a mixed train.precision on a GPU; on the CPU nothing (float32, as trained there)."""
    if device.type != "cuda" or precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])


def checkpoint_path(member: str, models_dir: str | Path = "models") -> Path:
    model, _, seed = member.rpartition("-seed")
    if not model or not seed.isdigit():
        raise UserError(f"member {member!r}: expected <model>-seed<k>")
    return Path(models_dir) / model / f"seed{seed}" / "model.pt"


def save(path: Path, name: str, cfg, model: nn.Module, extra: dict) -> None:
    """Write a member checkpoint: model name, config, weights and `extra` (seed, best_step, train settings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.cpu() for k, v in model.state_dict().items()}  # CPU tensors, wherever the model scored
    torch.save({"model": name, "config": dataclasses.asdict(cfg), "state_dict": weights, **extra}, path)


@dataclass
class Member:
    name: str  # the model name (mcan, visualbert, two_tower)
    model: nn.Module
    tokenizer: object
    max_query_len: int
    max_boxes: int
    box_select: str  # which boxes an image over max_boxes keeps (data/batching.py)
    batch_size: int  # rows per scoring batch (eval_batch_size on the device)
    device: torch.device = CPU
    precision: str = "32-true"  # train.precision: autocast on a GPU for the mixed ones


def load(path: str | Path, backbone: str | None = None, accelerator: str | None = None) -> Member:
    """A member checkpoint in eval mode on its scoring device; `backbone`: a folder with config + tokenizer files
    (default: the saved one); `accelerator`: train.accelerator (default: the one the member was trained with)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    name = blob["model"]
    model_cls, cfg_cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    config = {**getattr(cfg_cls, "LATER_FIELDS", {}), **blob["config"]}  # an older checkpoint: what it was trained as
    # Same architecture, no pretrained weights read: the checkpoint's state_dict has every weight.
    config.update({k: False for k in ("pretrained", "init_text_from_backbone") if k in known})
    if backbone is not None:
        config["backbone"] = str(backbone)
    model = model_cls.from_config(cfg_cls(**config))
    model.load_state_dict(blob["state_dict"])
    train = blob.get("train", {})
    device = scoring_device(accelerator or train.get("accelerator", "cpu"))
    return Member(name, model.eval().to(device), load_tokenizer(config["backbone"]), int(train.get("max_query_len", 16)),
                  int(train.get("max_boxes", 10)), train.get("box_select", "first"),  # older checkpoints: file order
                  eval_batch_size(int(train.get("eval_batch_size", 256)), device),
                  device, train.get("precision", "32-true"))


@torch.no_grad()
def score_batches(model: nn.Module, batches: EvalBatches, device: torch.device = CPU,
                  precision: str = "32-true") -> tuple[pd.DataFrame, np.ndarray]:
    """Score table (query_id, product_id, score, then `best_box` for a model that scores one box: its position
    among the image's boxes, then the model's `details` columns) and the fused vectors (float16) of every row,
    on `device`."""
    tensors = itertools.chain(model.parameters(), model.buffers())  # neighbour_words has buffers only
    if model.training or next(tensors).device != device:  # each walks every module: ~2 ms a call
        model.eval().to(device)
    logits, fused, best_box, details = [], [], [], {}
    with autocast(device, precision):
        for batch in batches:
            out = model({key: value.to(device, non_blocking=True) for key, value in batch.items()})
            logits.append(out.logits.float().cpu().numpy())
            fused.append(out.fused.float().cpu().numpy().astype(np.float16))
            if out.best_box is not None:  # slot -> the box's position in its image
                best_box.append(batch["img_index"].gather(1, out.best_box.cpu()[:, None]).squeeze(1).numpy())
            for name, value in out.details.items():
                details.setdefault(name, []).append(value.float().cpu().numpy())
    rows = batches.store.rows
    boxes = {BEST_BOX: np.concatenate(best_box).astype(np.int32)} if best_box else {}
    table = pd.DataFrame({"query_id": rows.query_id, "product_id": rows.product_id, "score": np.concatenate(logits),
                          **boxes, **{name: np.concatenate(parts) for name, parts in details.items()}})
    return table, np.concatenate(fused)


def score(member: Member, store: FeatureStore) -> tuple[pd.DataFrame, np.ndarray]:
    """Score table and float16 fused vectors of every store row."""
    batches = EvalBatches(store, member.tokenizer, member.max_query_len, member.batch_size, member.max_boxes,
                          member.box_select)
    return score_batches(member.model, batches, member.device, member.precision)


def copy_tokenizer_files(backbone_dir: str | Path, dest: Path) -> Path:
    """The backbone files a member needs at load time (config + tokenizer, not the weights)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(backbone_dir) / name).exists():
            shutil.copy(Path(backbone_dir) / name, dest / name)
    return dest
