"""Offline benchmarks on an `LLM`: throughput (all requests at once) and latency (one request at a time)."""
from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from sparse_llm.bench.datasets import BenchRequest
from sparse_llm.bench.stats import summarize, tpot


def _params(req: BenchRequest, ignore_eos: bool, greedy: bool = False):
    from sparse_llm import SamplingParams

    # vLLM's throughput settings: plain sampling, fixed output length; greedy for scored (eval) prompts.
    return SamplingParams(max_tokens=req.output_len, temperature=0.0 if greedy else 1.0, top_p=1.0, ignore_eos=ignore_eos)


def _engine_sparsity(llm) -> dict[str, float | None]:
    return dict(llm.engine.stats().sparsity)


def throughput(llm, requests: list[BenchRequest], ignore_eos: bool = True, progress: bool = True,
               greedy: bool = False) -> dict[str, Any]:
    """Requests/s, output tokens/s and total tokens/s with every request submitted at once.
    `texts` holds the generated texts (for scoring eval prompts)."""
    params = [_params(r, ignore_eos, greedy) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "num_requests": len(requests),
        "elapsed_s": elapsed,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "sparsity": _engine_sparsity(llm),
        "texts": [o.text for o in outputs],
    }


def latency(llm, requests: list[BenchRequest], warmup: int = 1, ignore_eos: bool = True, progress: bool = True) -> dict[str, Any]:
    """Batch-1 TTFT, TPOT and E2E from the engine's own request timings (no HTTP in between)."""
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    for r in requests[:warmup]:
        llm.generate([r.prompt], _params(r, ignore_eos), use_tqdm=False)
    ttfts, tpots, e2es = [], [], []
    for r in tqdm(requests, desc="latency", disable=not progress):
        out = llm.generate([r.prompt], _params(r, ignore_eos), use_tqdm=False)[0]
        m = out.metrics
        e2e = m.finished_time - m.arrival_time
        ttfts.append(m.ttft)
        e2es.append(e2e)
        t = tpot(e2e, m.ttft, m.num_generated_tokens)
        if t is not None:
            tpots.append(t)
    return {
        "num_requests": len(requests),
        "warmup": warmup,
        "ttft": summarize(ttfts),
        "tpot": summarize(tpots),
        "e2el": summarize(e2es),
        "sparsity": _engine_sparsity(llm),
    }
