"""VisualBERT as used by the 1st-place team: one BERT over [text tokens ; image tokens].

Image tokens are Linear(2054 -> H) of [2048 feature | 6 box]; token type 0 for text, 1 for image;
positions run on from the text into the image; the backbone's embedding LayerNorm + dropout and its
encoder do the rest. The final hidden state at [CLS] (no pooler) -> MLP -> logit.

Positions count real tokens only, so image positions start right after the last real text token.
With unpadded text this is the original numbering; with padded text it keeps the score independent of
how far the batch was padded (the original numbered the text pads too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from .backbone import SHIPPED, load_pretrained_encoder
from .image_input import BOX_DIM, FEAT_DIM, RankerOutput, feature_norm, on_real_boxes


@dataclass
class VisualBERTConfig:
    backbone: str = SHIPPED  # bert-large-uncased in the original
    backbone_layers: int | None = None  # None = every layer of the backbone
    pretrained: bool = True
    feature_norm: bool = False  # LayerNorm on the 2048-d box features (see image_input.feature_norm)
    pool: str = "cls"  # cls: the final [CLS] state (the original); mean: the mean over real tokens

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"visualbert pool must be 'cls' or 'mean', got {self.pool!r}")


def _ensure_two_token_types(bert: PreTrainedModel) -> None:
    """RoBERTa has a single token type; add a second one for images, initialised from the first."""
    old = bert.embeddings.token_type_embeddings
    if old.num_embeddings >= 2:
        return
    new = nn.Embedding(2, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight[:1].expand(2, -1))
    bert.embeddings.token_type_embeddings = new
    bert.config.type_vocab_size = 2


class VisualBERT(nn.Module):
    def __init__(self, cfg: VisualBERTConfig, bert: PreTrainedModel):
        super().__init__()
        self.cfg = cfg
        bert.pooler = None  # the [CLS] hidden state is used as is
        _ensure_two_token_types(bert)
        self.bert = bert
        hidden = bert.config.hidden_size
        # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
        self.position_offset = getattr(bert.embeddings, "padding_idx", -1) + 1
        self.feature_norm = feature_norm(cfg.feature_norm)
        self.img_proj = nn.Linear(FEAT_DIM + BOX_DIM, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    @classmethod
    def from_config(cls, cfg: VisualBERTConfig) -> VisualBERT:
        return cls(cfg, load_pretrained_encoder(cfg.backbone, cfg.backbone_layers, pretrained=cfg.pretrained))

    @property
    def fused_dim(self) -> int:
        return self.bert.config.hidden_size

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.bert.parameters()) if self.cfg.pretrained else []

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        text_mask, img_mask = batch["attention_mask"].bool(), batch["img_mask"].bool()
        text = self.bert.embeddings.word_embeddings(batch["input_ids"])  # (B, T, H)
        img = on_real_boxes(self.img_proj, torch.cat([self.feature_norm(batch["img_feat"]), batch["img_box"]], dim=-1), img_mask)  # (B, N, H)
        mask = torch.cat([text_mask, img_mask], dim=1)  # (B, T + N)
        token_type = torch.cat([torch.zeros_like(text_mask), torch.ones_like(img_mask)], dim=1).long()
        position = mask.long().cumsum(1) - 1 + self.position_offset
        # The backbone's forward adds position + type embeddings, applies LayerNorm + dropout, builds the
        # attention mask for its attention implementation and runs the encoder.
        hidden = self.bert(
            inputs_embeds=torch.cat([text, img], dim=1),
            attention_mask=mask.long(),
            token_type_ids=token_type,
            position_ids=position,
        ).last_hidden_state  # (B, T + N, H)
        if self.cfg.pool == "mean":
            weight = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T + N, 1)
            pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)  # (B, H)
        else:
            pooled = hidden[:, 0]  # (B, H), [CLS]
        return RankerOutput(logits=self.head(pooled).squeeze(-1), fused=pooled)
