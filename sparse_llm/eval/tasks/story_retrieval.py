"""Story retrieval: a long synthetic story in numbered chapters; each chapter has one finding event
(who found which object); the question names an event and asks for its chapter. Metric: exact match of
the first number in the answer with the chapter number."""
from __future__ import annotations

import itertools
import random
import re

from sparse_llm.eval.prompt import PromptSpec
from sparse_llm.eval.tasks.base import Task

NAMES = ["Ada", "Bram", "Cora", "Dov", "Elin", "Fitz", "Greta", "Hugo", "Isla", "Jonas", "Kira", "Lars",
         "Mira", "Nils", "Odette", "Piet", "Quinn", "Rosa", "Soren", "Tilda", "Ugo", "Vera", "Wim", "Yara"]
COLORS = ["red", "blue", "green", "golden", "silver", "black", "white", "purple", "orange", "grey"]
OBJECTS = ["key", "lantern", "compass", "bell", "map", "ring", "feather", "coin", "flute", "mirror", "button",
           "spoon", "thimble", "candle", "whistle", "locket", "shell", "marble", "ribbon", "brooch", "teacup", "pebble"]
PLACES = ["the old mill", "the harbor", "the orchard", "the bakery", "the bell tower", "the river bank", "the market",
          "the library", "the forest path", "the stone bridge", "the meadow", "the lighthouse", "the inn", "the chapel"]
FILLER = [
    "{a} walked to {p} early in the morning, when the streets were still quiet.",
    "The wind came from the sea and carried the smell of salt over {p}.",
    "{a} and {b} talked for a long time about the coming winter.",
    "Rain fell all afternoon, and {a} stayed inside to mend an old coat.",
    "At {p}, {a} met a traveler who told stories of distant mountains.",
    "{b} baked bread and shared it with the neighbors near {p}.",
    "In the evening, {a} watched the lamps being lit one by one along the road.",
    "{a} wrote a letter to a cousin in the city and sealed it with wax.",
    "The children of the village played a long game of tag near {p}.",
    "{b} repaired the fence behind {p} while humming an old song.",
]
_NUMBER = re.compile(r"\d+")


class StoryRetrieval(Task):
    name = "story_retrieval"
    metric = "exact_match"
    max_tokens = 8
    description = "find the chapter of a long synthetic story in which a named event happens"
    sentences_per_chapter = 6

    def build(self, rng: random.Random, size: int) -> PromptSpec:
        depth = rng.random()
        event_seed, text_seed = rng.random(), rng.random()
        n_chapters = -(-size // self.sentences_per_chapter)  # size = filler sentences; the last chapter may be short
        events = list(itertools.product(NAMES, COLORS, OBJECTS))
        if n_chapters > len(events):
            raise ValueError(f"story_retrieval has {len(events)} distinct events; {n_chapters} chapters would repeat some")
        random.Random(event_seed).shuffle(events)  # chapter c has events[c]: every event is unique
        target = min(int(depth * n_chapters), n_chapters - 1)
        trng = random.Random(text_seed)
        chapters = []
        for c in range(n_chapters):
            name, color, obj = events[c]
            n_lines = min(self.sentences_per_chapter, size - c * self.sentences_per_chapter)
            lines = [
                trng.choice(FILLER).format(a=trng.choice(NAMES), b=trng.choice(NAMES), p=trng.choice(PLACES))
                for _ in range(n_lines)
            ]
            lines.insert(trng.randrange(len(lines) + 1), f"{name} found a {color} {obj} near {trng.choice(PLACES)}.")
            chapters.append(f"Chapter {c + 1}\n" + " ".join(lines))
        name, color, obj = events[target]
        text = (
            "Read the following story. Each chapter is numbered.\n\n" + "\n\n".join(chapters)
            + f"\n\nQuestion: In which chapter did {name} find a {color} {obj}? Answer with the chapter number only."
        )
        return PromptSpec(text, "Answer: Chapter", [str(target + 1)], {"depth": round(depth, 4), "chapters": n_chapters})

    def score(self, prediction: str, answers: list[str]) -> float:
        m = _NUMBER.search(prediction)
        return float(m is not None and m.group() in answers)
