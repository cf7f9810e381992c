"""Fuzzed request bodies (hypothesis, bounded and derandomised) never get a 5xx from the real server."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "ignore_eos", "stop_token_ids",
          "sparse_attention", "echo", "best_of", "presence_penalty", "logit_bias", "response_format", "tools", "user"]
scalars = (st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": values}),
                    max_size=3)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=6)


def _bounded(body: dict) -> dict:
    """Valid requests must stay cheap: integer budgets are capped, and a missing budget (which for chat means
    "the rest of the context") is set; invalid values pass through untouched."""
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2
    for key in ("max_tokens", "max_completion_tokens", "n", "best_of"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 2:
            body[key] = 2
    return body


FUZZ = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check(resp) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert resp.status_code in (400, 404), resp.text
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@FUZZ
@given(body=bodies.map(_bounded), prompt=values)
def test_fuzzed_completion_bodies(live_server, body, prompt):
    body.setdefault("prompt", prompt)
    with live_server.client() as c:
        _check(c.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(body=bodies.map(_bounded), msgs=messages)
def test_fuzzed_chat_bodies(live_server, body, msgs):
    body.setdefault("messages", msgs)
    with live_server.client() as c:
        _check(c.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_raw_bytes(live_server, raw, route):
    with live_server.client() as c:
        _check(c.post(route, content=raw, headers={"Content-Type": "application/json"}))
