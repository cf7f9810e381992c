"""`bench serve`: a streaming load generator for any OpenAI-compatible server (vLLM's benchmark_serving).

Requests arrive as a Poisson process of `request_rate` per second (inf = all at once), at most
`max_concurrency` in flight, each a streaming /v1/completions call. Timings are taken on the client:
TTFT at the first chunk with text, ITL between chunks with text, E2EL at the end of the stream; output
tokens come from the server's usage (stream_options.include_usage). Eval-task prompts are scored too.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from sparse_llm.bench.datasets import BenchRequest
from sparse_llm.bench.stats import mean_or_none, summarize, tpot


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    text: str = ""
    sparsity: dict[str, float | None] | None = None


async def _one(client: httpx.AsyncClient, url: str, body: dict, req: BenchRequest) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message')}"
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.sparsity = chunk.get("sparsity")
                text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if text:
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.text += text
        res.e2el = time.perf_counter() - start
        if res.output_tokens == 0:
            res.error = "the server sent no usage (stream_options.include_usage): output tokens unknown"
            return res
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def arrival_gaps(num: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson arrivals), or none for rate inf."""
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num
    return np.random.default_rng(seed).exponential(1.0 / request_rate, num).tolist()


async def run(
    base_url: str,
    model: str | None,
    requests: list[BenchRequest],
    max_concurrency: int | None = None,
    request_rate: float = math.inf,
    api_key: str | None = None,
    ignore_eos: bool = True,
    extra_body: dict | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
    progress: bool = True,
    scorer=None,
) -> dict[str, Any]:
    """Send every request, then summarise; `scorer(text, answers) -> float` scores eval prompts."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(requests)
    sem = asyncio.Semaphore(limit)
    gaps = arrival_gaps(len(requests), request_rate, seed)
    bar = tqdm(total=len(requests), desc="bench serve", disable=not progress)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        async def send(req: BenchRequest) -> RequestResult:
            body = {"prompt": req.prompt, "max_tokens": req.output_len, "stream": True,
                    "stream_options": {"include_usage": True}, **(extra_body or {})}
            if model is not None:
                body["model"] = model
            if ignore_eos:
                body["ignore_eos"] = True
            async with sem:
                r = await _one(client, url, body, req)
            bar.update(1)
            return r

        tasks = []
        start = time.perf_counter()
        for req, gap in zip(requests, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return summarize_results(results, requests, duration, max_concurrency, request_rate, scorer)


def summarize_results(results: list[RequestResult], requests: list[BenchRequest], duration: float,
                      max_concurrency: int | None, request_rate: float, scorer=None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "max_concurrency": max_concurrency,
        "request_rate": request_rate if not math.isinf(request_rate) else "inf",
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot": summarize([t for r in ok if r.ttft is not None and (t := tpot(r.e2el, r.ttft, r.output_tokens)) is not None]),
        "itl": summarize([x for r in ok for x in r.itl]),
        "e2el": summarize([r.e2el for r in ok]),
        "sparsity": {p: mean_or_none([(r.sparsity or {}).get(p) for r in ok]) for p in ("prefill", "decode")},
    }
    if scorer is not None:
        scores = [scorer(r.text, q.answers) if r.ok else 0.0 for r, q in zip(results, requests)]
        out["accuracy"] = float(np.mean(scores))
    return out
