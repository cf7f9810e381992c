"""RULER variable tracking: follow a chain of assignments (VAR B = VAR A, ...) scattered in noise text
and name every variable that ends up holding the value. Metric: IoU of the named variables."""
from __future__ import annotations

import random
import re

from sparse_llm.eval import haystack
from sparse_llm.eval.metrics import iou
from sparse_llm.eval.prompt import PromptSpec
from sparse_llm.eval.tasks.base import Task

NUM_HOPS = 4  # RULER default: 1 chain of 5 variables
_VAR = re.compile(r"\b[A-Z]{5}\b")


class VariableTracking(Task):
    name = "ruler_vt"
    metric = "iou"
    max_tokens = 48
    description = f"one chain of {NUM_HOPS + 1} variable assignments at increasing depths of a noise haystack"

    def build(self, rng: random.Random, size: int) -> PromptSpec:
        names = haystack.distinct(rng, NUM_HOPS + 1, haystack.variable_name)
        value = haystack.number_value(rng, digits=5)
        statements = [f"VAR {names[0]} = {value}."]
        statements += [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(NUM_HOPS)]
        depths = sorted(rng.random() for _ in statements)  # the chain appears in order
        units = haystack.insert_at_depths([haystack.NOISE] * size, statements, depths)
        text = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            + " ".join(units)
            + f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        )
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are:"
        )
        return PromptSpec(text, prefix, names, {"depths": [round(d, 4) for d in depths]})

    def score(self, prediction: str, answers: list[str]) -> float:
        return iou(set(_VAR.findall(prediction)), set(answers))
