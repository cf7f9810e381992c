"""Printing benchmark results: one column per config, ratios to the first, and the JSON file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (label, path into the result dict, higher is better)
ROWS = {
    "throughput": [
        ("requests/s", ("requests_per_s",), True),
        ("output tokens/s", ("output_tokens_per_s",), True),
        ("total tokens/s", ("total_tokens_per_s",), True),
        ("elapsed s", ("elapsed_s",), False),
        ("sparsity prefill", ("sparsity", "prefill"), True),
        ("sparsity decode", ("sparsity", "decode"), True),
    ],
    "latency": [
        ("TTFT mean ms", ("ttft", "mean_ms"), False),
        ("TTFT p99 ms", ("ttft", "p99_ms"), False),
        ("TPOT mean ms", ("tpot", "mean_ms"), False),
        ("TPOT p99 ms", ("tpot", "p99_ms"), False),
        ("E2EL mean ms", ("e2el", "mean_ms"), False),
        ("E2EL p99 ms", ("e2el", "p99_ms"), False),
        ("sparsity prefill", ("sparsity", "prefill"), True),
        ("sparsity decode", ("sparsity", "decode"), True),
    ],
    "serve": [
        ("completed", ("completed",), True),
        ("failed", ("failed",), False),
        ("requests/s", ("request_throughput",), True),
        ("output tokens/s", ("output_throughput",), True),
        ("total tokens/s", ("total_token_throughput",), True),
        ("TTFT mean ms", ("ttft", "mean_ms"), False),
        ("TTFT median ms", ("ttft", "median_ms"), False),
        ("TTFT p99 ms", ("ttft", "p99_ms"), False),
        ("TPOT mean ms", ("tpot", "mean_ms"), False),
        ("TPOT median ms", ("tpot", "median_ms"), False),
        ("TPOT p99 ms", ("tpot", "p99_ms"), False),
        ("ITL mean ms", ("itl", "mean_ms"), False),
        ("ITL median ms", ("itl", "median_ms"), False),
        ("ITL p99 ms", ("itl", "p99_ms"), False),
        ("E2EL mean ms", ("e2el", "mean_ms"), False),
        ("E2EL median ms", ("e2el", "median_ms"), False),
        ("E2EL p99 ms", ("e2el", "p99_ms"), False),
        ("sparsity prefill", ("sparsity", "prefill"), True),
        ("sparsity decode", ("sparsity", "decode"), True),
        ("accuracy", ("accuracy",), True),
    ],
}


def _get(result: dict, path: tuple[str, ...]):
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(mode: str, results: dict[str, dict]) -> str:
    """Rows of metrics, one column per config; with several configs, each later column shows its ratio to
    the first, e.g. `123.4 (1.52x)`."""
    names = list(results)
    rows = [["metric", *names]]
    for label, path, _ in ROWS[mode]:
        base = _get(results[names[0]], path)
        cells = [label]
        for i, name in enumerate(names):
            v = _get(results[name], path)
            cell = _fmt(v)
            if i > 0 and isinstance(v, (int, float)) and isinstance(base, (int, float)) and base:
                cell += f" ({v / base:.2f}x)"
            cells.append(cell)
        if any(c != "-" for c in cells[1:]):
            rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
