"""The per-request `sparse_attention` override: applied to that request only, validated, 400 on mismatch."""
from __future__ import annotations

import pytest

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow

# ~480 tokens: 4 prefill tiles of 128 keys, so skip-softmax has tiles to skip.
PROMPT = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(60))


def complete(c, **extra):
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_override_applies_to_its_request_only(live_server):
    with live_server.client() as c:
        before = complete(c)
        sparse = complete(c, sparse_attention={"threshold_scale_factor": {"prefill": 300}})
        after = complete(c)
        both = complete(c, sparse_attention={"algorithm": "skip_softmax", "threshold_scale_factor": 300})
    assert before["sparsity"] == {"prefill": None, "decode": None}  # the server's factor is 0: dense
    assert 0 < sparse["sparsity"]["prefill"] < 1 and sparse["sparsity"]["decode"] is None
    assert after["sparsity"] == before["sparsity"]
    assert both["sparsity"]["prefill"] == pytest.approx(sparse["sparsity"]["prefill"])
    assert both["sparsity"]["decode"] is not None  # a scalar names both phases
    m = live_server.metric("sparse_llm:achieved_sparsity", phase="prefill")
    assert 0 < m < 1
    assert live_server.metric("sparse_llm:layer_achieved_sparsity", layer="0", phase="prefill") >= 0


@pytest.mark.parametrize("override,fragment", [
    ({"algorithm": "rocket"}, "does not match the server's algorithm 'skip_softmax'"),
    ({"target_sparsity": 1.5}, "target_sparsity.prefill must be in [0, 1]"),
    ({"threshold_scale_factor": -3}, ">= 0"),
    ({"threshold_scale_factor": {"prefil": 1}}, "unknown phase"),
    ({"window_size": 3}, "unknown field"),
    ({"target_sparsity": 1.5}, "must be in [0, 1]"),
])
def test_invalid_override_is_400(live_server, override, fragment):
    with live_server.client() as c:
        for route, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = c.post(route, json={**body, "max_tokens": 1, "sparse_attention": override})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "sparse_attention" and err["code"] == "invalid_sparse_attention"
            assert fragment in err["message"], err["message"]


def test_override_must_be_an_object(live_server):
    with live_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x", "sparse_attention": [1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sparse_attention"
