"""Deterministic building blocks of the synthetic long-context tasks: filler text, keys, values, words.

Everything is drawn from a `random.Random` the caller seeds, so a sample is the same on every machine.
"""
from __future__ import annotations

import random
import string
import uuid

# RULER's "noise" haystack: repeated, content-free sentences in which a needle stands out only by meaning.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def uuid_key(rng: random.Random) -> str:
    """A UUID-shaped key (RULER's multi-key needles use these)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def number_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 consonant-vowel syllables (hundreds of thousands possible)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))


def distinct(rng: random.Random, n: int, make, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct values of make(rng), none in `exclude`."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        v = make(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def insert_at_depths(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert items between filler units at relative depths in [0, 1] (0 = before everything)."""
    out = list(units)
    # Insert from the deepest (and, at equal depth, the last item) so that insertions do not shift the
    # indices still to come and items at the same depth keep their order.
    order = sorted(range(len(items)), key=lambda i: (-depths[i], -i))
    for i in order:
        out.insert(round(depths[i] * len(units)), items[i])
    return out
