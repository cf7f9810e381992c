"""Bench building blocks without a model: datasets, vLLM-style statistics, arrivals, the report table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sparse_llm.bench import datasets, report, stats
from sparse_llm.bench.serve_client import RequestResult, arrival_gaps, summarize_results


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from sparse_llm.models.loader import open_source_tokenizer

    return open_source_tokenizer(smollm2_path)


def test_random_dataset_exact_lengths_no_special_tokens(tokenizer):
    reqs = datasets.random_requests(tokenizer, 5, 37, 9, seed=1)
    special = set(tokenizer.all_special_ids)
    assert [len(r.prompt) for r in reqs] == [37] * 5 and all(r.prompt_len == 37 and r.output_len == 9 for r in reqs)
    assert not special & {t for r in reqs for t in r.prompt}
    assert all(0 <= t < len(tokenizer) for r in reqs for t in r.prompt)
    again = datasets.random_requests(tokenizer, 5, 37, 9, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    assert datasets.random_requests(tokenizer, 1, 37, 9, seed=2)[0].prompt != reqs[0].prompt
    with pytest.raises(ValueError, match="--input-len must be >= 1, got 0"):
        datasets.random_requests(tokenizer, 1, 0, 9, seed=1)


def test_token_norm_dist(tokenizer):
    reqs = datasets.token_norm_dist_requests(tokenizer, 400, 50, 10.0, 20, 5.0, seed=0)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert all(len(r.prompt) == r.prompt_len >= 1 for r in reqs) and outs.min() >= 1
    assert abs(ins.mean() - 50) < 2 and abs(ins.std() - 10) < 2 and abs(outs.mean() - 20) < 1.5
    fixed = datasets.token_norm_dist_requests(tokenizer, 3, 12, 0.0, 4, 0.0, seed=0)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(12, 4)] * 3
    with pytest.raises(ValueError, match="std"):
        datasets.token_norm_dist_requests(tokenizer, 3, 12, -1.0, 4, 0.0, seed=0)


def test_jsonl_dataset(tmp_path, tokenizer):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "Hello there"}\n\n{"prompt_token_ids": [1, 2, 3], "output_len": 7}\n{"prompt": "x"}\n')
    reqs = datasets.jsonl_requests(p, tokenizer, 2, 5)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [
        ("Hello there", len(tokenizer.encode("Hello there")), 5), ([1, 2, 3], 3, 7)]
    for bad, fragment in [('{"prompt": "a", "prompt_token_ids": [1]}', "exactly one"), ("{oops", "not valid JSON"),
                          ('{"prompt": "a", "output_len": 0}', "output_len"), ('{"prompt_token_ids": [-1]}', "ids >= 0")]:
        p.write_text(bad + "\n")
        with pytest.raises(ValueError, match=fragment):
            datasets.jsonl_requests(p, tokenizer, None, 5)
    with pytest.raises(ValueError, match="no such file"):
        datasets.jsonl_requests(tmp_path / "missing.jsonl", tokenizer, None, 5)


def test_eval_dataset_carries_answers(tokenizer):
    reqs = datasets.eval_requests("ruler_niah", tokenizer, 2, 300, seed=0, output_len=None)
    assert all(270 <= r.prompt_len <= 300 and r.output_len == 32 and len(r.answers) == 1 for r in reqs)


def test_summarize_and_tpot():
    s = stats.summarize([0.001, 0.002, 0.003, 0.004])
    assert s["mean_ms"] == pytest.approx(2.5) and s["median_ms"] == pytest.approx(2.5)
    assert s["p99_ms"] == pytest.approx(np.percentile([1, 2, 3, 4], 99)) and s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert stats.summarize([])["mean_ms"] is None
    assert stats.tpot(e2el=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert stats.tpot(1.0, 0.1, 1) is None
    assert stats.mean_or_none([None, 0.2, 0.4]) == pytest.approx(0.3) and stats.mean_or_none([None]) is None


def test_arrivals_are_poisson_and_seeded():
    gaps = arrival_gaps(4000, 20.0, seed=3)
    assert gaps == arrival_gaps(4000, 20.0, seed=3)
    assert abs(np.mean(gaps) - 1 / 20) < 0.005 and abs(np.std(gaps) - 1 / 20) < 0.005  # exponential: mean = std
    assert arrival_gaps(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError, match="--request-rate must be > 0"):
        arrival_gaps(5, 0.0, seed=0)


def test_summarize_results_vllm_definitions():
    ok = RequestResult(ok=True, prompt_len=10, output_tokens=5, ttft=0.1, itl=[0.05, 0.05, 0.1, 0.1], e2el=0.4,
                       sparsity={"prefill": 0.5, "decode": None}, text=" 42")
    one = RequestResult(ok=True, prompt_len=4, output_tokens=1, ttft=0.2, e2el=0.2, text=" nope")
    bad = RequestResult(ok=False, error="HTTP 400: bad", prompt_len=3)
    reqs = [datasets.BenchRequest([1], 1, 1, ["42"]), datasets.BenchRequest([1], 1, 1, ["7"]), datasets.BenchRequest([1], 1, 1, ["x"])]
    r = summarize_results([ok, one, bad], reqs, duration=2.0, max_concurrency=4, request_rate=math.inf,
                          scorer=lambda text, answers: float(answers[0] in text))
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, ["HTTP 400: bad"])
    assert r["total_input_tokens"] == 14 and r["total_output_tokens"] == 6
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 3.0 and r["total_token_throughput"] == 10.0
    assert r["tpot"]["mean_ms"] == pytest.approx((0.4 - 0.1) / 4 * 1000)  # the 1-token request has no TPOT
    assert r["ttft"]["mean_ms"] == pytest.approx(150) and r["itl"]["mean_ms"] == pytest.approx(75)
    assert r["e2el"]["median_ms"] == pytest.approx(300)
    assert r["sparsity"] == {"prefill": 0.5, "decode": None} and r["accuracy"] == pytest.approx(1 / 3)
    assert r["request_rate"] == "inf"
    json.dumps(r)  # JSON-serialisable for --output-json


def test_report_table_ratios_and_json(tmp_path):
    results = {"a.yaml": {"requests_per_s": 2.0, "output_tokens_per_s": 100.0, "total_tokens_per_s": 300.0,
                          "elapsed_s": 4.0, "sparsity": {"prefill": None, "decode": None}},
               "b.yaml": {"requests_per_s": 3.0, "output_tokens_per_s": 150.0, "total_tokens_per_s": 450.0,
                          "elapsed_s": 2.0, "sparsity": {"prefill": 0.5, "decode": None}}}
    text = report.table("throughput", results)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "a.yaml", "b.yaml"]
    assert "3.0000 (1.50x)" in text and "0.5000" in text and "decode" not in text  # all-empty rows are dropped
    report.write_json(tmp_path / "x" / "r.json", {"results": results})
    assert json.loads((tmp_path / "x" / "r.json").read_text())["results"] == results
