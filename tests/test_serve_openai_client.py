"""The official `openai` client against the real server: chat, completion, streaming, errors, override."""
from __future__ import annotations

import openai
import pytest

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(live_server):
    with openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.api_key, max_retries=0) as c:
        yield c


def test_models_and_completion(client):
    assert [m.id for m in client.models.list().data] == ["smollm2", "smollm2-alias"]
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in out.choices[0].text
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens == 5


def test_chat_and_streaming_agree(client):
    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.choices[0].finish_reason in ("stop", "length")


def test_completion_streaming(client):
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "4" in "".join(c.choices[0].text for c in chunks)


def test_errors_map_to_openai_exceptions(client, live_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], temperature=-2)
    with pytest.raises(openai.BadRequestError, match="sparse_attention"):
        client.completions.create(model="smollm2", prompt="x", max_tokens=1, extra_body={"sparse_attention": {"algorithm": "rocket"}})
    with openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_sparse_override_through_extra_body(client):
    prompt = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=2, temperature=0,
                                    extra_body={"sparse_attention": {"threshold_scale_factor": {"prefill": 300}}})
    assert out.model_extra["sparsity"]["prefill"] > 0
