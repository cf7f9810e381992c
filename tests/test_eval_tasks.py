"""The eval tasks without a model: deterministic inputs at 90-100% of the length (chat template included),
answers that really are in the input, and the metrics."""
from __future__ import annotations

import collections
import random
import re

import pytest

from sparse_llm.eval import haystack
from sparse_llm.eval.metrics import first_line, iou, match_all, match_part, normalize_answer, token_f1
from sparse_llm.eval.prompt import LOWEST_FILL, PromptSpec, fit_to_length, render
from sparse_llm.eval.runner import make_samples, mean_sparsity
from sparse_llm.eval.tasks import TASKS, get_task
from sparse_llm.eval.tasks.qa_packed import load_documents


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from sparse_llm.models.loader import open_source_tokenizer

    return open_source_tokenizer(smollm2_path)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", [700, 2500])
def test_inputs_fill_90_to_100_percent_with_chat_template(tokenizer, name, length):
    samples = make_samples(get_task(name, length), tokenizer, 3, seed=1, progress=False)
    for s in samples:
        assert LOWEST_FILL * length <= len(s.prompt_token_ids) <= length, (name, len(s.prompt_token_ids))
        assert s.prompt.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in s.prompt
        assert tokenizer(s.prompt, add_special_tokens=False)["input_ids"] == s.prompt_token_ids
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)


@pytest.mark.parametrize("name", list(TASKS))
def test_samples_are_deterministic_and_seeded(tokenizer, name):
    task = get_task(name, 800)
    a = make_samples(task, tokenizer, 2, seed=5, progress=False)
    b = make_samples(task, tokenizer, 3, seed=5, progress=False)
    c = make_samples(task, tokenizer, 2, seed=6, progress=False)
    assert [s.prompt for s in a] == [s.prompt for s in b[:2]]  # more samples keep the first ones
    assert a[0].prompt != a[1].prompt and a[0].prompt != c[0].prompt


def test_niah_needles_are_in_the_text_at_their_depths(tokenizer):
    for name, n_values in (("ruler_niah", 1), ("ruler_niah_multikey", 1), ("ruler_niah_multivalue", 4)):
        for s in make_samples(get_task(name, 1500), tokenizer, 4, seed=0, progress=False):
            key = re.search(r"for ([0-9a-f-]{36}) mentioned", s.prompt).group(1)
            found = re.findall(rf"One of the special magic numbers for {key} is: (\d{{7}})\.", s.prompt)
            assert found == [a for a in s.answers] or sorted(found) == sorted(s.answers)
            assert len(s.answers) == n_values
            all_needles = re.findall(r"One of the special magic numbers for ([0-9a-f-]{36}) is", s.prompt)
            assert len(all_needles) == (4 if name == "ruler_niah_multikey" else n_values)
            body = s.prompt.split("afterwards.\n", 1)[1]
            if n_values == 1:  # the needle sits at its depth of the haystack (within one noise unit)
                pos = body.index(f"is: {s.answers[0]}") / len(body)
                assert abs(pos - s.info["depths"][0]) < 0.05


def test_variable_tracking_chain_resolves_to_the_answers(tokenizer):
    for s in make_samples(get_task("ruler_vt", 1200), tokenizer, 3, seed=0, progress=False):
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.prompt))
        value = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)

        def resolve(v):
            return resolve(assigned[v[4:]]) if v.startswith("VAR ") else v

        holders = sorted(var for var, v in assigned.items() if resolve(v) == value)
        assert holders == sorted(s.answers) and len(holders) == 5


def test_common_words_answers_are_the_most_frequent(tokenizer):
    for length in (800, 3000):
        task = get_task("ruler_cwe", length)
        for s in make_samples(task, tokenizer, 2, seed=0, progress=False):
            listing = s.prompt.split("appear most often.\n", 1)[1].split("\nQuestion:", 1)[0]
            counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", listing))
            top = {w for w, _ in counts.most_common(10)}
            assert top == set(s.answers)
            assert min(counts[w] for w in s.answers) == task.common_freq > max(
                c for w, c in counts.items() if w not in s.answers)


def test_qa_packed_target_document_is_in_the_input(tokenizer):
    docs = {d["title"]: d for d in load_documents()}
    for s in make_samples(get_task("qa_packed", 2000), tokenizer, 4, seed=0, progress=False):
        question = re.search(r"Question: (.+?)<\|im_end\|>", s.prompt).group(1)
        owner = [d for d in docs.values() if any(qa["question"] == question for qa in d["qa"])]
        assert len(owner) == 1
        assert f"Document {s.info['document']}:\n{owner[0]['title']}\n{owner[0]['text']}" in s.prompt
        assert all(a in owner[0]["text"] for a in s.answers)


