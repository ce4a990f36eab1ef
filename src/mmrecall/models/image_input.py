"""Shared pieces of the three rankers: the per-box image input, masking helpers, the output type.

Masks follow the batch convention everywhere: True (or 1) marks a real token / box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

FEAT_DIM = 2048  # detector ROI feature
BOX_DIM = 6  # normalised top, left, bottom, right, area, aspect
NUM_LABELS = 33  # detector classes (multimodal_labels.txt)
NEG_INF = -1e9  # logit given to masked positions, as in MCAN / openvqa (float16 holds at most -65504: see mask_value)


@dataclass
class RankerOutput:
    """What every ranker returns: one score per (query, image) pair and the vector behind it."""

    logits: Tensor  # (B,)
    fused: Tensor  # (B, D), the features handed to the LightGBM re-ranker
    details: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,): more numbers for the re-ranker
    best_box: Tensor | None = None  # (B,) slot of the box the score was read from (a ranker that scores one box)


def mask_value(dtype: torch.dtype) -> float:
    """NEG_INF, or the most negative finite value of `dtype` when NEG_INF does not fit (float16: -65504).

    float32 and bfloat16 keep -1e9 (the original's value, so their numbers do not change); float16, the
    dtype of attention scores under 16-mixed autocast, would raise "cannot be converted without overflow".
    """
    return max(NEG_INF, torch.finfo(dtype).min)


def masked_fill(logits: Tensor, mask: Tensor, value: float | None = None) -> Tensor:
    """Set `logits` to `value` (default: mask_value of their dtype) where `mask` is False; `mask` broadcasts."""
    return logits.masked_fill(~mask.bool(), mask_value(logits.dtype) if value is None else value)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` that gives (numerically) zero weight to positions where `mask` is False."""
    return torch.softmax(masked_fill(logits, mask), dim=dim)


def on_real_boxes(fn, mask: Tensor, *x: Tensor) -> Tensor:
    """fn applied to the real boxes only; padded positions get zeros.

    Boxes are padded to the largest image of the batch (up to 30 while the mean is ~4), so running a
    wide per-box MLP on the padding would be most of the cost. Each x (B, N, ...) is gathered to its real
    boxes (R, ...) and passed to `fn`, which returns (R, D_out) -> (B, N, D_out).
    """
    mask = mask.bool()
    out = fn(*(part[mask] for part in x))  # (R, D_out), R = real boxes in the batch
    full = out.new_zeros(*mask.shape, out.shape[-1])
    full[mask] = out
    return full


def feature_norm(enabled: bool) -> nn.Module:
    """LayerNorm over the 2048-d detector feature, or nothing (the original models feed it raw).

    The features are non-negative and sum to ~1e3 per box: one Adam step on every input weight then
    shifts all pre-activations together, which kills a ReLU layer within a few steps at lr ~1e-3.
    The 1st place trained at lr 1e-5; normalising lets the CPU configs train fast.
    """
    return nn.LayerNorm(FEAT_DIM) if enabled else nn.Identity()


def once_per_query(encode, input_ids: Tensor, attention_mask: Tensor):
    """encode(input_ids, attention_mask) run on each distinct query of the batch once, expanded back to B rows.

    A scoring batch holds ~30 candidates per query, all with the same tokens: encoding the text once
    per query instead of once per row is most of a text tower's cost. `encode` returns a tensor or a
    tuple of tensors, each with the batch first.
    """
    key = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)  # (B, 2T)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return encode(input_ids, attention_mask)
    first = torch.zeros(len(distinct), dtype=torch.long).scatter_(0, inverse, torch.arange(len(key)))  # a row of each
    out = encode(input_ids[first], attention_mask[first])
    return tuple(x[inverse] for x in out) if isinstance(out, tuple) else out[inverse]


class ImageInput(nn.Module):
    """Per-box input row [2048 feature | 6 box | trainable class-label embedding] (2048 + 6 + 32 = 2086).

    label_dim 0 leaves the label out (the original VisualBERT's 2048 + 6 row). No zero-width embedding is
    built then: its backward pass on a CUDA device crashed the faithful VisualBERT run on an H200
    ("illegal memory access"), while the CPU accepts it.
    """

    def __init__(self, label_dim: int = 32, num_labels: int = NUM_LABELS, normalize: bool = False):
        super().__init__()
        self.label_embedding = nn.Embedding(num_labels, label_dim) if label_dim > 0 else None
        self.feature_norm = feature_norm(normalize)

    @property
    def out_dim(self) -> int:
        return FEAT_DIM + BOX_DIM + (self.label_embedding.embedding_dim if self.label_embedding is not None else 0)

    def forward(self, img_feat: Tensor, img_box: Tensor, img_label: Tensor) -> Tensor:
        # img_feat (..., 2048), img_box (..., 6), img_label (...) -> (..., 2054 + label_dim): (B, N) boxes,
        # or (R,) real boxes gathered by on_real_boxes (the padding then costs nothing)
        parts = [self.feature_norm(img_feat), img_box]
        if self.label_embedding is not None:
            parts.append(self.label_embedding(img_label))
        return torch.cat(parts, dim=-1)
