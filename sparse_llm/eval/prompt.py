"""Prompts of the eval tasks: the chat template applied, and fitted to 90-100% of the requested length.

A task builds its prompt from a "size" (how many filler units it holds); the fit searches the largest
size whose tokenised prompt (chat template + answer prefix) is at most the requested length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

LOWEST_FILL = 0.9  # an input must reach this fraction of the requested length


@dataclass(slots=True)
class PromptSpec:
    """What a task builds for one sample: the user message, the start of the answer, the gold answers."""

    user_text: str
    answer_prefix: str
    answers: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. needle depth, for the predictions file


@dataclass(slots=True)
class Sample:
    index: int
    task: str
    prompt: str  # the full text the model sees (chat template + answer prefix)
    prompt_token_ids: list[int]
    answers: list[str]
    info: dict[str, Any]


def render(tokenizer, spec: PromptSpec) -> tuple[str, list[int]]:
    """The chat template (when the tokenizer has one) around the user text, then the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": spec.user_text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text + spec.answer_prefix, add_special_tokens=False)["input_ids"]
        return text + spec.answer_prefix, ids
    text = spec.user_text + "\n" + spec.answer_prefix
    return text, tokenizer(text)["input_ids"]


def fit_to_length(
    build: Callable[[random.Random, int], PromptSpec], seed: str, tokenizer, max_len: int, task: str
) -> tuple[PromptSpec, str, list[int]]:
    """The largest size whose prompt has <= max_len tokens; an error if it lands below 90% of max_len.

    `build` is called with a fresh Random(seed) each time, so every size draws the same keys and depths.
    """
    cache: dict[int, tuple[PromptSpec, str, list[int]]] = {}

    def at(size: int):
        if size not in cache:
            spec = build(random.Random(seed), size)
            cache[size] = (spec, *render(tokenizer, spec))
        return cache[size]

    smallest = len(at(1)[2])
    if smallest > max_len:
        raise ValueError(
            f"max_input_length={max_len} is too short for task {task!r}: its smallest prompt has {smallest} tokens"
        )
    lo, hi = 1, 2
    while len(at(hi)[2]) <= max_len:  # grow until too long
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: at(lo) fits, at(hi) does not
        mid = (lo + hi) // 2
        if len(at(mid)[2]) <= max_len:
            lo = mid
        else:
            hi = mid
    spec, text, ids = at(lo)
    if len(ids) < LOWEST_FILL * max_len:
        raise ValueError(
            f"task {task!r}: could not fill max_input_length={max_len} to at least {LOWEST_FILL:.0%} "
            f"(best prompt has {len(ids)} tokens); use a longer max_input_length"
        )
    return spec, text, ids
