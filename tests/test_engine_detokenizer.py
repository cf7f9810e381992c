"""Incremental detokenisation (multi-byte characters split over tokens) and stop strings."""
from __future__ import annotations

import pytest

from sparse_llm.engine.detokenizer import IncrementalDetokenizer
from sparse_llm.models.testing import byte_level_tokenizer

TEXT = "héllo, 世界! 🙂 naïve ok"


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()  # one token per byte: every non-ASCII character spans 2-4 tokens


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    seen, stop = [], None
    for t in ids:
        stop = detok.add_token(t)
        seen.append(detok.text)
        if stop is not None:
            break
    return seen, stop


def test_multibyte_characters_are_never_emitted_half_done(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # really multi-byte
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: ", add_special_tokens=False))
    seen, stop = feed(detok, ids)
    assert stop is None and detok.text == TEXT
    assert all("\ufffd" not in s for s in seen)
    assert all(TEXT.startswith(s) for s in seen)


def test_special_tokens_are_skipped_or_kept(tok):
    eos = tok.convert_tokens_to_ids("<|eos|>")
    ids = tok.encode("ab", add_special_tokens=False) + [eos]
    skip = IncrementalDetokenizer(tok, [65], skip_special_tokens=True)
    feed(skip, ids)
    keep = IncrementalDetokenizer(tok, [65], skip_special_tokens=False)
    feed(keep, ids)
    assert skip.text == "ab" and keep.text == "ab<|eos|>"


def test_stop_string_across_tokens_truncates_the_text(tok):
    ids = tok.encode("The answer is 42.\n\nUser: next", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [65], stop=["\n\nUser:", "zzz"])
    _, stop = feed(detok, ids)
    assert stop == "\n\nUser:" and detok.text == "The answer is 42."


def test_the_earliest_stop_string_wins(tok):
    detok = IncrementalDetokenizer(tok, [65], stop=["cd", "bcde"])
    _, stop = feed(detok, tok.encode("abcdef", add_special_tokens=False))
    assert stop == "cd" and detok.text == "ab"  # "cd" completes first


def test_visible_text_holds_back_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, [65], stop=["END"])
    feed(detok, tok.encode("abcEN", add_special_tokens=False))
    assert detok.text == "abcEN"
    assert detok.visible_text(finished=False) == "abc"  # "EN" could become "END"
    assert detok.visible_text(finished=True) == "abcEN"
    no_stop = IncrementalDetokenizer(tok, [65])
    feed(no_stop, tok.encode("abcEN", add_special_tokens=False))
    assert no_stop.visible_text(finished=False) == "abcEN"
