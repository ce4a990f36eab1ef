"""Query text: the 1st place's cleaning rule and the tokenizer used by the word baseline."""

from __future__ import annotations

import re

# A query whose FIRST token is one of these loses that token (once).
JUNK_FIRST_TOKENS = frozenset({"!", "$", "'ll", "'s", ",", "&", ":", "and", "cut", "is", "are", "was"})
# Deleted wherever they occur.
JUNK_SUBSTRINGS = ('"hey siri, play some', "however, ", "yin and yang, ", "shopping mall/")

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def clean_query(query: str) -> str:
    """Apply the 1st-place cleaning: drop one junk first token, a leading '-', junk substrings."""
    tokens = query.split()
    if tokens and tokens[0] in JUNK_FIRST_TOKENS:
        tokens = tokens[1:]
    text = " ".join(tokens)
    if text.startswith("-"):
        text = text[1:]
    for junk in JUNK_SUBSTRINGS:
        text = text.replace(junk, "")
    return text.strip()


def words(query: str) -> list[str]:
    """Lower-case word tokens of a (cleaned) query, for bag-of-words models."""
    return _WORD.findall(query.lower())
