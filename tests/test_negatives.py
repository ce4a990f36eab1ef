"""TF-IDF hard-negative pools and the 1:k triple sampler (the 1st place's)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmrecall.data.negatives import HardNegativeSampler, build_pools, group_queries, tfidf_matrix

WORDS = "red blue green black white cotton silk wool dress shirt skirt kettle lamp chair sofa mug cup bag shoe hat"
WORDS = WORDS.split()


@pytest.fixture(scope="module")
def train():
    """~600 rows: random 2-4 word queries (some repeated texts), products unique per row."""
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5), replace=False)) for _ in range(250)]
    rows = [texts[i] for i in rng.integers(0, len(texts), size=600)]  # repeated texts -> multi-row queries
    product = rng.permutation(10**6)[: len(rows)]
    queries, row_query = group_queries(rows)
    return queries, row_query, product


def test_group_queries_merges_identical_texts():
    queries, row_query = group_queries(["a b", "c", "a b", "d", "c"])
    assert queries == ["a b", "c", "d"]
    assert row_query.tolist() == [0, 1, 0, 2, 1]


def test_tfidf_is_binary_idf_log2_and_l2_normalised():
    x = tfidf_matrix(["red red dress", "red kettle", "blue kettle", "blue lamp"]).toarray()
    # vocab in first-seen order: red, dress, kettle, blue, lamp; N=4, df = 2,1,2,2,1
    idf = {"red": 1.0, "dress": 2.0, "kettle": 1.0, "blue": 1.0, "lamp": 2.0}
    row0 = np.array([idf["red"], idf["dress"], 0, 0, 0])  # repeated word counts once
    assert np.allclose(x[0], row0 / np.linalg.norm(row0))
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0)


def test_pool_ranks_queries_sharing_words_first():
    queries = ["red cotton dress", "red silk dress", "blue kettle", "green lamp", "cotton shirt", "black chair",
               "wooden sofa", "steel mug"]  # fmt: skip
    pools = build_pools(queries, 1, np.random.default_rng(0), topk=4)
    assert pools.shape == (8, 3)
    assert pools[0, 0] == 1  # shares two words
    assert pools[0, 1] == 4  # shares one word
    assert pools[0, 2] not in (0, 1, 4)  # padding: unrelated, never itself, distinct
    assert pools[2, 0] not in (2,) and 2 not in pools[2]


def test_pool_sizes_and_never_self(train):
    queries, row_query, _ = train
    sizes = np.bincount(row_query)
    pools = build_pools(queries, sizes, np.random.default_rng(0))
    n_max = sizes.max()
    assert n_max >= 3
    assert pools.shape == (len(queries), 3 * n_max - 1)
    assert not (pools == np.arange(len(queries))[:, None]).any()
    assert all(len(set(p)) == len(p) for p in pools.tolist())  # distinct when data allows it
    assert pools.min() >= 0 and pools.max() < len(queries)


def test_pool_takes_the_most_similar(train):
    queries, row_query, _ = train
    pools = build_pools(queries, np.bincount(row_query), np.random.default_rng(0), topk=6)
    x = tfidf_matrix(queries)
    s = (x @ x.T).toarray()
    np.fill_diagonal(s, -1)
    for q in range(0, len(queries), 17):
        got = s[q, pools[q]]
        assert np.all(np.diff(got) <= 1e-6)  # most similar first
        assert got.min() >= np.sort(s[q])[-5] - 1e-6  # the top 5 similarities


def test_blockwise_equals_one_shot(train):
    queries, row_query, _ = train
    sizes = np.bincount(row_query)
    one = build_pools(queries, sizes, np.random.default_rng(1), block_rows=10**9, max_block_nnz=10**12)
    small = build_pools(queries, sizes, np.random.default_rng(1), block_rows=7)
    tight = build_pools(queries, sizes, np.random.default_rng(1), max_block_nnz=50)
    assert np.array_equal(one, small) and np.array_equal(one, tight)


def test_tiny_data_pads_with_replacement_but_never_self():
    pools = build_pools(["a b", "a c", "d"], np.array([2, 1, 1]), np.random.default_rng(0))
    assert pools.shape == (3, 5)
    assert not (pools == np.arange(3)[:, None]).any()
    assert pools[0, 0] == 1


@pytest.mark.parametrize("k", [1, 10])
def test_triples_exact_ratio_and_no_false_self_negatives(train, k):
    queries, row_query, product = train
    pools = build_pools(queries, np.bincount(row_query), np.random.default_rng(0))
    sampler = HardNegativeSampler.from_row_queries(row_query, pools, k=k)
    t = sampler.sample(42)
    assert len(t.query) == len(t.positive) == len(t.negative) == len(sampler) == k * len(row_query)
    assert np.array_equal(np.bincount(t.positive, minlength=len(row_query)), np.full(len(row_query), k))
    assert np.array_equal(row_query[t.positive], t.query)
    assert not (row_query[t.negative] == t.query).any()
    positives = {q: set(product[row_query == q]) for q in range(len(queries))}
    assert not any(product[n] in positives[q] for q, n in zip(t.query.tolist(), t.negative.tolist()))
    # negatives come from the anchor's pool
    assert all(row_query[n] in pools[q] for q, n in zip(t.query.tolist(), t.negative.tolist()))


def test_negatives_of_one_repetition_are_distinct_queries(train):
    queries, row_query, _ = train
    pools = build_pools(queries, np.bincount(row_query), np.random.default_rng(0))
    sampler = HardNegativeSampler.from_row_queries(row_query, pools, k=10)
    t = sampler.sample(0)
    q = int(np.argmax(sampler.sizes))
    n = sampler.sizes[q]
    neg_q = row_query[t.negative[t.query == q]].reshape(n, 10)  # (positive, repetition)
    assert all(len(set(neg_q[:, r])) == n for r in range(10))


def test_deterministic_for_a_seed(train):
    queries, row_query, _ = train
    sizes = np.bincount(row_query)
    p1 = build_pools(queries, sizes, np.random.default_rng(5))
    p2 = build_pools(queries, sizes, np.random.default_rng(5))
    assert np.array_equal(p1, p2)
    s = HardNegativeSampler.from_row_queries(row_query, p1, k=3)
    a, b, c = s.sample(9), s.sample(np.random.default_rng(9)), s.sample(10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(a.positive, c.positive) and not np.array_equal(a.negative, c.negative)


def test_list_constructor_and_small_pool_with_replacement():
    # query 0 has 3 positives but a pool of 2 -> sampled with replacement, never itself
    positives = [[0, 1, 2], [3], [4, 5]]
    pools = np.array([[1, 2], [2, 0], [0, 1]])
    t = HardNegativeSampler(positives, pools, k=4).sample(0)
    owner = np.array([0, 0, 0, 1, 2, 2])
    assert len(t.query) == 4 * 6
    assert not (owner[t.negative] == t.query).any()
    with pytest.raises(ValueError):
        HardNegativeSampler(positives, np.array([[0, 1], [2, 0], [0, 1]]), k=1)


def test_uniform_over_pool_and_rows():
    # one anchor with 1 positive, pool of 3 queries; each has 2 rows -> 6 rows equally likely
    positives = [[0], [1, 2], [3, 4], [5, 6]]
    pools = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    t = HardNegativeSampler(positives, pools, k=6000).sample(1)
    counts = np.bincount(t.negative[t.query == 0], minlength=7)[1:]
    assert counts.sum() == 6000 and np.all(np.abs(counts - 1000) < 5 * math.sqrt(1000))


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_random_negatives_share_and_never_own_query(train, rate):
    queries, row_query, _ = train
    pools = build_pools(queries, np.bincount(row_query), np.random.default_rng(0))
    sampler = HardNegativeSampler.from_row_queries(row_query, pools, k=4)
    t = sampler.sample(7, random_rate=rate)
    assert np.array_equal(row_query[t.positive], t.query)  # positives untouched
    assert not (row_query[t.negative] == t.query).any()  # never a row of the anchor's own query
    outside = np.mean([row_query[n] not in pools[q] for q, n in zip(t.query.tolist(), t.negative.tolist())])
    pool_share = pools.shape[1] / len(queries)  # a random query may also happen to be in the pool
    assert outside == pytest.approx(rate * (1 - pool_share), abs=0.05)
    assert np.array_equal(sampler.sample(7, random_rate=rate).negative, t.negative)  # deterministic
    with pytest.raises(ValueError, match="random_rate"):
        sampler.sample(7, random_rate=1.5)


def test_neighbour_rows_come_from_the_pool_never_own_query(train):
    queries, row_query, _ = train
    pools = build_pools(queries, np.bincount(row_query), np.random.default_rng(0))
    sampler = HardNegativeSampler.from_row_queries(row_query, pools, k=1)
    anchors = np.repeat(np.arange(len(queries)), 20)
    rows = sampler.neighbour_rows(np.random.default_rng(5), anchors)
    assert all(row_query[r] in pools[q] for q, r in zip(anchors.tolist(), rows.tolist()))
    assert not (row_query[rows] == anchors).any()
    assert np.array_equal(rows, sampler.neighbour_rows(np.random.default_rng(5), anchors))
