"""Latency statistics in vLLM's benchmark definitions (all in milliseconds).

- TTFT: request sent -> first token received.       - ITL: gaps between consecutive streamed chunks.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one output token.
- E2EL: request sent -> last token received.
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(values_s: list[float]) -> dict[str, float | None]:
    """mean / median / std / p90 / p99 in ms of values in seconds (None when there are no values)."""
    if not values_s:
        return {"mean_ms": None, "median_ms": None, "std_ms": None, "p90_ms": None, "p99_ms": None}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "mean_ms": float(a.mean()),
        "median_ms": float(np.median(a)),
        "std_ms": float(a.std()),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
    }


def tpot(e2el: float, ttft: float, output_tokens: int) -> float | None:
    return (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None


def mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None
