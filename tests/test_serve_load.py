"""Client disconnects abort at once, and a bounded load test: many concurrent streams, a fifth of the
clients leaving mid-stream -> no 5xx, the server stays alive, and every KV block is free afterwards."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow

LONG = 1000  # tokens a disconnecting client asks for: far more than it waits for


def aborted(server) -> float:
    try:
        return server.metric("sparse_llm:request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0


def wait_idle(server, timeout: float = 30.0) -> float:
    """Seconds until no request runs or waits and every KV block is free; fails after `timeout`."""
    t0 = time.monotonic()
    while True:
        busy = (server.metric("sparse_llm:num_requests_running") + server.metric("sparse_llm:num_requests_waiting")
                + server.metric("sparse_llm:kv_blocks_used"))
        if busy == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"server still busy after {timeout} s: {server.metrics()}"
        time.sleep(0.05)


def test_stream_disconnect_aborts_and_frees_blocks(live_server):
    wait_idle(live_server)
    before = aborted(live_server)
    body = {"prompt": "Count from one to a thousand:", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with live_server.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first token
    assert wait_idle(live_server, timeout=15) < 15
    assert aborted(live_server) == before + 1


def test_non_streaming_disconnect_aborts(live_server):
    wait_idle(live_server)
    before = aborted(live_server)
    with live_server.client(timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"prompt": "Count:", "max_tokens": LONG, "ignore_eos": True})
    wait_idle(live_server, timeout=15)
    assert aborted(live_server) == before + 1


async def _client(server, i: int, leave: bool, client: httpx.AsyncClient) -> tuple[int, bool]:
    body = {"prompt": f"Request {i}: say something about the number {i}.", "stream": True, "temperature": 0.7, "seed": i,
            "max_tokens": LONG if leave else 3, "ignore_eos": leave}
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and leave:
                break
            done = done or line == "data: [DONE]"
        return r.status_code, done


def test_concurrent_streams_with_disconnects(live_server):
    n = 200
    wait_idle(live_server)
    before = aborted(live_server)

    async def main():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {live_server.api_key}"}
        async with httpx.AsyncClient(base_url=live_server.base_url, headers=headers, limits=limits, timeout=300) as client:
            return await asyncio.gather(*(_client(live_server, i, i % 5 == 0, client) for i in range(n)))

    results = asyncio.run(main())
    assert [s for s, _ in results] == [200] * n
    assert all(done for i, (_, done) in enumerate(results) if i % 5 != 0)  # the others read to [DONE]
    wait_idle(live_server, timeout=60)
    assert aborted(live_server) - before == n // 5
    five_xx = sum(v for k, v in live_server.metrics().items() if k.startswith("sparse_llm:http_requests_total") and 'status="5' in k)
    assert five_xx == 0
    with live_server.client() as c:
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "Still alive?", "max_tokens": 2}).status_code == 200
