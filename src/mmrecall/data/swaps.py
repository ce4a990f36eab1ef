"""Word-swap negatives: a train query with one word swapped for another word of the same kind.

A near-miss candidate (right category, one named attribute wrong) is the hardest negative of an
evaluation query, and the TF-IDF pools rarely hold one: few train queries differ from a query by
exactly one word. The mirror image of a near-miss is cheap to make for every positive pair, though:
keep the image, change one word of its query ("red cotton dress" -> "blue cotton dress"). The pair
(swapped query, image) is a negative that only a model reading every word can tell apart.

Which words are "of the same kind" is read off the train queries, with no word lists:
- two words are *alternates* when they fill the same slot of otherwise identical queries
  ("red _ dress" holds "red" and "blue"), and
- they never occur together in one query (a query names one colour: "red" and "blue" are never
  both in it, while "red" and "women's", which share the slot "_ dress", often are).

    swaps = WordSwaps.from_texts(train_texts)
    swaps.swap("red cotton dress", rng)   # -> "blue cotton dress", or None if no word has an alternate
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

MAX_SLOT_WORDS = 64  # a slot filled by more distinct words says little about their kind (and costs n^2 pairs)
MAX_TEXTS = 200_000  # alternates are read off the first this many distinct texts (seconds; the real train has ~1M)


def _pair_codes(a: np.ndarray, b: np.ndarray, vocab: int) -> np.ndarray:
    """One int64 per unordered word pair (a != b)."""
    return np.minimum(a, b) * vocab + np.maximum(a, b)


class WordSwaps:
    def __init__(self, alternates: dict[str, list[str]]):
        self.alternates = alternates  # word -> its alternates, sorted

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> WordSwaps:
        """Alternates of the words of `texts` (distinct query texts; whitespace tokens), read off the
        first MAX_TEXTS of them.

        numpy over a (queries, longest) matrix of word ids: a slot is hashed as the query's other
        words with their positions.
        """
        index: dict[str, int] = {}
        rows = [[index.setdefault(w, len(index)) for w in t.split()] for t in texts[:MAX_TEXTS]]
        words = np.array(list(index), dtype=object)
        V, L = len(index), max((len(r) for r in rows), default=0)
        if V < 2 or L == 0:
            return cls({})
        ids = np.full((len(rows), L), -1, np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        real = ids >= 0
        # slot key of (query, position): a 64-bit hash of the length and the other words at their positions
        mult = np.random.default_rng(0).integers(1, 2**62, size=(L + 1, 2), dtype=np.int64) | 1
        with np.errstate(over="ignore"):
            full = ((ids + 2) * mult[:L, 0]).sum(1) + real.sum(1) * mult[L, 0]  # (Q,)
            slot = full[:, None] - (ids + 2) * mult[:L, 0] + np.arange(L) * mult[:L, 1]  # (Q, L): position i blanked
        key, word = slot[real], ids[real]
        order = np.lexsort((word, key))
        key, word = key[order], word[order]
        distinct = np.concatenate([[True], (key[1:] != key[:-1]) | (word[1:] != word[:-1])])
        key, word = key[distinct], word[distinct]
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        sizes = np.diff(np.append(starts, len(key)))
        shared = (sizes >= 2) & (sizes <= MAX_SLOT_WORDS)
        upper = {n: np.triu_indices(n, 1) for n in np.unique(sizes[shared])}
        pairs = [_pair_codes(word[s + upper[n][0]], word[s + upper[n][1]], V) for s, n in zip(starts[shared], sizes[shared])]
        if not pairs:
            return cls({})
        candidates = np.unique(np.concatenate(pairs))
        together = [  # pairs of words met in one query
            _pair_codes(ids[both, j], ids[both, k], V)
            for j, k in combinations(range(L), 2)
            if (both := real[:, j] & real[:, k] & (ids[:, j] != ids[:, k])).any()
        ]
        kept = np.setdiff1d(candidates, np.concatenate(together)) if together else candidates
        a, b = kept // V, kept % V
        first, second = np.concatenate([a, b]), np.concatenate([b, a])
        order = np.argsort(first, kind="stable")
        first, second = first[order], second[order]
        bounds = np.flatnonzero(np.diff(first)) + 1
        return cls({str(words[f[0]]): sorted(map(str, words[s]))
                    for f, s in zip(np.split(first, bounds), np.split(second, bounds))})

    def __len__(self) -> int:
        return len(self.alternates)

    def swap(self, text: str, rng: np.random.Generator) -> str | None:
        """`text` with one word (uniformly among those that have alternates) replaced by one of its
        alternates (uniformly); None when no word of the text has one."""
        toks = text.split()
        slots = [i for i, w in enumerate(toks) if w in self.alternates]
        if not slots:
            return None
        i = slots[int(rng.integers(len(slots)))]
        options = self.alternates[toks[i]]
        toks[i] = options[int(rng.integers(len(options)))]
        return " ".join(toks)
