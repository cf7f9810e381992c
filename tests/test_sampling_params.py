"""SamplingParams validation: every bad value is refused with a message naming the field."""
from __future__ import annotations

import pytest

from sparse_llm.engine.sampling_params import SamplingParams


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=None)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.max_tokens == 16 and not p.greedy
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_token": 5}, "max_token"),  # a typo is an unknown field, not silently ignored
        ({"seed": "abc"}, "seed"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_greedy_with_several_completions_is_refused():
    with pytest.raises(ValueError, match="n=3 with temperature=0"):
        SamplingParams(n=3, temperature=0)


def test_assignment_is_validated_too():
    p = SamplingParams()
    with pytest.raises(ValueError, match="temperature"):
        p.temperature = -1
