"""Word-swap negatives (data/swaps.py): which words count as alternates, and what a swap makes."""

from __future__ import annotations

import numpy as np

from mmrecall.data.swaps import WordSwaps

TEXTS = [
    "red dress", "blue dress", "women's dress", "women's red dress", "women's blue dress", "red cotton dress", "red silk dress",
    "red silk skirt", "green kettle",
]


def test_alternates_share_a_slot_and_never_meet_in_one_query():
    swaps = WordSwaps.from_texts(TEXTS)
    assert swaps.alternates["red"] == ["blue"]  # "_ dress"; "women's" shares it but meets both in a query
    assert "women's" not in swaps.alternates
    assert swaps.alternates["cotton"] == ["silk"]  # "red _ dress"
    assert swaps.alternates["dress"] == ["skirt"]  # "red silk _"
    assert "kettle" not in swaps.alternates and "green" not in swaps.alternates  # no shared slot


def test_a_swap_changes_exactly_one_word_to_one_of_its_alternates():
    swaps = WordSwaps.from_texts(TEXTS)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        out = swaps.swap("women's red cotton dress", rng)
        changed = [(a, b) for a, b in zip("women's red cotton dress".split(), out.split()) if a != b]
        assert len(changed) == 1 and changed[0][1] in swaps.alternates[changed[0][0]]
        seen.add(out)
    assert seen == {"women's blue cotton dress", "women's red silk dress", "women's red cotton skirt"}
    assert swaps.swap("green kettle", rng) is None
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [swaps.swap(t, a) for t in TEXTS] == [swaps.swap(t, b) for t in TEXTS]
