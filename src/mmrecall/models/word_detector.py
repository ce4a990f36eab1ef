"""Word detectors: a multiple-instance classifier of query words over an image's boxes.

Not one of the winning systems: a project member that checks every word of a query on its own. A box
MLP maps each box (its ROI feature, geometry and detector class) to a code h_b; every word (query token) w
has a learned detector vector d_w and bias c_w, and the detector's logit on a box is <h_b, d_w> + c_w. An
image's score for a query is its best box's mean log-probability over the query's distinct words:

    score(q, image) = max_b  mean_{w in q}  log sigmoid(<h_b, d_w> + c_w)

so a candidate with one named value wrong (a near-miss: "red dress" shown a blue dress) loses that word's
log-probability, and a clutter box that shows only the colour does not stand in for the product.

Training is multi-label: each positive image of a batch should fire the words of its query and not the
other words of the batch (the batch's union of words; a quarter of the batch are the TF-IDF neighbours
of other rows, so those words are the hard ones). The image-level logit of a word pools its box logits
with a log-mean-exp, so the loss does not need to know which box is the product.

A query names only some of its product's attributes, so "not the other words" is only sure for a word that
the query excludes: "blue" for an image of "red dress", but "red" for an image of "cotton dress" may well be
true. Words exclude each other when they fill one slot of a query, seen as sharing far fewer train queries
than chance (`exclusive_rows`: "red" / "blue", "dress" / "sofa"); the other absent words are *open*
negatives and count `open_negative_weight` (0.2) in the loss. On valid this lifted the member on every world
of bench_quality (BENCHMARKS.md). An open word that the bag's other detector finds in the image with more than
`pseudo_threshold` (0.5) probability is trained towards that probability instead of 0 (`pseudo_targets`): the
member gained on valid in 11 of 11 runs, the re-ranker stayed level (BENCHMARKS.md).

Words are WordPiece tokens of the backbone's tokenizer (its [CLS] / [SEP] and padding are skipped); the
`max_words - 1` most frequent tokens of the train queries get a detector (`fit_vocabulary`), row 0 of
the table stands for any other token, which counts as no word at all.

A member can hold a *bag* of `bag` such detectors (`Detector`: a box MLP and a detector table each, each
initialised on its own), trained side by side on the same batches (the mean of their losses). The member's
score and word details are the bag's means, and its fused vector their L2-normalised best-box codes side by
side, so the re-ranker's consensus compares candidates in every detector's view. Its best box (`best_box`) is
the one with the highest bag-mean score: the re-ranker's box view reads that box's ROI feature. A bag of 2 costs twice
the steps of one and, on valid, did what two separately trained word_detector members do (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import SHIPPED, load_backbone_config
from .image_input import BOX_DIM, FEAT_DIM, NUM_LABELS, RankerOutput, feature_norm, masked_fill, on_real_boxes

UNKNOWN = 0  # detector row of tokens without a detector of their own
EXCLUSIVE_RATIO = 0.25  # two words exclude each other when they share fewer queries than this share of chance
LABEL_DIM = 16  # class-label embedding of a box (box_input)


@dataclass
class WordDetectorConfig:
    hidden: int = 1024  # box code size (the box MLP's width)
    layers: int = 2  # ReLU layers of the box MLP
    dropout: float = 0.3  # after the box MLP's first layer
    max_words: int = 4096  # detector rows: the most frequent train tokens (row 0: any other token)
    bag: int = 2  # independent detectors (own box MLP and detector table) averaged into the member's score
    box_input: bool = True  # the box MLP also reads each box's geometry and detector class, not only its feature
    open_negative_weight: float = 0.2  # loss weight of a batch word that the image's query neither names nor excludes
    pseudo_threshold: float = 0.5  # an open word the bag's other detectors see with more than this probability is
    # trained towards that probability, not 0 (a pseudo positive); 0 = off; no open words at open_negative_weight 1
    feature_norm: bool = True  # LayerNorm on the 2048-d ROI features (see image_input.feature_norm)
    backbone: str = SHIPPED  # the tokenizer whose token ids name the words

    # what a checkpoint saved before the field was trained with
    LATER_FIELDS: ClassVar[dict] = {"bag": 1, "box_input": False, "open_negative_weight": 1.0, "pseudo_threshold": 0.0}


def query_words(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) True at the real tokens between the first ([CLS] / <s>) and the last ([SEP] / </s>)."""
    mask = attention_mask.bool()
    position = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    last = mask.sum(1, keepdim=True) - 1  # (B, 1)
    return mask & (position > 0) & (position < last)