def test_story_event_is_in_the_answer_chapter_only(tokenizer):
    for s in make_samples(get_task("story_retrieval", 2000), tokenizer, 3, seed=0, progress=False):
        name, color, obj = re.search(r"In which chapter did (\w+) find a (\w+) (\w+)\?", s.prompt).groups()
        chapters = re.split(r"\n\nChapter (\d+)\n|Chapter (1)\n", s.prompt)
        holders = [m.group(1) for m in re.finditer(r"Chapter (\d+)\n([^\n]*)", s.prompt)
                   if f"{name} found a {color} {obj} near" in m.group(2)]
        assert holders == s.answers, (holders, s.answers, len(chapters))


def test_too_short_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"max_input_length=60 is too short for task 'qa_packed'"):
        make_samples(get_task("qa_packed", 60), tokenizer, 1, seed=0, progress=False)
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        get_task("nope", 100)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        make_samples(get_task("ruler_niah", 500), tokenizer, 0, seed=0, progress=False)


def test_fit_rejects_coarse_units_below_90_percent(tokenizer):
    def build(rng, size):  # ~1200 tokens, then ~2200: nothing lands in 1800..2000
        return PromptSpec("word " * (1000 * size + 200), "", ["x"])

    with pytest.raises(ValueError, match="could not fill max_input_length=2000 to at least 90%"):
        fit_to_length(build, "s", tokenizer, 2000, "coarse")
    spec, text, ids = fit_to_length(lambda rng, size: PromptSpec("word " * (10 * size), "A:", ["x"]), "s", tokenizer, 500, "fine")
    assert 450 <= len(ids) <= 500 and (text, ids) == render(tokenizer, spec)


def test_metrics():
    assert normalize_answer("The  Wren, Telescope!") == "wren telescope"
    assert match_all("numbers: 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert match_part("It was the Osprey.", ["the Osprey", "Osprey"]) == 1.0 and match_part("a ferry", ["Osprey"]) == 0.0
    assert token_f1("Matilda Crane", ["Matilda Crane"]) == 1.0
    assert token_f1("the engineer Matilda Crane", ["Matilda Crane"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("nobody", ["Matilda Crane"]) == 0.0
    assert iou({"A", "B"}, {"B", "C"}) == pytest.approx(1 / 3) and iou(set(), set()) == 1.0
    assert first_line("\n  Paris.\nMore text") == "Paris."


def test_task_scores():
    assert get_task("ruler_niah", 100).score(" 1234567.", ["1234567"]) == 1.0
    assert get_task("ruler_niah_multivalue", 100).score("1111111, 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert get_task("ruler_vt", 100).score(" ABCDE, FGHIJ, KLMNO", ["ABCDE", "FGHIJ"]) == pytest.approx(2 / 3)
    assert get_task("ruler_cwe", 100).score("1. bada 2. kemo 3. badaki", ["bada", "kemo", "tusi"]) == pytest.approx(2 / 3)
    assert get_task("qa_packed", 100).score(" Hale\nsomething else", ["Hale"]) == 1.0
    story = get_task("story_retrieval", 100)
    assert story.score(" 14.", ["14"]) == 1.0 and story.score(" 141", ["14"]) == 0.0 and story.score(" none", ["14"]) == 0.0


def test_haystack_helpers_are_deterministic():
    rng1, rng2 = random.Random("x"), random.Random("x")
    assert haystack.uuid_key(rng1) == haystack.uuid_key(rng2)
    assert len(set(haystack.distinct(random.Random(0), 50, haystack.pseudo_word))) == 50
    assert haystack.insert_at_depths(["a", "b", "c", "d"], ["X", "Y"], [1.0, 0.0]) == ["Y", "a", "b", "c", "d", "X"]
    assert haystack.insert_at_depths(["a", "b"], ["X", "Y"], [0.5, 0.5]) == ["a", "X", "Y", "b"]


def test_mean_sparsity_skips_dense_requests():
    per = [{"prefill": 0.5, "decode": None}, {"prefill": 0.7, "decode": None}, {"prefill": None, "decode": None}]
    assert mean_sparsity(per) == {"prefill": pytest.approx(0.6), "decode": None}
