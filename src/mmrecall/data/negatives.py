"""TF-IDF similar-query hard negatives, as the 1st place built them.

A "query" here is one distinct *cleaned* query text: rows of train whose cleaned texts are
identical must be grouped into one query by the caller (`group_queries` does it), so that a row
of the same text can never come back as a negative.

    texts, row_query = group_queries(cleaned_texts)                  # one entry per train row
    size = pool_size(np.bincount(row_query), cap=64)                  # 3 * n_max - 1, at most the cap
    neighbours = similar_queries(texts, size, shard_queries=50_000)   # the `pools` stage (data/pools.py)
    pools = pad_pools(neighbours, size, rng)                          # (n_queries, size) int32, per member seed
    sampler = HardNegativeSampler.from_row_queries(row_query, pools, k=10)
    triples = sampler.sample(seed)                                    # re-sample per epoch with a new seed

Pools: binary term presence x idf (idf = log2(N/df), the gensim defaults with the local weight
forced to 1), L2-normalised rows, cosine S = X X^T; per query the most similar queries with
non-zero similarity (itself excluded), padded with random queries. As the 1st place (shards of
~150k rows), similar queries are searched within contiguous shards of queries, so the time grows
linearly in the number of queries; S is computed a block of rows at a time so memory stays bounded.
The pool length is 3 * n_max - 1 (the 1st place) capped (a group of 1,000 rows would otherwise make
every pool 2,999 long).

Triples: for a query with n positive rows, k times: draw n distinct queries from its pool, one
random row of each is the negative of one positive. Similar queries whose products would also fit
(false negatives) are accepted, as in the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp


def group_queries(cleaned: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct cleaned texts (first-occurrence order) and the query index of every row."""
    index: dict[str, int] = {}
    row_query = np.fromiter((index.setdefault(t, len(index)) for t in cleaned), dtype=np.int64, count=len(cleaned))
    return list(index), row_query


def tfidf_matrix(queries: Sequence[str]) -> sp.csr_matrix:
    """(n_queries, vocab) CSR: binary presence x log2(N/df) of whitespace tokens, L2-normalised rows.

    Terms present in every query get idf 0 and are dropped; a query made only of such terms is an
    all-zero row (similar to nothing, its pool is then random).
    """
    vocab: dict[str, int] = {}
    indptr = np.zeros(len(queries) + 1, dtype=np.int64)
    indices: list[int] = []
    for i, q in enumerate(queries):
        indices.extend(sorted({vocab.setdefault(w, len(vocab)) for w in q.split()}))
        indptr[i + 1] = len(indices)
    cols = np.asarray(indices, dtype=np.int64)
    df = np.bincount(cols, minlength=len(vocab))
    idf = np.log2(len(queries) / np.maximum(df, 1))
    x = sp.csr_matrix((idf[cols], cols, indptr), shape=(len(queries), len(vocab)))
    x.eliminate_zeros()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x
    return x.astype(np.float32).tocsr()


def _blocks(x: sp.csr_matrix, block_rows: int, max_block_nnz: int) -> list[tuple[int, int]]:
    """Row ranges of at most block_rows rows whose S-block nnz bound (sum of df) stays in budget."""
    df = np.bincount(x.indices, minlength=x.shape[1])
    bound = np.add.reduceat(np.append(df[x.indices], 0), x.indptr[:-1]) * (np.diff(x.indptr) > 0)
    out, start, acc = [], 0, 0
    for i, b in enumerate(bound):
        if i > start and (i - start >= block_rows or acc + b > max_block_nnz):
            out.append((start, i))
            start, acc = i, 0
        acc += b
    if start < x.shape[0]:
        out.append((start, x.shape[0]))
    return out


