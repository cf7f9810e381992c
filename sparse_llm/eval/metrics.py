"""Scores of one prediction against its gold answers, each in [0, 1] (RULER / SQuAD definitions)."""
from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def match_all(prediction: str, answers: list[str]) -> float:
    """RULER string_match_all: the fraction of gold answers found (case-insensitive) in the prediction."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def match_part(prediction: str, answers: list[str]) -> float:
    """RULER string_match_part: 1 if any gold answer is in the prediction (after SQuAD normalisation)."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) in pred for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def iou(predicted: set[str], gold: set[str]) -> float:
    """Intersection over union of two sets (1.0 when both are empty)."""
    union = predicted | gold
    return len(predicted & gold) / len(union) if union else 1.0


def first_line(prediction: str) -> str:
    """Short-answer tasks score the first non-empty line: what follows is the model rambling."""
    for line in prediction.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
