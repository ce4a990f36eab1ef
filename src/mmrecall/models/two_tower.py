"""The solo team's "siamese" light-BERT: two independent BERT towers scored by a dot product.

Text tower: a BERT encoder over the query, pooled output tanh(Linear(h_[CLS])).
Image tower: ROI -> Linear(2048 -> H) -> LayerNorm (no word / position / type embeddings, no dropout)
-> its own BERT encoder -> the same pooler on the first ROI.
Trained with in-batch negatives over the B x B similarity matrix: element-wise BCE on dot products
(the solo team's loss, `loss: bce`), or a symmetric softmax over cosine similarities / temperature
(`loss: softmax`, InfoNCE; it learns several times faster in the CPU budget). Two rows of the same
query in a batch are not treated as negatives of each other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from .backbone import (
    SHIPPED,
    build_encoder,
    encoder_attention_mask,
    load_backbone_config,
    load_pretrained_encoder,
)
from .image_input import FEAT_DIM, RankerOutput, feature_norm, on_real_boxes, once_per_query


@dataclass
class TwoTowerConfig:
    """The CPU default; the solo team's (configs/faithful.yaml): hidden 768, 12 heads, ff 3072, 4 layers,
    both towers from scratch, raw features, loss bce."""

    hidden: int | None = 384  # None = the backbone's (768 in the original, random BertConfig defaults)
    layers: int = 2
    heads: int | None = None
    ff: int | None = None
    init_text_from_backbone: bool = True  # the original trained both towers from scratch
    train_word_embeddings: bool = False  # text tower; freezing (with init_text_from_backbone) saves ~20 % of a CPU step
    feature_norm: bool = True  # LayerNorm on the 2048-d ROI features (see image_input.feature_norm)
    backbone: str = SHIPPED  # tokenizer / architecture; its weights only if init_text_from_backbone
    loss: str = "softmax"  # bce: the solo team's; softmax: InfoNCE on cosine / temperature
    temperature: float = 0.05  # softmax loss only

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"two_tower loss must be one of {LOSSES}, got {self.loss!r}")


LOSSES = ("bce", "softmax")


def _false_negatives(query: Tensor | None, n: int, device) -> Tensor:
    """(B, B) True where two different rows belong to the same query (not negatives of each other)."""
    if query is None:
        return torch.zeros(n, n, dtype=torch.bool, device=device)
    return (query[:, None] == query[None, :]) & ~torch.eye(n, dtype=torch.bool, device=device)


def in_batch_loss(text_vec: Tensor, image_vec: Tensor, query: Tensor | None = None,
                  extra_text: Tensor | None = None) -> Tensor:
    """Mean element-wise BCE-with-logits of the (B, B) dot-product matrix against the identity; the rows
    of `extra_text` (S, H), texts that fit no image of the batch, add (S, B) negatives."""
    sim = text_vec @ image_vec.T  # (B, B)
    eye = torch.eye(len(sim), dtype=sim.dtype, device=sim.device)
    keep = (~_false_negatives(query, len(sim), sim.device)).to(sim.dtype)
    loss = F.binary_cross_entropy_with_logits(sim, eye, reduction="none")
    if extra_text is None:
        return (loss * keep).sum() / keep.sum()
    neg = extra_text @ image_vec.T  # (S, B)
    extra = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum")
    return ((loss * keep).sum() + extra) / (keep.sum() + neg.numel())


def in_batch_softmax_loss(text_vec: Tensor, image_vec: Tensor, temperature: float, query: Tensor | None = None,
                          extra_text: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE: cross-entropy of each text over the batch's images and of each image over the
    texts, the latter also over the rows of `extra_text` (S, H), texts that fit no image of the batch."""
    v = F.normalize(image_vec, dim=-1)
    sim = F.normalize(text_vec, dim=-1) @ v.T / temperature  # (B, B)
    sim = sim.masked_fill(_false_negatives(query, len(sim), sim.device), float("-inf"))
    target = torch.arange(len(sim), device=sim.device)
    per_image = sim.T  # (B, B) image -> texts
    if extra_text is not None:
        per_image = torch.cat([per_image, v @ F.normalize(extra_text, dim=-1).T / temperature], dim=1)  # (B, B + S)
    return (F.cross_entropy(sim, target) + F.cross_entropy(per_image, target)) / 2


class TwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig, text_tower: PreTrainedModel):
        """The image tower copies `text_tower`'s architecture with its own random weights."""
        super().__init__()
        self.cfg = cfg
        self.text_tower = text_tower
        text_tower.embeddings.word_embeddings.weight.requires_grad_(cfg.train_word_embeddings)
        image_tower = build_encoder(copy.deepcopy(text_tower.config))
        self.image_config = image_tower.config
        hidden = self.image_config.hidden_size
        self.feature_norm = feature_norm(cfg.feature_norm)
        self.roi_proj = nn.Linear(FEAT_DIM, hidden)
        self.roi_norm = nn.LayerNorm(hidden, eps=self.image_config.layer_norm_eps)
        self.image_encoder = image_tower.encoder
        self.image_pooler = image_tower.pooler

    @classmethod
    def from_config(cls, cfg: TwoTowerConfig) -> TwoTower:
        config = load_backbone_config(cfg.backbone, cfg.layers)
        sizes = {"hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "intermediate_size": cfg.ff}
        sizes = {key: value for key, value in sizes.items() if value is not None}
        if cfg.init_text_from_backbone:
            if conflicts := {key: value for key, value in sizes.items() if getattr(config, key) != value}:
                raise ValueError(f"{conflicts} conflict with the pretrained {cfg.backbone!r} text tower")
            return cls(cfg, load_pretrained_encoder(cfg.backbone, cfg.layers))
        config.update(sizes)
        return cls(cfg, build_encoder(config))

    @property
    def fused_dim(self) -> int:
        return 3 * self.image_config.hidden_size

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.text_tower.parameters()) if self.cfg.init_text_from_backbone else []

    def encode_text(self, batch: dict[str, Tensor]) -> Tensor:
        def encode(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            return self.text_tower(input_ids=input_ids, attention_mask=attention_mask.long()).pooler_output  # (B, H)

        if self.training:  # in-batch rows are distinct queries; training stays exactly as it was
            return encode(batch["input_ids"], batch["attention_mask"])
        return once_per_query(encode, batch["input_ids"], batch["attention_mask"])

    def encode_image(self, batch: dict[str, Tensor]) -> Tensor:
        x = on_real_boxes(lambda roi: self.roi_norm(self.roi_proj(self.feature_norm(roi))), batch["img_mask"], batch["img_feat"])  # (B, N, H)
        mask = encoder_attention_mask(self.image_config, x, batch["img_mask"].long())
        x = self.image_encoder(x, attention_mask=mask).last_hidden_state  # (B, N, H)
        return self.image_pooler(x)  # (B, H), from the first ROI

    def in_batch_loss(self, batch: dict[str, Tensor], query: Tensor | None = None,
                      swapped: dict[str, Tensor] | None = None) -> Tensor:
        """The training loss of a batch of positive pairs; `query` (B,) marks rows of the same query;
        `swapped` (input_ids, attention_mask of S queries with one word swapped) are negatives of every image."""
        t, v = self.encode_text(batch), self.encode_image(batch)
        extra = self.encode_text(swapped) if swapped is not None else None
        if self.cfg.loss == "softmax":
            return in_batch_softmax_loss(t, v, self.cfg.temperature, query, extra)
        return in_batch_loss(t, v, query, extra)

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        t, v = self.encode_text(batch), self.encode_image(batch)
        if self.cfg.loss == "softmax":  # score = the similarity the loss trained
            t, v = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
            return RankerOutput(logits=(t * v).sum(-1) / self.cfg.temperature, fused=torch.cat([t, v, t * v], dim=-1))
        return RankerOutput(logits=(t * v).sum(-1), fused=torch.cat([t, v, t * v], dim=-1))
