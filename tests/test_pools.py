"""The `pools` stage: similar-query lists of the train store, capped, sharded, read back by every train member."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from mmrecall.config import TrainParams
from mmrecall.data import pools as pool_files
from mmrecall.config import ParamsError
from mmrecall.data.batching import TrainBatches, TrainData
from mmrecall.data.negatives import build_pools, group_queries, pad_pools, pool_size, shard_bounds, similar_queries
from mmrecall.data.store import FeatureStore
from mmrecall.errors import MissingInputError, UserError
from mmrecall.models.backbone import load_tokenizer
from mmrecall.stages import pools, prepare

from .test_negatives import WORDS


@pytest.fixture(scope="module")
def train_store(micro_data, tmp_path_factory):
    """features/train of the micro data, and the `pools` stage's output for it."""
    root = tmp_path_factory.mktemp("pools")
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prepare.main(["--split", "train", "--tsv", str(micro_data / "train" / "train.tsv"), "--no-progress"])
        assert pools.main([]) == 0
    return root


def test_stage_output_shape_cap_and_never_self(train_store):
    meta = json.loads((train_store / "pools" / "meta.json").read_text())
    texts, row_query = group_queries(FeatureStore.open(train_store / "features" / "train").rows.query_clean.tolist())
    assert meta["queries"] == len(texts) and meta["rows"] == len(row_query)
    assert meta["size"] == min(3 * np.bincount(row_query).max() - 1, 64) == meta["largest_group"] * 3 - 1
    neighbours, size = pool_files.load(train_store / "pools", texts)
    assert neighbours.indptr.dtype == np.int64 and neighbours.indices.dtype == np.int32
    counts = np.diff(neighbours.indptr)
    assert len(counts) == len(texts) and counts.max() <= size and counts.sum() == meta["neighbours"]
    owner = np.repeat(np.arange(len(texts)), counts)
    assert not (neighbours.indices == owner).any()
    # the stored lists are exactly the unpadded part of the 1st place's pools
    full = build_pools(texts, np.bincount(row_query), np.random.default_rng(0))
    assert all(np.array_equal(full[q, : counts[q]], neighbours.indices[neighbours.indptr[q]: neighbours.indptr[q + 1]])
               for q in range(len(texts)))


def test_stage_is_deterministic_and_checked_against_the_queries(train_store, tmp_path):
    texts, _ = group_queries(FeatureStore.open(train_store / "features" / "train").rows.query_clean.tolist())
    again = tmp_path / "again"
    pool_files.build(train_store / "features" / "train", again, cap=64, shard_queries=100_000)
    for name in (pool_files.INDPTR, pool_files.INDICES):
        assert (again / name).read_bytes() == (train_store / "pools" / name).read_bytes()
    a, size = pool_files.load(again, texts)
    assert np.array_equal(pad_pools(a, size, np.random.default_rng(4)), pad_pools(a, size, np.random.default_rng(4)))
    with pytest.raises(UserError, match="other train queries"):
        pool_files.load(again, texts[:-1] + ["something else"])
    with pytest.raises(MissingInputError, match="mmrecall pools"):
        pool_files.load(tmp_path / "none", texts)


def test_train_data_draws_from_the_stage_output(train_store):
    store = FeatureStore.open(train_store / "features" / "train")
    data = TrainData(store, load_tokenizer(), TrainParams(), seed=3, pairwise=False, pools=train_store / "pools")
    neighbours, size = pool_files.load(train_store / "pools", group_queries(store.rows.query_clean.tolist())[0])
    assert np.array_equal(data.sampler.pools, pad_pools(neighbours, size, np.random.default_rng(3)))
    assert data.sampler.pools.dtype == np.int32
    with pytest.raises(MissingInputError):
        TrainData(store, load_tokenizer(), TrainParams(), seed=3, pairwise=False, pools=train_store / "missing")


def test_swap_negatives_pair_the_positive_image_with_a_swapped_query(train_store):
    store, tokenizer = FeatureStore.open(train_store / "features" / "train"), load_tokenizer()

    def batch(share: float):
        params = TrainParams(batch_size=32, swap_negatives=share)
        data = TrainData(store, tokenizer, params, seed=3, pairwise=False, pools=train_store / "pools")
        return data, next(iter(TrainBatches(data, epoch=0, n_batches=1)))

    data, plain = batch(0.0)
    assert data.swaps is None
    assert torch.equal(plain["pos"]["input_ids"], plain["neg"]["input_ids"])  # the query's own text
    data, swapped = batch(1.0)
    assert len(data.swaps) > 0
    pos, neg = swapped["pos"], swapped["neg"]
    texts = tokenizer.batch_decode(pos["input_ids"], skip_special_tokens=True)
    neg_texts = tokenizer.batch_decode(neg["input_ids"], skip_special_tokens=True)
    changed = [i for i, (a, b) in enumerate(zip(texts, neg_texts)) if a != b]
    assert len(changed) > len(texts) // 2
    n = min(pos["img_feat"].shape[1], neg["img_feat"].shape[1])
    for i in changed:  # the positive's own image under another query
        assert torch.equal(pos["img_feat"][i, :n], neg["img_feat"][i, :n]) and pos["img_mask"][i].sum() == neg["img_mask"][i].sum()
    with pytest.raises(ParamsError, match="swap_negatives"):
        TrainData(store, tokenizer, TrainParams(swap_negatives=1.5), seed=3, pairwise=False, pools=train_store / "pools")


def test_pool_memory_is_bounded_by_the_cap_not_the_largest_group():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=3, replace=False)) for _ in range(400)]
    queries, row_query = group_queries(texts + [texts[0]] * 500)  # one query with 500+ rows
    groups = np.bincount(row_query)
    assert groups.max() > 500 and pool_size(groups) > 1500
    size = pool_size(groups, cap=16)
    pools = pad_pools(similar_queries(queries, size), size, rng)
    assert pools.shape == (len(queries), 16) and pools.dtype == np.int32
    assert not (pools == np.arange(len(queries))[:, None]).any()


def test_shards_bound_the_search_and_one_shard_is_the_whole_search():
    rng = np.random.default_rng(1)
    queries = sorted({" ".join(rng.choice(WORDS, size=rng.integers(2, 4), replace=False)) for _ in range(600)})
    assert shard_bounds(10, 4) == [(0, 3), (3, 7), (7, 10)] and shard_bounds(10, None) == [(0, 10)]
    whole = similar_queries(queries, 8)
    assert all(np.array_equal(a, b) for a, b in zip(whole, similar_queries(queries, 8, shard_queries=len(queries))))
    sharded = similar_queries(queries, 8, shard_queries=200)
    for lo, hi in shard_bounds(len(queries), 200):
        got = sharded.indices[sharded.indptr[lo]: sharded.indptr[hi]]
        assert len(got) and got.min() >= lo and got.max() < hi
