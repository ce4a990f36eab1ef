"""From the feature store to model batches: every row of an evaluation split, and the training batches.

A batch is a dict of tensors that every model accepts (each ignores what it does not use):
  input_ids (B, T), attention_mask (B, T)           the query, tokenised once per distinct text
  img_feat (B, N, 2048), img_box (B, N, 6),          the candidate's boxes, zero-padded to the
  img_label (B, N), img_mask (B, N) True = real box  largest box count in the batch
  img_index (B, N)                                   each slot's box: its position among the image's boxes

Training batches (`TrainBatches`) hold (query, positive, hard negative) triples as {"pos": batch, "neg": batch},
or, for a model with an in-batch loss (two-tower, word detectors), positive pairs as {"pos": batch, "query": (B,) query index}; what an
epoch's batches hold depends only on (seed, epoch, rank). With `train.swap_negatives` > 0 a share of the
negatives are word swaps (data/swaps.py): in "neg", the positive image under its query with one word swapped;
for the two-tower, the swapped texts as "swapped": {input_ids, attention_mask}, negatives of every image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..config import BOX_SELECT, ParamsError, TrainParams
from . import pools as pool_files
from .negatives import HardNegativeSampler, group_queries, pad_pools
from .store import FeatureStore
from .swaps import WordSwaps
from .tsv import BOX_DIM, FEATURE_DIM


@dataclass
class QueryTokens:
    """Token ids of distinct query texts: ids (Q, T) int64, mask (Q, T) int64."""

    ids: np.ndarray
    mask: np.ndarray

    @classmethod
    def build(cls, texts: list[str], tokenizer, max_len: int) -> "QueryTokens":
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
        return cls(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))

    @classmethod
    def encode(cls, texts: list[str], tokenizer, max_len: int) -> dict[str, torch.Tensor]:
        """One model batch of `texts`, in order (texts made on the fly, such as swapped queries)."""
        return cls.build(texts, tokenizer, max_len).batch(np.arange(len(texts)))

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        mask = self.mask[idx]
        T = max(int(mask.sum(1).max()), 1)  # trim the padding every row of the batch shares
        return {"input_ids": torch.from_numpy(self.ids[idx, :T]), "attention_mask": torch.from_numpy(mask[:, :T])}


def image_batch(store: FeatureStore, rows: np.ndarray, max_boxes: int | None = None,
                box_select: str = "first") -> dict[str, torch.Tensor]:
    """Padded box tensors of the given store rows: every box of each, or at most `max_boxes` if set.

    An image with more boxes than `max_boxes` keeps its first ones in file order (box_select "first", the
    1st place's way), or its largest ones by area, still in file order ("largest"): the detector does not
    always list the product first, and the product is the large box of a product photo.
    """
    if box_select not in BOX_SELECT:
        raise ValueError(f"box_select must be one of {BOX_SELECT}, got {box_select!r}")
    offsets = store.rows.offset.to_numpy()[rows]
    full = store.rows.n_kept.to_numpy()[rows]
    counts = np.minimum(full, max_boxes) if max_boxes else full
    B, N = len(rows), max(int(counts.max()), 1)
    mask = np.arange(N)[None, :] < counts[:, None]  # (B, N)
    src = offsets[:, None] + np.arange(N)[None, :]  # (B, N) store box of each slot: the first ones
    over = np.flatnonzero(counts < full) if box_select == "largest" else []
    if len(over):  # each over-cap image's max_boxes largest (ties: the earlier box), in file order
        src[over, :max_boxes] = np.sort(store.largest_boxes(max_boxes, rows[over]), axis=1)
    keep = src[mask]  # one gather per array instead of one slice per image
    feat = np.zeros((B, N, FEATURE_DIM), store.features.dtype)  # float16 in a store: torch widens it ~15x faster
    box = np.zeros((B, N, BOX_DIM), np.float32)
    label = np.zeros((B, N), np.int64)
    feat[mask] = store.features[keep]
    box[mask] = store.boxes[keep]
    label[mask] = store.labels[keep]
    return {
        "img_feat": torch.from_numpy(feat).float(),
        "img_box": torch.from_numpy(box),
        "img_label": torch.from_numpy(label),
        "img_mask": torch.from_numpy(mask),
        "img_index": torch.from_numpy(src - offsets[:, None]),  # padding slots: past the image's boxes
    }


class EvalBatches:
    """Every row of an evaluation store, in store order, as model batches."""

    def __init__(self, store: FeatureStore, tokenizer, max_len: int, batch_size: int, max_boxes: int | None = None,
                 box_select: str = "first"):
        self.store, self.batch_size, self.max_boxes, self.box_select = store, batch_size, max_boxes, box_select
        texts, self.query_of_row = group_queries(store.rows.query_clean.tolist())
        self.tokens = QueryTokens.build(texts, tokenizer, max_len)

    def __len__(self) -> int:
        return (len(self.store) + self.batch_size - 1) // self.batch_size

    def with_batch_size(self, batch_size: int) -> EvalBatches:
        """The same rows in batches of `batch_size` (sharing the tokenised queries); self if it is the same."""
        if batch_size == self.batch_size:
            return self
        out = copy.copy(self)
        out.batch_size = batch_size
        return out

    def __iter__(self):
        for start in range(0, len(self.store), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(self.store)))
            yield {**self.tokens.batch(self.query_of_row[rows]), **image_batch(self.store, rows, self.max_boxes, self.box_select)}


class TrainData:
    """The train store grouped by cleaned query, tokenised once, with its hard-negative sampler.

    `pools`: the `pools` stage's folder (the similar queries of this store); the pools are padded to
    their fixed size with random queries drawn from `seed`.
    """

    def __init__(self, store: FeatureStore, tokenizer, params: TrainParams, seed: int, pairwise: bool, pools: str | Path):
        self.store, self.params, self.seed, self.pairwise = store, params, seed, pairwise
        if not 0.0 <= params.in_batch_neighbours <= 0.5:
            raise ParamsError(f"params train.in_batch_neighbours must be in [0, 0.5], got {params.in_batch_neighbours}")
        if not 0.0 <= params.swap_negatives <= 1.0:
            raise ParamsError(f"params train.swap_negatives must be in [0, 1], got {params.swap_negatives}")
        self.texts, self.row_query = group_queries(store.rows.query_clean.tolist())
        self.tokenizer = tokenizer
        self.tokens = QueryTokens.build(self.texts, tokenizer, params.max_query_len)
        self.swaps = WordSwaps.from_texts(self.texts) if params.swap_negatives > 0 else None
        neighbours, size = pool_files.load(pools, self.texts)
        pools = pad_pools(neighbours, size, np.random.default_rng(seed))
        self.sampler = HardNegativeSampler.from_row_queries(self.row_query, pools, params.negatives)


class TrainBatches(IterableDataset):
    """`n_batches` batches of one epoch; what they hold depends only on (seed, epoch, rank)."""

    def __init__(self, data: TrainData, epoch: int, n_batches: int, rank: int = 0):
        self.data, self.epoch, self.n_batches, self.rank = data, epoch, n_batches, rank

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        d = self.data
        rng = np.random.default_rng([d.seed, self.epoch, self.rank])
        B = d.params.batch_size
        if d.pairwise:  # two-tower, word detectors: positive pairs, the batch supplies the negatives
            n_near = round(B * d.params.in_batch_neighbours)
            n_anchor = B - n_near
            anchors = np.resize(rng.permutation(len(d.store)), self.n_batches * n_anchor)  # each row once per pass
            for i in range(self.n_batches):
                a = anchors[i * n_anchor : (i + 1) * n_anchor]
                r = np.concatenate([a, d.sampler.neighbour_rows(rng, d.row_query[a[:n_near]])])
                q = d.row_query[r]
                batch = {"pos": {**d.tokens.batch(q), **image_batch(d.store, r, d.params.max_boxes, d.params.box_select)},
                         "query": torch.from_numpy(q)}
                if d.swaps is not None:  # extra negative texts: queries of the batch with one word swapped
                    picked = np.flatnonzero(rng.random(B) < d.params.swap_negatives)
                    texts = [t for t in (d.swaps.swap(d.texts[q[j]], rng) for j in picked) if t is not None]
                    if texts:
                        batch["swapped"] = QueryTokens.encode(texts, d.tokenizer, d.params.max_query_len)
                yield batch
            return
        triples = d.sampler.sample(rng, d.params.random_negatives)
        pick = np.resize(rng.permutation(len(triples.query)), self.n_batches * B)
        for i in range(self.n_batches):
            t = pick[i * B : (i + 1) * B]
            query, pos, neg = triples.query[t], triples.positive[t], triples.negative[t].copy()
            tokens = neg_tokens = d.tokens.batch(query)
            if d.swaps is not None:  # some negatives: the positive image under a query with one word swapped
                texts = [d.texts[q] for q in query]
                for j in np.flatnonzero(rng.random(len(t)) < d.params.swap_negatives):
                    swapped = d.swaps.swap(texts[j], rng)
                    if swapped is not None:
                        texts[j], neg[j] = swapped, pos[j]
                neg_tokens = QueryTokens.encode(texts, d.tokenizer, d.params.max_query_len)
            yield {
                "pos": {**tokens, **image_batch(d.store, pos, d.params.max_boxes, d.params.box_select)},
                "neg": {**neg_tokens, **image_batch(d.store, neg, d.params.max_boxes, d.params.box_select)},
            }
