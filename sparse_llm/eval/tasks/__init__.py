"""The eval tasks by name."""
from __future__ import annotations

from sparse_llm.eval.tasks.base import Task
from sparse_llm.eval.tasks.common_words import CommonWords
from sparse_llm.eval.tasks.niah import NeedleInAHaystack, NeedleMultiKey, NeedleMultiValue
from sparse_llm.eval.tasks.qa_packed import QaPacked
from sparse_llm.eval.tasks.story_retrieval import StoryRetrieval
from sparse_llm.eval.tasks.variable_tracking import VariableTracking

TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (NeedleInAHaystack, NeedleMultiKey, NeedleMultiValue, VariableTracking, CommonWords, QaPacked, StoryRetrieval)
}


def get_task(name: str, max_input_length: int) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; choose from {sorted(TASKS)}")
    if max_input_length < 1:
        raise ValueError(f"max_input_length must be >= 1, got {max_input_length}")
    return TASKS[name](max_input_length)
