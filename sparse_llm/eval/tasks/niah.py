"""RULER needle-in-a-haystack: find the value(s) stored under a UUID key in a long noise text.

- ruler_niah: one needle (one key, one 7-digit value).
- ruler_niah_multikey: the queried needle among 3 distractor needles with other keys.
- ruler_niah_multivalue: one key holds 4 values; all must be returned.
Metric: RULER string_match_all (fraction of the gold values present in the answer).
"""
from __future__ import annotations

import random

from sparse_llm.eval import haystack
from sparse_llm.eval.metrics import match_all
from sparse_llm.eval.prompt import PromptSpec
from sparse_llm.eval.tasks.base import Task

TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What {verb} the special magic {noun} for {key} mentioned in the provided text?"
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."


class NeedleInAHaystack(Task):
    name = "ruler_niah"
    metric = "match_all"
    max_tokens = 32
    description = "one needle (UUID key, 7-digit value) at a random depth of a noise haystack"
    num_keys = 1  # needles with distinct keys; the first is queried
    num_values = 1  # values stored under the queried key

    def build(self, rng: random.Random, size: int) -> PromptSpec:
        keys = haystack.distinct(rng, self.num_keys, haystack.uuid_key)
        values = haystack.distinct(rng, self.num_values + self.num_keys - 1, haystack.number_value)
        needles = [NEEDLE.format(key=keys[0], value=v) for v in values[: self.num_values]]
        needles += [NEEDLE.format(key=k, value=v) for k, v in zip(keys[1:], values[self.num_values:])]
        depths = [rng.random() for _ in needles]
        units = haystack.insert_at_depths([haystack.NOISE] * size, needles, depths)
        many = self.num_values > 1
        text = TEMPLATE.format(
            kind="numbers", context=" ".join(units), verb="are all" if many else "is",
            noun="numbers" if many else "number", key=keys[0],
        )
        prefix = f"The special magic {'numbers' if many else 'number'} for {keys[0]} mentioned in the provided text {'are' if many else 'is'}"
        return PromptSpec(text, prefix, values[: self.num_values], {"depths": [round(d, 4) for d in depths[: self.num_values]]})

    def score(self, prediction: str, answers: list[str]) -> float:
        return match_all(prediction, answers)


class NeedleMultiKey(NeedleInAHaystack):
    name = "ruler_niah_multikey"
    description = "the queried needle among 3 distractor needles with other UUID keys"
    num_keys = 4


class NeedleMultiValue(NeedleInAHaystack):
    name = "ruler_niah_multivalue"
    max_tokens = 64
    description = "one UUID key with 4 values at random depths; all 4 must be returned"
    num_values = 4
