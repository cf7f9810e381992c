"""Every route of the real server (SmolLM2 over uvicorn), streaming, usage, metrics and each error case."""
from __future__ import annotations

import json

import httpx
import pytest

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(resp: httpx.Response) -> list:
    """Parsed `data:` events; asserts the stream ends with [DONE] and has nothing after it."""
    events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None, match: str = ""):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert match.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_health_version_models(live_server):
    with live_server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        import sparse_llm

        assert c.get("/version").json() == {"version": sparse_llm.__version__}
        models = c.get("/v1/models").json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == list(live_server.served_names)
        assert all(m["max_model_len"] == live_server.max_model_len for m in models["data"])
        assert c.get("/v1/models/smollm2-alias").json()["id"] == "smollm2-alias"
        assert_error(c.get("/v1/models/nope"), 404, "model", "model_not_found")
        assert c.get("/openapi.json").json()["paths"].keys() >= {"/v1/completions", "/v1/chat/completions"}


def test_completion_greedy_matches_offline_engine_and_reports_usage(live_server):
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    with live_server.client() as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        ids = live_server.engine.tokenizer.encode("The capital of France is")
        r2 = c.post("/v1/completions", json={**body, "prompt": ids, "model": "smollm2-alias"})  # token-id prompt
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"][0]["text"] == r2.json()["choices"][0]["text"]
    assert "Paris" in out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["total_tokens"] == len(ids) + usage["completion_tokens"]
    assert usage["completion_tokens"] == 6 if out["choices"][0]["finish_reason"] == "length" else 1 <= usage["completion_tokens"] < 6
    assert r2.json()["model"] == "smollm2-alias"


def test_completion_batch_n_stop_and_logprobs(live_server):
    with live_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": ["One, two,", "Red, green,"], "max_tokens": 4, "n": 2,
                                              "temperature": 0.8, "seed": 3, "logprobs": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        stop = c.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0,
                                                 "stop": [","]}).json()
    assert [ch["index"] for ch in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 16
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert stop["choices"][0]["finish_reason"] == "stop" and stop["choices"][0]["stop_reason"] == ","
    assert "," not in stop["choices"][0]["text"]


def test_chat_completion_and_logprobs(live_server):
    with live_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 8, "temperature": 0,
                                                   "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and "Paris" in msg["content"]
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in content)


def test_completion_stream_with_usage(live_server):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    with live_server.client() as c:
        full = c.post("/v1/completions", json=body).json()
        with c.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    *chunks, last = events
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    assert last["choices"] == [] and last["usage"] == full["usage"]


def test_chat_stream_role_first_then_deltas(live_server):
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    with live_server.client() as c:
        full = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[1:])
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_metrics_exposes_engine_and_request_metrics(live_server):
    with live_server.client() as c:
        c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    m = live_server.metrics()
    for name in ("sparse_llm:num_requests_running", "sparse_llm:num_requests_waiting", "sparse_llm:kv_blocks_used",
                 "sparse_llm:kv_blocks_free", "sparse_llm:kv_blocks_total", "sparse_llm:prompt_tokens_total",
                 "sparse_llm:generation_tokens_total", "sparse_llm:time_to_first_token_seconds_count",
                 "sparse_llm:time_per_output_token_seconds_count", "sparse_llm:e2e_request_latency_seconds_count"):
        assert any(k.startswith(name + "{") for k in m), name
    assert live_server.metric("sparse_llm:http_requests_total", route="/v1/completions", status="200") >= 1
    assert live_server.metric("sparse_llm:generation_tokens_total") >= 3
    used, free = live_server.metric("sparse_llm:kv_blocks_used"), live_server.metric("sparse_llm:kv_blocks_free")
    assert used + free == live_server.metric("sparse_llm:kv_blocks_total")


ERROR_CASES = [
    # (route, raw body, status, param, code, message fragment)
    ("/v1/completions", b"{not json", 400, None, "invalid_json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, None, "object"),
    ("/v1/completions", b"{}", 400, "prompt", None, "prompt: Field required"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model", "model_not_found", "does not exist"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature", None, "greater than or equal to 0"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", None, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n", None, "n"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens", None, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 5000}', 400, "max_tokens", "context_length_exceeded", "maximum context length is 1024"),
    ("/v1/completions", b'{"prompt": [5, 99999999]}', 400, "prompt", None, "token ids must be in [0, 49152)"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt", None, "empty"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt", None, "empty list"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt", None, "surrogate"),
    ("/v1/completions", b'{"prompt": "x", "frobnicate": 1}', 400, "frobnicate", None, "Extra inputs"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 0.5}', 400, None, None, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "echo": true}', 400, None, None, "echo"),
    ("/v1/completions", b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, None, None, "stream=true"),
    ("/v1/completions", b'{"prompt": "x", "seed": -1}', 400, "seed", None, "seed"),
    ("/v1/completions", b'{"prompt": "x", "top_k": 100000000000000}', 400, "top_k", None, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 0, "n": 2}', 400, None, None, "identical"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages", None, "at least 1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role", None, "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400, None, None, "logprobs=true"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}', 400, None, None, "tools"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}', 400, "max_tokens",
     "context_length_exceeded", "maximum context length"),
]


@pytest.mark.parametrize("route,body,status,param,code,fragment", ERROR_CASES, ids=[f"{i}" for i in range(len(ERROR_CASES))])
def test_error_cases_are_openai_json(live_server, route, body, status, param, code, fragment):
    with live_server.client() as c:
        r = c.post(route, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, status, param, code, fragment)


def test_prompt_too_long(live_server):
    with live_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": [42] * live_server.max_model_len, "max_tokens": 1})
        assert_error(r, 400, "prompt", "context_length_exceeded", "leaves no room")
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * 1500}]})
        assert_error(r, 400, "messages", "context_length_exceeded", "maximum context length")


def test_api_key_required_on_v1_only(live_server):
    url = live_server.base_url
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url + "/v1/completions", json=body), 401, code="invalid_api_key", match="API key")
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": live_server.api_key}), 401)  # no Bearer
    assert_error(httpx.get(url + "/v1/models"), 401)
    assert_error(httpx.post(url + "/v1/completions", content=b"{bad", headers={"Authorization": "Bearer no"}), 401)
    assert httpx.get(url + "/health").status_code == 200  # open routes stay open
    assert httpx.get(url + "/metrics").status_code == 200


def test_unknown_route_and_wrong_method(live_server):
    with live_server.client() as c:
        assert_error(c.get("/v1/nothing"), 404, match="not found")
        assert_error(c.get("/v1/completions"), 405, match="method not allowed")
        assert_error(c.delete("/health"), 405)
    assert live_server.metric("sparse_llm:http_requests_total", route="other", status="404") >= 1
