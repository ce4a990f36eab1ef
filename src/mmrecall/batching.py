"""From the feature store to model batches.

A batch is a dict of tensors that every model accepts (each ignores what it does not use):
  input_ids (B, T), attention_mask (B, T)           the query, tokenised once per distinct text
  img_feat (B, N, 2048), img_box (B, N, 6),          the candidate's boxes, zero-padded to the
  img_label (B, N), img_mask (B, N) True = real box  largest box count in the batch
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampler import group_queries
from .store import FeatureStore
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

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        mask = self.mask[idx]
        T = max(int(mask.sum(1).max()), 1)  # trim the padding every row of the batch shares
        return {"input_ids": torch.from_numpy(self.ids[idx, :T]), "attention_mask": torch.from_numpy(mask[:, :T])}


def image_batch(store: FeatureStore, rows: np.ndarray, max_boxes: int | None = None) -> dict[str, torch.Tensor]:
    """Padded box tensors of the given store rows (the first `max_boxes` boxes of each, if set)."""
    offsets = store.rows.offset.to_numpy()[rows]
    counts = store.rows.n_kept.to_numpy()[rows]
    if max_boxes:
        counts = np.minimum(counts, max_boxes)
    B, N = len(rows), max(int(counts.max()), 1)
    feat = np.zeros((B, N, FEATURE_DIM), np.float32)
    box = np.zeros((B, N, BOX_DIM), np.float32)
    label = np.zeros((B, N), np.int64)
    mask = np.zeros((B, N), bool)
    for b, (o, n) in enumerate(zip(offsets, counts)):
        feat[b, :n] = store.features[o : o + n]
        box[b, :n] = store.boxes[o : o + n]
        label[b, :n] = store.labels[o : o + n]
        mask[b, :n] = True
    return {
        "img_feat": torch.from_numpy(feat),
        "img_box": torch.from_numpy(box),
        "img_label": torch.from_numpy(label),
        "img_mask": torch.from_numpy(mask),
    }


class EvalBatches:
    """Every row of an evaluation store, in store order, as model batches."""

    def __init__(self, store: FeatureStore, tokenizer, max_len: int, batch_size: int, max_boxes: int | None = None):
        self.store, self.batch_size, self.max_boxes = store, batch_size, max_boxes
        texts, self.query_of_row = group_queries(store.rows.query_clean.tolist())
        self.tokens = QueryTokens.build(texts, tokenizer, max_len)

    def __len__(self) -> int:
        return (len(self.store) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.store), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(self.store)))
            yield {**self.tokens.batch(self.query_of_row[rows]), **image_batch(self.store, rows, self.max_boxes)}
