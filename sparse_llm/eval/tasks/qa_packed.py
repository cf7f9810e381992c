"""Question answering over one of many packed documents (RULER's qa format, Sparse-Frontier style).

The documents are the fictional entries shipped in sparse_llm/data/qa_documents.json, so the answer can
only come from reading the right one. Distractors are the other entries, cycled in a shuffled order;
the last one may be cut short to land on the requested length. Metric: SQuAD token F1 of the first line.
"""
from __future__ import annotations

import functools
import json
import random
import re
from importlib import resources

from sparse_llm.eval.metrics import first_line, token_f1
from sparse_llm.eval.prompt import PromptSpec
from sparse_llm.eval.tasks.base import Task

INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.cache
def load_documents() -> list[dict]:
    """[{title, text, qa: [{question, answers}]}], validated so a broken data file fails loudly."""
    raw = resources.files("sparse_llm.data").joinpath("qa_documents.json").read_text(encoding="utf-8")
    docs = json.loads(raw)
    for i, d in enumerate(docs):
        for qa in d["qa"]:
            if not any(a in d["text"] for a in qa["answers"]):
                raise ValueError(f"qa_documents.json[{i}] ({d['title']}): no answer of {qa['question']!r} is in its text")
    return docs


class QaPacked(Task):
    name = "qa_packed"
    metric = "f1"
    max_tokens = 32
    description = "a question about one of many packed fictional documents"

    def build(self, rng: random.Random, size: int) -> PromptSpec:
        docs = load_documents()
        target = rng.randrange(len(docs))
        qa = rng.choice(docs[target]["qa"])
        depth = rng.random()
        others = [i for i in range(len(docs)) if i != target]
        rng.shuffle(others)
        packed: list[tuple[str, str]] = []  # (title, text) of distractors holding `size` sentences in all
        left, k = size, 0
        while left > 0:
            d = docs[others[k % len(others)]]
            sentences = _SENTENCE_END.split(d["text"])
            packed.append((d["title"], " ".join(sentences[:left])))
            left -= min(left, len(sentences))
            k += 1
        at = round(depth * len(packed))
        packed.insert(at, (docs[target]["title"], docs[target]["text"]))
        context = "\n\n".join(f"Document {i + 1}:\n{title}\n{text}" for i, (title, text) in enumerate(packed))
        text = f"{INSTRUCTION}\n\nThe following are given documents.\n\n{context}\n\n{INSTRUCTION}\n\nQuestion: {qa['question']}"
        return PromptSpec(text, "Answer:", list(qa["answers"]), {"document": at + 1, "depth": round(depth, 4)})

    def score(self, prediction: str, answers: list[str]) -> float:
        return token_f1(first_line(prediction), answers)