def _pad(q: int, chosen: np.ndarray, need: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`need` random query indices, never q; distinct and not in `chosen` whenever n allows it."""
    taken = np.append(chosen, q)
    if n - len(taken) >= need:
        pad = np.empty(0, dtype=np.int64)
        while len(pad) < need:
            draw = rng.integers(0, n, size=2 * (need - len(pad)) + 8)
            draw = draw[~np.isin(draw, taken)]
            _, first = np.unique(draw, return_index=True)
            draw = draw[np.sort(first)][: need - len(pad)]
            pad, taken = np.append(pad, draw), np.append(taken, draw)
        return pad
    # Tiny data: every other query once, then with replacement (still never q).
    free = np.setdiff1d(np.arange(n), taken)
    rest = rng.integers(0, n - 1, size=need - len(free))
    return np.concatenate([rng.permutation(free), rest + (rest >= q)])


class Neighbours(NamedTuple):
    """The most similar other queries of every query (non-zero similarity only), most similar first.

    CSR layout: query q's neighbours are indices[indptr[q] : indptr[q + 1]] (int32 query indices).
    """

    indptr: np.ndarray  # (n_queries + 1,) int64
    indices: np.ndarray  # (n_neighbours,) int32

    def __len__(self) -> int:
        return len(self.indptr) - 1


def pool_size(group_sizes: np.ndarray | int, cap: int | None = None) -> int:
    """Pool length: 3 * the largest group - 1 (the 1st place), at most `cap` (bounds memory on big groups)."""
    size = 3 * int(np.max(group_sizes)) - 1
    return size if cap is None else min(size, int(cap))


def shard_bounds(n: int, shard_queries: int | None) -> list[tuple[int, int]]:
    """Contiguous query ranges of at most `shard_queries` queries, of near-equal sizes (one range if None)."""
    shards = 1 if not shard_queries else max(1, -(-n // int(shard_queries)))
    edges = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def similar_queries(
    queries: Sequence[str],
    size: int,
    shard_queries: int | None = None,
    block_rows: int = 2048,
    max_block_nnz: int = 32_000_000,
) -> Neighbours:
    """Up to `size` most similar other queries of every query, searched within its shard only.

    Like the 1st place (who worked per shard of ~150k rows), similar queries are looked for inside
    contiguous shards of `shard_queries` queries, so the time grows linearly in the number of
    queries (quadratically in the shard size); idf is computed over all queries. Blocks are cut at
    `block_rows` rows or when the nnz bound of the S block exceeds `max_block_nnz`; the result does
    not depend on them. Stored entries of S are exactly the pairs sharing a word (products of positive
    weights); a row's entry order from the sparse product depends on that row only, so the argpartition
    tie-breaking and hence the neighbours do not depend on the blocking.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = tfidf_matrix(queries)
    counts = np.zeros(len(queries), dtype=np.int64)
    parts: list[np.ndarray] = []
    for lo, hi in shard_bounds(len(queries), shard_queries):
        xs = x[lo:hi]
        xt = xs.T.tocsr()
        for start, stop in _blocks(xs, block_rows, max_block_nnz):
            s = (xs[start:stop] @ xt).tocsr()
            chosen = np.empty((stop - start, size), dtype=np.int32)
            for r in range(stop - start):
                cols = s.indices[s.indptr[r] : s.indptr[r + 1]]
                sims = s.data[s.indptr[r] : s.indptr[r + 1]]
                keep = cols != start + r
                cols, sims = cols[keep], sims[keep]
                if len(cols) > size:
                    top = np.argpartition(-sims, size - 1)[:size]
                    cols, sims = cols[top], sims[top]
                counts[lo + start + r] = len(cols)
                chosen[r, : len(cols)] = cols[np.argsort(-sims, kind="stable")] + lo
            parts.append(chosen[np.arange(size) < counts[lo + start : lo + stop, None]])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return Neighbours(indptr, np.concatenate([*parts, np.empty(0, np.int32)]))


def pad_pools(neighbours: Neighbours, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n_queries, size) int32 pools: each query's neighbours, then random other queries up to `size`.

    The padding is drawn query by query in index order, so a seed gives the same pools whatever the
    neighbours' storage.
    """
    n = len(neighbours)
    if n < 2:
        raise ValueError("need at least 2 distinct queries to build negative pools")
    counts = np.diff(neighbours.indptr)
    if (counts > size).any():
        raise ValueError(f"neighbour lists longer than the pool size {size}")
    pools = np.empty((n, size), dtype=np.int32)
    owner = np.repeat(np.arange(n), counts)
    pools[owner, np.arange(len(owner)) - neighbours.indptr[owner]] = neighbours.indices
    for q in np.flatnonzero(counts < size).tolist():
        chosen = pools[q, : counts[q]].astype(np.int64)
        pools[q, counts[q] :] = _pad(q, chosen, size - int(counts[q]), n, rng)
    return pools


def build_pools(
    queries: Sequence[str],
    group_sizes: np.ndarray | int,
    rng: np.random.Generator,
    topk: int | None = None,
    block_rows: int = 2048,
    max_block_nnz: int = 32_000_000,
    shard_queries: int | None = None,
) -> np.ndarray:
    """Pool of `topk - 1` similar query indices per query, shape (n_queries, topk - 1), int32.

    queries: distinct cleaned query texts (index = query index). group_sizes: rows per query (or
    directly n_max); topk defaults to 3 * n_max. A pool lists its non-zero-similarity neighbours
    first, most similar first, then the random padding. `similar_queries` + `pad_pools` in one call;
    the pipeline runs them apart (the `pools` stage once, each train member the padding with its seed).
    """
    if len(queries) < 2:
        raise ValueError("need at least 2 distinct queries to build negative pools")
    size = pool_size(group_sizes) if topk is None else int(topk) - 1
    if size < 1:
        raise ValueError(f"topk must be >= 2, got {topk}")
    return pad_pools(similar_queries(queries, size, shard_queries, block_rows, max_block_nnz), size, rng)


class Triples(NamedTuple):
    """(query index, positive row, negative row), one entry per training triple."""

    query: np.ndarray
    positive: np.ndarray
    negative: np.ndarray


def _draw_positions(rng: np.random.Generator, count: int, size: int, n: int) -> np.ndarray:
    """(count, n) pool positions: n distinct in random order per row (Floyd), with replacement if n > size."""
    if n == 1 or n > size:
        return rng.integers(0, size, size=(count, n))
    sel = np.empty((count, n), dtype=np.int64)
    for i, j in enumerate(range(size - n, size)):
        t = rng.integers(0, j + 1, size=count)
        dup = (sel[:, :i] == t[:, None]).any(axis=1)
        sel[:, i] = np.where(dup, j, t)
    return rng.permuted(sel, axis=1)


class HardNegativeSampler:
    """k hard negatives per positive row, drawn from the TF-IDF pools (the 1st place's 1:k sampling).

    positives[q] are the train rows of query q (its positive products); pools from `build_pools`.
    A pool that is smaller than a query's n is sampled with replacement.
    """

    def __init__(self, positives: Sequence[Sequence[int]], pools: np.ndarray, k: int = 10):
        if len(positives) != len(pools):
            raise ValueError(f"{len(positives)} queries but {len(pools)} pools")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.sizes = np.array([len(p) for p in positives], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.rows = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives] + [np.empty(0, np.int64)])
        self.pools = np.asarray(pools)
        if not np.issubdtype(self.pools.dtype, np.integer):
            raise ValueError(f"pools must hold query indices, got dtype {self.pools.dtype}")
        self.k = k
        empty = self.sizes == 0
        for start in range(0, len(self.pools), 65536):  # chunked: pools can be ~1.5M x pools.cap
            chunk = self.pools[start : start + 65536]
            own = np.arange(start, start + len(chunk))[:, None]
            if (empty[chunk] & ~empty[own]).any():
                raise ValueError("a pool references a query without rows")
            if ((chunk == own) & ~empty[own]).any():
                raise ValueError("a pool contains its own query")

    @classmethod
    def from_row_queries(cls, row_query: np.ndarray, pools: np.ndarray, k: int = 10) -> HardNegativeSampler:
        """From the query index of every feature-store row (e.g. `group_queries(...)[1]`)."""
        row_query = np.asarray(row_query, dtype=np.int64)
        order = np.argsort(row_query, kind="stable")
        bounds = np.cumsum(np.bincount(row_query, minlength=len(pools)))[:-1]
        return cls(np.split(order, bounds), pools, k)

    def __len__(self) -> int:
        return self.k * int(self.sizes.sum())

    def sample(self, seed: int | np.random.Generator, random_rate: float = 0.0) -> Triples:
        """All k * n_positives triples, ordered by (query, positive, repetition); shuffle for training.

        With `random_rate` > 0 that share of the negatives comes from a uniformly drawn other query
        instead of the pool: easy negatives that teach the category quickly while the pool
        negatives teach the attributes (the 1st place used the pool only, over 3M rows).
        """
        if not 0.0 <= random_rate <= 1.0:
            raise ValueError(f"random_rate must be in [0, 1], got {random_rate}")
        rng = np.random.default_rng(seed)
        size = self.pools.shape[1]
        parts: list[tuple[np.ndarray, ...]] = []
        for n in np.unique(self.sizes[self.sizes > 0]):
            qs = np.flatnonzero(self.sizes == n)
            flat = self.offsets[qs][:, None] + np.arange(n)  # positions of the positives in self.rows
            for rep in range(self.k):
                neg_q = self.pools[qs[:, None], _draw_positions(rng, len(qs), size, int(n))]
                pick = self.offsets[neg_q] + rng.integers(0, self.sizes[neg_q])
                key = flat.ravel() * self.k + rep
                parts.append((key, np.repeat(qs, n), self.rows[flat].ravel(), self.rows[pick].ravel()))
        if not parts:
            return Triples(*(np.empty(0, np.int64) for _ in range(3)))
        key, query, pos, neg = (np.concatenate(c) for c in zip(*parts))
        order = np.argsort(key)
        query, pos, neg = query[order], pos[order], neg[order]
        if random_rate > 0:
            swap = np.flatnonzero(rng.random(len(query)) < random_rate)
            neg[swap] = self._random_rows(rng, query[swap])
        return Triples(query, pos, neg)

    def neighbour_rows(self, rng: np.random.Generator, queries: np.ndarray) -> np.ndarray:
        """One row of a query drawn from the pool of queries[i], for every i (hard in-batch negatives)."""
        other = self.pools[queries, rng.integers(0, self.pools.shape[1], size=len(queries))]
        return self.rows[self.offsets[other] + rng.integers(0, self.sizes[other])]

    def _random_rows(self, rng: np.random.Generator, queries: np.ndarray) -> np.ndarray:
        """One row of a uniformly drawn query other than queries[i], for every i."""
        nonempty = np.flatnonzero(self.sizes > 0)
        if len(nonempty) < 2:
            raise ValueError("random negatives need at least two queries with rows")
        u = rng.integers(0, len(nonempty) - 1, size=len(queries))
        u += u >= np.searchsorted(nonempty, queries)  # skip the query itself
        other = nonempty[u]
        return self.rows[self.offsets[other] + rng.integers(0, self.sizes[other])]
