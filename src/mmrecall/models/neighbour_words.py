"""Neighbour words: a member with no gradient steps, which reads a candidate's query words off its nearest
train images.

Not one of the winning systems: a project member that transfers words by nearest neighbours. Fitting keeps
a *memory* of train boxes: the `boxes` largest boxes of each train image (their ROI features, standardised per
dimension over the memory and L2-normalised), each with the words of its image's train query. A candidate
image's `boxes` largest boxes are looked up in turn; a box's k nearest memory boxes (cosine) vote for their
queries' words, weighted by similarity, and the image scores as its best box:

    share(w, box) = sum_{n in kNN(box)} s_n [w in query(n)] / sum_n s_n,   s_n = max(cos, 0)
    score(q, image) = max_{box}  mean_{w in q} log(share(w, box) + floor)

so the read-out is whatever the nearest train images were called, however an attribute looks in each
category: no linear probe or learned detector has to find one direction per word. With `boxes: 1` the
product must be the largest box; with 2 a product shown small beside a large clutter box (a person wearing
it, a room) is still found, at no cost on images whose product is the large box (BENCHMARKS.md). The
member's fused vector is its best box's share of every word (its neighbours' vocabulary profile), which the
re-ranker's consensus compares between candidates; its details are the weakest and strongest of the query's
words there, and it names that box (`best_box`) for the re-ranker's box view.

Words are the backbone tokenizer's WordPiece tokens, as in the word detector (`frequent_token_rows`): the
`max_words - 1` most frequent tokens of the train queries; any other token counts as no word. Fitting reads the
train store once (`fit_memory`, in the train stage instead of an optimizer); beyond `memory_rows` images it
keeps a seeded random subset (`memory_subset`), so a checkpoint stays small on the full data (50,000 images of
2 boxes: ~400 MB) and only those images' boxes are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data.tsv import AREA  # img_box column of the box area
from .backbone import SHIPPED, load_backbone_config, load_tokenizer
from .image_input import FEAT_DIM, RankerOutput
from .word_detector import UNKNOWN, first_occurrence, frequent_token_rows, query_words

MEMORY_CHUNK = 8192  # memory images compared at a time (a float32 copy of 64 MB)


@dataclass
class NeighbourWordsConfig:
    k: int = 40  # nearest train boxes voting for their words
    boxes: int = 2  # largest boxes per image: remembered for each train image, looked up for each candidate
    max_words: int = 1024  # word rows: the most frequent train tokens (row 0: any other token)
    memory_rows: int = 50000  # train images kept (a seeded random subset beyond)
    floor: float = 0.05  # added to a word's share before its log: a word no neighbour names costs log(floor)
    backbone: str = SHIPPED  # the tokenizer whose token ids name the words


def largest_boxes(img_box: Tensor, img_mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(B, n) slots of each image's n largest boxes by area, largest first (ties: the earlier box), and (B, n)
    True at a real box. A row without boxes gets its first slot (zeros) as its box, so it still has a score."""
    area = img_box[..., AREA].masked_fill(~img_mask.bool(), float("-inf"))  # (B, N)
    slots = area.sort(dim=1, descending=True, stable=True).indices[:, :n]  # (B, min(n, N))
    real = img_mask.bool().gather(1, slots)
    real[:, 0] = True
    return slots, real