def first_occurrence(rows: Tensor, valid: Tensor) -> Tensor:
    """(B, T) `valid` with later repeats of a row's word turned off (each word counts once per query)."""
    same = (rows[:, :, None] == rows[:, None, :]) & valid[:, None, :]  # (B, T, T): position s holds t's word
    earlier = torch.ones(rows.shape[1], rows.shape[1], dtype=torch.bool, device=rows.device).tril(-1)  # s < t
    return valid & ~(same & earlier).any(-1)


def word_details(best_box: Tensor, own_box: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """The re-ranker's view of a candidate's words, from (B, T) word log-probabilities at the best box and
    at each word's own best box: the weakest, second weakest and strongest word at the best box, the
    weakest and the mean at their own boxes. (The score is a mean: a near-miss shows as one weak word.)
    A query without known words gets zeros, as its score."""
    n = valid.sum(-1)  # (B,)
    ascending = best_box.masked_fill(~valid, float("inf")).sort(-1).values  # (B, T) weakest first, padding last
    weakest = ascending[:, 0]
    second = torch.where(n > 1, ascending[:, min(1, ascending.shape[1] - 1)], weakest)
    details = {
        "word_min": weakest,
        "word_second": second,
        "word_max": best_box.masked_fill(~valid, float("-inf")).amax(-1),
        "word_min_own_box": own_box.masked_fill(~valid, float("inf")).amin(-1),
        "word_mean_own_box": (own_box * valid).sum(-1) / n.clamp(min=1),
    }
    return {name: torch.where(n > 0, value, torch.zeros_like(value)) for name, value in details.items()}


def frequent_token_rows(input_ids: np.ndarray, attention_mask: np.ndarray, vocab_size: int, max_words: int) -> Tensor:
    """(vocab_size,) token id -> word row: rows 1.. for the `max_words - 1` most frequent tokens of these queries
    (Q, T), counted once per query text (ties: the smaller token id); UNKNOWN for every other token."""
    words = query_words(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
    counts = Counter(int(t) for q, keep in zip(input_ids, words) for t in set(q[keep].tolist()))
    kept = sorted(counts, key=lambda t: (-counts[t], t))[: max_words - 1]
    word_row = torch.full((vocab_size,), UNKNOWN, dtype=torch.long)
    word_row[torch.tensor(sorted(kept), dtype=torch.long)] = torch.arange(1, len(kept) + 1)
    return word_row


def exclusive_rows(rows: np.ndarray, n: int, chunk: int = 65536) -> Tensor:
    """(n, n) True where detector rows r and s fill one slot of a query ("red" / "blue", "dress" / "sofa"):
    over these (Q, T) query rows (UNKNOWN where no word), they share fewer queries than EXCLUSIVE_RATIO times
    chance (count_r * count_s / Q). A row repeated within a query counts once. Memory: about 22 n^2 bytes
    while counting (the default 4096 rows: 370 MB), n^2 bytes kept."""
    together = np.zeros(n * n, dtype=np.int32)
    for start in range(0, len(rows), chunk):
        r = np.sort(rows[start:start + chunk].astype(np.int64), axis=1)  # (C, T)
        r[:, 1:][r[:, 1:] == r[:, :-1]] = UNKNOWN  # each row once per query
        known = r != UNKNOWN
        pairs = (r[:, :, None] * n + r[:, None, :])[known[:, :, None] & known[:, None, :]]  # (C, T, T) -> pairs
        together += np.bincount(pairs, minlength=n * n).astype(np.int32)
    together = together.reshape(n, n)
    count = np.diag(together).astype(np.float64)
    expected = np.outer(count, count) / max(len(rows), 1)
    return torch.from_numpy(together < EXCLUSIVE_RATIO * expected)


def box_geometry(img_box: Tensor) -> Tensor:
    """(..., 6) normalised top, left, bottom, right, area, aspect -> the same with the aspect (height / width,
    unbounded for a thin box) as its log, clipped to +-log 100."""
    return torch.cat([img_box[..., :5], img_box[..., 5:].clamp(0.01, 100.0).log()], dim=-1)


class BoxEncoder(nn.Module):
    """Box -> code h_b: the LayerNormed ROI feature (with box_input: beside the box's geometry and a class-label
    embedding), then `layers` Linear + ReLU (dropout after the first).

    Geometry and class tell the product from clutter that looks like it (the product box is usually the large
    one); on valid this lifted the member on every world of bench_quality (BENCHMARKS.md)."""

    def __init__(self, cfg: WordDetectorConfig):
        super().__init__()
        self.feature_norm = feature_norm(cfg.feature_norm)
        self.label_embedding = nn.Embedding(NUM_LABELS, LABEL_DIM) if cfg.box_input else None
        blocks: list[nn.Module] = []
        width = FEAT_DIM + (BOX_DIM + LABEL_DIM if cfg.box_input else 0)
        for i in range(cfg.layers):
            blocks += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            if i == 0 and cfg.dropout:
                blocks.append(nn.Dropout(cfg.dropout))
            width = cfg.hidden
        self.mlp = nn.Sequential(*blocks)

    def code(self, img_feat: Tensor, img_box: Tensor, img_label: Tensor) -> Tensor:
        """(R, H) codes of R real boxes."""
        x = self.feature_norm(img_feat)  # (R, 2048)
        if self.label_embedding is not None:
            x = torch.cat([x, box_geometry(img_box), self.label_embedding(img_label)], dim=-1)  # (R, 2048 + 6 + 16)
        return self.mlp(x)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return on_real_boxes(self.code, batch["img_mask"], batch["img_feat"], batch["img_box"], batch["img_label"])  # (B, N, H)


class Detector(nn.Module):
    """One word detector: box codes h_b, and a detector vector d_w and bias c_w per detector row."""

    def __init__(self, cfg: WordDetectorConfig):
        super().__init__()
        self.boxes = BoxEncoder(cfg)
        self.detectors = nn.Embedding(cfg.max_words, cfg.hidden)
        self.bias = nn.Embedding(cfg.max_words, 1)
        bound = 1.0 / math.sqrt(cfg.hidden)  # as an nn.Linear(hidden, words) read-out
        nn.init.uniform_(self.detectors.weight, -bound, bound)
        nn.init.zeros_(self.bias.weight)

    def image_logits(self, batch: dict[str, Tensor], vocab: Tensor) -> Tensor:
        """(B, U) each image's logit of each word of `vocab`: the log-mean-exp over its boxes."""
        h = self.boxes(batch)  # (B, N, H)
        logits = h @ self.detectors(vocab).T + self.bias(vocab).T  # (B, N, U)
        mask = batch["img_mask"].bool()
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
        return torch.logsumexp(logits, dim=1) - torch.log(mask.sum(1, keepdim=True).clamp(min=1))

    def forward(self, batch: dict[str, Tensor], rows: Tensor, valid: Tensor) -> tuple[RankerOutput, Tensor]:
        """This detector's output and its (B, N) per-box scores (masked boxes: the mask value)."""
        h = self.boxes(batch)  # (B, N, H)
        word_logits = torch.einsum("bnh,bth->bnt", h, self.detectors(rows)) + self.bias(rows).squeeze(-1)[:, None, :]
        log_p = F.logsigmoid(word_logits) * valid[:, None, :]  # (B, N, T)
        per_box = log_p.sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)  # (B, N) mean over the query's words
        per_box = masked_fill(per_box, batch["img_mask"])
        score, best = per_box.max(dim=1)  # (B,)
        at_best = torch.arange(len(h), device=h.device), best
        own_box = masked_fill(log_p, batch["img_mask"][..., None]).amax(1)  # (B, T) each word at its own best box
        out = RankerOutput(logits=score, fused=h[at_best], details=word_details(log_p[at_best], own_box, valid),
                           best_box=best)
        return out, per_box


class WordDetector(nn.Module):
    def __init__(self, cfg: WordDetectorConfig, token_vocab_size: int):
        super().__init__()
        if cfg.max_words < 2:
            raise ValueError(f"word_detector max_words must be at least 2, got {cfg.max_words}")
        if cfg.bag < 1:
            raise ValueError(f"word_detector bag must be at least 1, got {cfg.bag}")
        if not 0 <= cfg.pseudo_threshold < 1:
            raise ValueError(f"word_detector pseudo_threshold must be in [0, 1), got {cfg.pseudo_threshold}")
        self.cfg = cfg
        self.nets = nn.ModuleList(Detector(cfg) for _ in range(cfg.bag))
        # token id -> detector row; all UNKNOWN until fit_vocabulary (saved with the weights)
        self.register_buffer("word_row", torch.zeros(token_vocab_size, dtype=torch.long))
        # (max_words, max_words) exclusive_rows of the train queries: set by fit_vocabulary, used in training only
        self.register_buffer("exclusive", None, persistent=False)

    @classmethod
    def from_config(cls, cfg: WordDetectorConfig) -> WordDetector:
        return cls(cfg, load_backbone_config(cfg.backbone).vocab_size)

    @property
    def fused_dim(self) -> int:
        return self.cfg.hidden * self.cfg.bag

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []

    @property
    def vocabulary_size(self) -> int:
        """Tokens with a detector of their own."""
        return int((self.word_row != UNKNOWN).sum())

    def fit_vocabulary(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Give the `max_words - 1` most frequent tokens of these queries (Q, T) a detector row each
        (ties: the smaller token id), once per query text."""
        self.word_row.copy_(frequent_token_rows(input_ids, attention_mask, len(self.word_row), self.cfg.max_words))
        if self.cfg.open_negative_weight != 1.0:  # target_weights needs them
            words = query_words(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
            rows = np.where(words, self.word_row[torch.from_numpy(input_ids)].numpy(), UNKNOWN)  # (Q, T)
            self.exclusive = exclusive_rows(rows, self.cfg.max_words)

    def words(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, T) detector row of each query token and (B, T) True at each distinct known word."""
        rows = self.word_row[batch["input_ids"]]
        valid = query_words(batch["input_ids"], batch["attention_mask"]) & (rows != UNKNOWN)
        return rows, first_occurrence(rows, valid)

    def in_batch_loss(self, batch: dict[str, Tensor], query: Tensor | None = None,
                      swapped: dict[str, Tensor] | None = None) -> Tensor:
        """Multi-label BCE of each positive image against the batch's words: its query's are 1, the rest 0.
        (`query` and `swapped` are not needed: two rows of one query have the same targets.)"""
        rows, valid = self.words(batch)
        vocab, inverse = torch.unique(rows[valid], return_inverse=True)  # (U,) the batch's words
        target = torch.zeros(len(rows), len(vocab), device=rows.device)  # (B, U)
        target[valid.nonzero()[:, 0], inverse] = 1.0
        weight = self.target_weights(rows, valid, vocab, target)
        logits = [net.image_logits(batch, vocab) for net in self.nets]  # bag x (B, U)
        targets = self.pseudo_targets(logits, target, weight)
        return torch.stack([F.binary_cross_entropy_with_logits(lg, t, weight=weight)
                            for lg, t in zip(logits, targets)]).mean()

    def pseudo_targets(self, logits: list[Tensor], target: Tensor, weight: Tensor | None) -> list[Tensor]:
        """Each detector's (B, U) targets: `target`, except that an open word (weight < 1: the query neither
        names nor excludes it) which the bag's OTHER detectors give more than `pseudo_threshold` probability
        (their mean, no gradient; a bag of one: its own) is a soft positive at that probability. A query names
        a few of its product's attributes; this lets the unnamed ones teach too, each detector taught by the
        others so that it does not only confirm itself. Off (`target` for all) at threshold 0."""
        if not self.cfg.pseudo_threshold or weight is None:
            return [target] * len(logits)
        probs = torch.stack([torch.sigmoid(lg.detach()) for lg in logits])  # (bag, B, U)
        total, open_word = probs.sum(0), weight < 1  # own and excluded words weigh 1
        out = []
        for p in probs:
            others = (total - p) / (len(probs) - 1) if len(probs) > 1 else p  # (B, U)
            out.append(torch.where(open_word & (others > self.cfg.pseudo_threshold), others, target))
        return out

    def target_weights(self, rows: Tensor, valid: Tensor, vocab: Tensor, target: Tensor) -> Tensor | None:
        """(B, U) loss weights: 1 for an image's own words and for the words its query excludes ("blue" for
        "red dress"), `open_negative_weight` for the others ("red" for "cotton dress": it may well be red).
        None when that weight is 1."""
        if self.cfg.open_negative_weight == 1.0:
            return None
        if self.exclusive is None:
            raise RuntimeError("word_detector: fit_vocabulary must run before training")
        excluded = (self.exclusive[vocab[:, None, None], rows[None]] & valid[None]).any(-1).T  # (U, B, T) -> (B, U)
        return torch.where((target > 0) | excluded, 1.0, self.cfg.open_negative_weight)

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        rows, valid = self.words(batch)
        outs, per_box = zip(*(net(batch, rows, valid) for net in self.nets))
        return RankerOutput(
            logits=torch.stack([o.logits for o in outs]).mean(0),  # (B,)
            fused=torch.cat([F.normalize(o.fused, dim=-1) for o in outs], -1),  # (B, bag * H)
            details={name: torch.stack([o.details[name] for o in outs]).mean(0) for name in outs[0].details},
            best_box=torch.stack(per_box).mean(0).argmax(1),  # (B,) the box the bag scores highest
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Checkpoints from before the bag (one detector at the top level) load as a bag of one."""
        state_dict = {(f"nets.0.{k}" if k.split(".")[0] in ("boxes", "detectors", "bias") else k): v
                      for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
