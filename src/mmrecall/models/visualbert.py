"""VisualBERT as used by the 1st-place team: one BERT over [text tokens ; image tokens].

Image tokens are Linear(2054 -> H) of [2048 feature | 6 box] in the original; here the shared image input
appends a trainable class-label embedding (label_dim, 0 = the original 2054); token type 0 for text, 1 for image;
positions run on from the text into the image; the backbone's embedding LayerNorm + dropout and its
encoder do the rest. The final hidden state at [CLS] (no pooler) -> MLP -> logit (`pool: cls`; the CPU
config uses `pool: pair`, which gives the head an explicit text x image product to learn from).

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
from .image_input import NUM_LABELS, ImageInput, RankerOutput, on_real_boxes


POOLS = ("cls", "mean", "pair")


@dataclass
class VisualBERTConfig:
    """The CPU default; the original (configs/faithful.yaml): bert-large-uncased, all 24 layers, raw
    features, trained word embeddings, pool cls."""

    backbone: str = SHIPPED  # bert-large-uncased in the original
    backbone_layers: int | None = 1  # None = every layer of the backbone
    pretrained: bool = True
    feature_norm: bool = True  # LayerNorm on the 2048-d box features (see image_input.feature_norm)
    train_word_embeddings: bool = False  # the original fine-tuned them; freezing saves ~20 % of a CPU step
    label_dim: int = 32  # trainable detector-class embedding per box (0: none, the original's 2054-d input)
    num_labels: int = NUM_LABELS
    # cls: the final [CLS] state (the original); mean: the mean over real tokens; pair: the means over the
    # text and over the image tokens, fused as concat[t, v, t*v, |t-v|] (the MCAN head's form)
    pool: str = "pair"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"visualbert pool must be one of {POOLS}, got {self.pool!r}")


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


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, L, H) over the positions where mask (B, L) is True -> (B, H)."""
    weight = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * weight).sum(1) / weight.sum(1).clamp(min=1)


class VisualBERT(nn.Module):
    def __init__(self, cfg: VisualBERTConfig, bert: PreTrainedModel):
        super().__init__()
        self.cfg = cfg
        bert.pooler = None  # the [CLS] hidden state is used as is
        _ensure_two_token_types(bert)
        bert.embeddings.word_embeddings.weight.requires_grad_(cfg.train_word_embeddings)
        self.bert = bert
        hidden = bert.config.hidden_size
        # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
        self.position_offset = getattr(bert.embeddings, "padding_idx", -1) + 1
        self.image_input = ImageInput(cfg.label_dim, cfg.num_labels, cfg.feature_norm)
        self.img_proj = nn.Linear(self.image_input.out_dim, hidden)
        self.head = nn.Sequential(nn.Linear(self.fused_dim, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    @classmethod
    def from_config(cls, cfg: VisualBERTConfig) -> VisualBERT:
        return cls(cfg, load_pretrained_encoder(cfg.backbone, cfg.backbone_layers, pretrained=cfg.pretrained))

    @property
    def fused_dim(self) -> int:
        return self.bert.config.hidden_size * (4 if self.cfg.pool == "pair" else 1)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.bert.parameters()) if self.cfg.pretrained else []

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        text_mask, img_mask = batch["attention_mask"].bool(), batch["img_mask"].bool()
        text = self.bert.embeddings.word_embeddings(batch["input_ids"])  # (B, T, H)
        img = on_real_boxes(lambda *box: self.img_proj(self.image_input(*box)),  # (R, 2054 + label_dim) -> (R, H)
                            img_mask, batch["img_feat"], batch["img_box"], batch["img_label"])  # (B, N, H)
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
            pooled = _masked_mean(hidden, mask)  # (B, H)
        elif self.cfg.pool == "pair":
            t = _masked_mean(hidden[:, : text.shape[1]], text_mask)  # (B, H)
            v = _masked_mean(hidden[:, text.shape[1] :], img_mask)  # (B, H)
            pooled = torch.cat([t, v, t * v, (t - v).abs()], dim=-1)  # (B, 4H)
        else:
            pooled = hidden[:, 0]  # (B, H), [CLS]
        return RankerOutput(logits=self.head(pooled).squeeze(-1), fused=pooled)
