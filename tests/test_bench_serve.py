"""`bench serve` against the real server: vLLM metrics, --output-json, eval prompts scored through HTTP
(the offline accuracy is reachable through serve + bench serve), a per-request override, failures."""
from __future__ import annotations

import json

import pytest

from sparse_llm.cli import main

pytest_plugins = ["serve_live_server"]
pytestmark = pytest.mark.slow


def test_bench_serve_random(live_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", live_server.base_url, "--api-key", live_server.api_key, "--model", "smollm2",
            "--num-requests", "6", "--input-len", "12", "--output-len", "4", "--max-concurrency", "3",
            "--request-rate", "50", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"][live_server.base_url]
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["total_input_tokens"] == 72 and r["total_output_tokens"] == 24  # ignore_eos: exactly 4 each
    assert r["max_concurrency"] == 3 and r["request_rate"] == 50.0
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert r[key]["mean_ms"] > 0 and r[key]["p99_ms"] >= r[key]["median_ms"]
    assert r["e2el"]["mean_ms"] >= r["ttft"]["mean_ms"]
    assert "TTFT median ms" in capsys.readouterr().out


def test_bench_serve_eval_prompts_accuracy_and_override(live_server, tmp_path):
    base = ["bench", "serve", "--base-url", live_server.base_url, "--api-key", live_server.api_key,
            "--dataset", "ruler_niah", "--num-requests", "2", "--input-len", "500", "--no-progress"]
    dense, sparse = tmp_path / "dense.json", tmp_path / "sparse.json"
    assert main([*base, "--output-json", str(dense)]) == 0
    assert main([*base, "--output-json", str(sparse), "--extra-body",
                 '{"sparse_attention": {"threshold_scale_factor": {"prefill": 300}}}']) == 0
    d = json.loads(dense.read_text())["results"][live_server.base_url]
    s = json.loads(sparse.read_text())["results"][live_server.base_url]
    assert d["accuracy"] == 1.0 and d["sparsity"] == {"prefill": None, "decode": None}
    assert s["sparsity"]["prefill"] > 0


def test_bench_serve_counts_failures(live_server, capsys):
    argv = ["bench", "serve", "--base-url", live_server.base_url, "--api-key", "wrong", "--num-requests", "2",
            "--input-len", "4", "--output-len", "2", "--no-progress"]
    assert main(argv) == 1
    assert "HTTP 401" in capsys.readouterr().out
