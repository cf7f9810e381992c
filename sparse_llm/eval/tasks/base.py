"""What every eval task provides: a prompt builder of adjustable size, a scorer and a token budget."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar

from sparse_llm.eval.prompt import PromptSpec


class Task(ABC):
    """A synthetic long-context task. `build(rng, size)` must grow monotonically with `size` and draw
    its sample-level choices (keys, depths, the question) before anything that depends on `size`."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the name of what `score` computes, reported in summary.json
    max_tokens: ClassVar[int]  # generation budget for the answer
    description: ClassVar[str]

    def __init__(self, max_input_length: int):
        self.max_input_length = max_input_length

    @abstractmethod
    def build(self, rng: random.Random, size: int) -> PromptSpec:
        """The prompt with `size` filler units (size >= 1)."""

    @abstractmethod
    def score(self, prediction: str, answers: list[str]) -> float:
        """The sample's score in [0, 1]."""