class NeighbourWords(nn.Module):
    trainable: ClassVar[bool] = False  # fitted by `fit_memory` in the train stage: no optimizer steps

    def __init__(self, cfg: NeighbourWordsConfig, token_vocab_size: int):
        super().__init__()
        if cfg.k < 1 or cfg.max_words < 2 or cfg.memory_rows < 1:
            raise ValueError(f"neighbour_words needs k >= 1, max_words >= 2 and memory_rows >= 1, got {cfg}")
        self.cfg = cfg
        # token id -> word row; all UNKNOWN until fitted. The memory is empty until `fit_memory`; a checkpoint's
        # memory size is taken from its state dict (load_state_dict).
        self.register_buffer("word_row", torch.zeros(token_vocab_size, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(FEAT_DIM))
        self.register_buffer("scale", torch.ones(FEAT_DIM))
        self.register_buffer("memory", torch.zeros(0, FEAT_DIM, dtype=torch.float16))  # (M, 2048) unit rows
        self.register_buffer("memory_words", torch.zeros(0, 1, dtype=torch.int16))  # (M, T) word rows, UNKNOWN pads

    @classmethod
    def from_config(cls, cfg: NeighbourWordsConfig) -> NeighbourWords:
        return cls(cfg, load_backbone_config(cfg.backbone).vocab_size)

    @property
    def fused_dim(self) -> int:
        return self.cfg.max_words

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []

    def fit_vocabulary(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Word rows for the `max_words - 1` most frequent tokens of these train queries (Q, T)."""
        self.word_row.copy_(frequent_token_rows(input_ids, attention_mask, len(self.word_row), self.cfg.max_words))
        tokenizer = load_tokenizer(self.cfg.backbone)
        ids = self.word_row.nonzero().squeeze(1)
        punctuation = [not any(c.isalnum() for c in t) for t in tokenizer.convert_ids_to_tokens(ids.tolist())]
        self.word_row[ids[torch.tensor(punctuation, dtype=torch.bool)]] = UNKNOWN  # "'" of "men's": no word

    def memory_subset(self, n: int, seed: int) -> np.ndarray:
        """The train images to remember out of `n`: all, or `memory_rows` of them drawn from `seed` (sorted)."""
        if n <= self.cfg.memory_rows:
            return np.arange(n)
        return np.sort(np.random.default_rng(seed).choice(n, self.cfg.memory_rows, replace=False))

    def fit_memory(self, features: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Remember train boxes (the `boxes` largest of each image of `memory_subset`): `features` (M, 2048)
        their ROI features, `input_ids` / `attention_mask` (M, T) their image's query tokens."""
        if len(features) == 0:
            raise ValueError("neighbour_words: no train boxes to remember")
        x = torch.from_numpy(np.asarray(features, np.float32))  # (M, 2048)
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0) + 1e-6)
        self.memory = self._unit(x).half()
        rows, valid = self._words(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        self.memory_words = rows.masked_fill(~valid, UNKNOWN).to(torch.int16)

    def _unit(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.scale
        return x / (x.norm(dim=-1, keepdim=True) + 1e-6)

    def _words(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) word row of each token and (B, T) True at each distinct known word."""
        rows = self.word_row[input_ids]
        valid = query_words(input_ids, attention_mask) & (rows != UNKNOWN)
        return rows, first_occurrence(rows, valid)

    def word_shares(self, x: Tensor) -> Tensor:
        """(B, max_words) each box's similarity-weighted share of nearest memory boxes naming each word
        (row UNKNOWN: 0), from (B, 2048) box features."""
        if not len(self.memory):
            raise RuntimeError("neighbour_words: fit_memory must run before scoring")
        q, k = self._unit(x.float()), min(self.cfg.k, len(self.memory))
        sims, indices = [], []
        for start in range(0, len(self.memory), MEMORY_CHUNK):  # float32 copies of MEMORY_CHUNK images at a time
            chunk = self.memory[start:start + MEMORY_CHUNK].float()
            top = (q @ chunk.T).topk(min(k, len(chunk)), dim=1)
            sims.append(top.values)
            indices.append(top.indices + start)
        top = torch.cat(sims, 1).topk(k, dim=1)  # (B, K) the k nearest over every chunk
        nearest = torch.cat(indices, 1).gather(1, top.indices)
        weight = top.values.clamp(min=0)
        weight = weight / weight.sum(1, keepdim=True).clamp(min=1e-6)  # (B, K)
        words = self.memory_words[nearest].long()  # (B, K, T)
        shares = torch.zeros(len(x), self.cfg.max_words, device=x.device)
        shares.scatter_add_(1, words.flatten(1), weight[..., None].expand(words.shape).flatten(1))
        shares[:, UNKNOWN] = 0.0
        return shares

    def forward(self, batch: dict[str, Tensor]) -> RankerOutput:
        slots, real = largest_boxes(batch["img_box"], batch["img_mask"], self.cfg.boxes)  # (B, m)
        B, m = slots.shape
        x = batch["img_feat"].gather(1, slots[..., None].expand(B, m, batch["img_feat"].shape[-1]))  # (B, m, 2048)
        shares = self.word_shares(x.flatten(0, 1)).view(B, m, -1)  # (B, m, V)
        rows, valid = self._words(batch["input_ids"], batch["attention_mask"])  # (B, T)
        n = valid.sum(-1)
        share = shares.gather(2, rows[:, None, :].expand(B, m, rows.shape[1]))  # (B, m, T) each query word's share
        per_box = (share + self.cfg.floor).log().masked_fill(~valid[:, None, :], 0.0).sum(-1) / n.clamp(min=1)[:, None]
        score, best = per_box.masked_fill(~real, float("-inf")).max(dim=1)  # (B,) the best box's
        at_best = torch.arange(B, device=best.device), best
        share = share[at_best]  # (B, T)
        details = {"word_min": share.masked_fill(~valid, float("inf")).amin(-1),
                   "word_max": share.masked_fill(~valid, float("-inf")).amax(-1)}
        details = {name: torch.where(n > 0, value, torch.zeros_like(value)) for name, value in details.items()}
        return RankerOutput(logits=score, fused=shares[at_best], details=details, best_box=slots[at_best])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A fitted memory has its own number of images: size the buffers to the checkpoint's before loading."""
        for name in ("memory", "memory_words"):
            if name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[name]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
