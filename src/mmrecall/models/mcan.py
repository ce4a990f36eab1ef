"""MCAN (deep Modular Co-Attention Network, encoder-decoder variant) as used by the 1st-place team.

Text: the backbone's embeddings module only (word + position + type + LayerNorm) -> Linear.
Image: [2048 | 6 box | 32 label] per box -> 2-layer MLP.
L self-attention (SA) blocks on the text, then L guided-attention (SGA) blocks on the image, each guided
by the final text output; one AttFlat per modality; z = [LN(t), LN(v), LN(t*v), LN(|t-v|)] -> MLP -> logit.
Block names follow openvqa.

`token_match` (not in the 1st place's model; on by default, off in configs/faithful.yaml) adds a per-token
score to the logit: each query token gathers its evidence from the boxes, and the pair counts as well as its
worst-matched token. A near-miss image (one named attribute wrong) is then penalised by that one token instead
of averaged away in the pooled t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from .backbone import SHIPPED, load_pretrained_encoder
from .image_input import (NUM_LABELS, ImageInput, RankerOutput, masked_fill, masked_softmax, on_real_boxes,
                          once_per_query)


@dataclass
class MCANConfig:
    """The CPU default; the 1st place's sizes are in configs/faithful.yaml (hidden 1024, 16 heads, ff 4096,
    12 layers, dropout 0.1, flat 512 -> 2048, img_mlp None, roberta-large, trained word embeddings, no token match)."""

    hidden: int = 128
    heads: int = 4
    ff: int = 256
    layers: int = 1
    dropout: float = 0.0
    flat_mlp: int = 128
    flat_out: int = 256
    feature_norm: bool = True  # LayerNorm on the 2048-d box features (see image_input.feature_norm)
    img_mlp: int | None = 256  # inner width of the per-box image MLP; None = the input width (2086)
    label_dim: int = 32
    num_labels: int = NUM_LABELS
    backbone: str = SHIPPED  # only its embeddings module is used
    pretrained: bool = True
    train_word_embeddings: bool = False  # the 1st place fine-tuned them; freezing saves a lot on CPU
    token_match: bool = True  # + a per-token evidence score, soft minimum over the tokens (TokenMatch; off = 1st place)

    # Fields added after checkpoints were written, with the value such a checkpoint was trained with.
    LATER_FIELDS: ClassVar[dict] = {"token_match": False}


class LayerNorm(nn.Module):
    """MCAN's LayerNorm: weight * (x - mean) / (std + eps) + bias, with the unbiased std.

    Computed by torch's fused layer_norm (one kernel each way instead of ~6 + ~10; MCAN runs 9 per pass):
    (x - mean) / std_unbiased = layer_norm(x) * sqrt((n - 1) / n), with eps moved inside the square root
    (eps**2), which differs from the original only where the std is within a few eps of 0.
    """

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.unbias = math.sqrt((size - 1) / size) if size > 1 else 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight * self.unbias, self.bias, eps=self.eps**2)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: MCANConfig):
        super().__init__()
        assert cfg.hidden % cfg.heads == 0
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.merge = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def _split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, Tq, H), k = v (B, Tk, H), mask (B, Tk) with True = real key."""
        q, k, v = self._split(self.q(q)), self._split(self.k(k)), self._split(self.v(v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, Tq, Tk)
        att = self.dropout(masked_softmax(scores, mask[:, None, None, :]))
        out = (att @ v).transpose(1, 2).flatten(2)  # (B, Tq, H)
        return self.merge(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.ff), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ff, cfg.hidden)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """SA block (post-norm): x = LN(x + MHA(x, x, x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.drop1, self.norm1 = nn.Dropout(cfg.dropout), LayerNorm(cfg.hidden)
        self.drop2, self.norm2 = nn.Dropout(cfg.dropout), LayerNorm(cfg.hidden)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        x = self.norm1(x + self.drop1(self.att(x, x, x, x_mask)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class GuidedAttention(nn.Module):
    """SGA block: self-attention on x, then attention from x (queries) to the guide y, then FFN."""

    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.self_att = MultiHeadAttention(cfg)
        self.guided_att = MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.drop1, self.norm1 = nn.Dropout(cfg.dropout), LayerNorm(cfg.hidden)
        self.drop2, self.norm2 = nn.Dropout(cfg.dropout), LayerNorm(cfg.hidden)
        self.drop3, self.norm3 = nn.Dropout(cfg.dropout), LayerNorm(cfg.hidden)

    def forward(self, x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor) -> Tensor:
        x = self.norm1(x + self.drop1(self.self_att(x, x, x, x_mask)))
        x = self.norm2(x + self.drop2(self.guided_att(x, y, y, y_mask)))
        return self.norm3(x + self.drop3(self.ffn(x)))


class MCAEncoderDecoder(nn.Module):
    """L SA blocks on the text; then L SGA blocks on the image, all guided by the final text output."""

    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.encoder = nn.ModuleList(SelfAttention(cfg) for _ in range(cfg.layers))
        self.decoder = nn.ModuleList(GuidedAttention(cfg) for _ in range(cfg.layers))

    def encode(self, lang: Tensor, lang_mask: Tensor) -> Tensor:
        for block in self.encoder:
            lang = block(lang, lang_mask)
        return lang

    def decode(self, img: Tensor, lang: Tensor, img_mask: Tensor, lang_mask: Tensor) -> Tensor:
        for block in self.decoder:
            img = block(img, lang, img_mask, lang_mask)
        return img

    def forward(
        self, lang: Tensor, img: Tensor, lang_mask: Tensor, img_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        lang = self.encode(lang, lang_mask)
        return lang, self.decode(img, lang, img_mask, lang_mask)


class AttFlat(nn.Module):
    """Attention pooling over a sequence (one glimpse) followed by a Linear to `flat_out`."""

    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.flat_mlp),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.flat_mlp, 1),
        )
        self.merge = nn.Linear(cfg.hidden, cfg.flat_out)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        att = masked_softmax(self.mlp(x), mask[..., None], dim=1)  # (B, T, 1)
        return self.merge((att * x).sum(1))  # (B, flat_out)


class TokenMatch(nn.Module):
    """Each query token looks for its evidence among the boxes; a pair scores as well as its worst-matched token.

    s_i = MLP([l_i, v_i, l_i * v_i]) with v_i = MHA(l_i, boxes); score = -logsumexp_i(-s_i) over real tokens.
    """

    def __init__(self, cfg: MCANConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.score = nn.Sequential(nn.Linear(3 * cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))

    def forward(self, lang: Tensor, img: Tensor, lang_mask: Tensor, img_mask: Tensor) -> Tensor:
        v = self.att(lang, img, img, img_mask)  # (B, T, H): each token's view of the boxes
        s = self.score(torch.cat([lang, v, lang * v], dim=-1)).squeeze(-1)  # (B, T)
        return -torch.logsumexp(masked_fill(-s, lang_mask), dim=1)  # (B,) soft minimum over real tokens


class MCAN(nn.Module):
    def __init__(self, cfg: MCANConfig, backbone: PreTrainedModel):
        """`backbone` is a transformers encoder; only its `embeddings` module is kept."""
        super().__init__()
        self.cfg = cfg
        self.embeddings = backbone.embeddings
        self.lang_proj = nn.Linear(backbone.config.hidden_size, cfg.hidden)
        self.image_input = ImageInput(cfg.label_dim, cfg.num_labels, cfg.feature_norm)
        d, inner = self.image_input.out_dim, cfg.img_mlp or self.image_input.out_dim
        self.img_proj = nn.Sequential(nn.Linear(d, inner), nn.ReLU(), nn.Linear(inner, cfg.hidden))
        self.embeddings.word_embeddings.weight.requires_grad_(cfg.train_word_embeddings)
        self.mca = MCAEncoderDecoder(cfg)
        self.lang_flat = AttFlat(cfg)
        self.img_flat = AttFlat(cfg)
        self.fuse_norms = nn.ModuleList(LayerNorm(cfg.flat_out) for _ in range(4))
        self.classifier = nn.Sequential(
            nn.Linear(4 * cfg.flat_out, 2 * cfg.flat_out), nn.ReLU(), nn.Linear(2 * cfg.flat_out, 1)
        )
        self.token_match = TokenMatch(cfg) if cfg.token_match else None

    @classmethod
    def from_config(cls, cfg: MCANConfig) -> MCAN:
        return cls(cfg, load_pretrained_encoder(cfg.backbone, num_layers=0, pretrained=cfg.pretrained))

    @property
    def fused_dim(self) -> int:
        return 4 * self.cfg.flat_out

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.embeddings.parameters())

    def encode_lang(self, input_ids: Tensor, lang_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The text side, which never sees the image: encoder output (B, T, H) and its AttFlat (B, flat_out)."""
        lang_mask = lang_mask.bool()
        lang = self.mca.encode(self.lang_proj(self.embeddings(input_ids=input_ids)), lang_mask)  # (B, T, H)
        return lang, self.lang_flat(lang, lang_mask)

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        lang_mask, img_mask = batch["attention_mask"].bool(), batch["img_mask"].bool()
        img = on_real_boxes(lambda *box: self.img_proj(self.image_input(*box)),  # (R, 2086) -> (R, H)
                            img_mask, batch["img_feat"], batch["img_box"], batch["img_label"])  # (B, N, H)
        if self.training:  # (the order of the random draws and gradient sums as it always was)
            lang = self.lang_proj(self.embeddings(input_ids=batch["input_ids"]))  # (B, T, H)
            lang, img = self.mca(lang, img, lang_mask, img_mask)
            t = self.lang_flat(lang, lang_mask)  # (B, flat_out)
        else:  # scoring: ~30 candidates share each query, whose text is encoded once
            lang, t = once_per_query(self.encode_lang, batch["input_ids"], lang_mask)
            img = self.mca.decode(img, lang, img_mask, lang_mask)
        v = self.img_flat(img, img_mask)  # (B, flat_out)
        z = torch.cat([norm(f) for norm, f in zip(self.fuse_norms, (t, v, t * v, (t - v).abs()))], dim=-1)
        logits = self.classifier(z).squeeze(-1)
        if self.token_match is not None:
            logits = logits + self.token_match(lang, img, lang_mask, img_mask)
        return RankerOutput(logits=logits, fused=z)
