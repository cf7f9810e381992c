"""RULER common words extraction: a long numbered list of words in which 10 words repeat far more often
than the rest; name the 10 most common. Metric: RULER string_match_all on whole words (the fraction of the 10 that are named)."""
from __future__ import annotations

import random
import re

from sparse_llm.eval import haystack
from sparse_llm.eval.prompt import PromptSpec
from sparse_llm.eval.tasks.base import Task

NUM_COMMON = 10
UNCOMMON_FREQ = 3
_WORD = re.compile(r"[a-z]+")


class CommonWords(Task):
    name = "ruler_cwe"
    metric = "match_all"
    max_tokens = 96
    description = f"{NUM_COMMON} frequent words among many rare ones in a numbered list"

    @property
    def common_freq(self) -> int:
        # RULER repeats common words 30 times at 4K+; shorter inputs need fewer repeats to fit.
        return max(UNCOMMON_FREQ + 2, min(30, round(30 * self.max_input_length / 4096)))

    def build(self, rng: random.Random, size: int) -> PromptSpec:
        common = haystack.distinct(rng, NUM_COMMON, haystack.pseudo_word)
        uncommon = haystack.distinct(random.Random(rng.random()), size, haystack.pseudo_word, exclude=set(common))
        words = common * self.common_freq + uncommon * UNCOMMON_FREQ
        random.Random(rng.random()).shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        text = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            f"Memorize the ones that appear most often.\n{listing}\n"
            f"Question: What are the {NUM_COMMON} most common words in the above list?"
        )
        prefix = f"Answer: The top {NUM_COMMON} words that appear most often in the list are:"
        return PromptSpec(text, prefix, common, {"common_freq": self.common_freq})

    def score(self, prediction: str, answers: list[str]) -> float:
        named = set(_WORD.findall(prediction.lower()))
        return sum(a in named for a in answers) / len(answers)
