"""`bench throughput` / `bench latency` on the real SmolLM2 through the CLI parser, with --compare and
--output-json (the model is loaded once per session and shared)."""
from __future__ import annotations

import json

import pytest

from sparse_llm.cli import build_parser
from sparse_llm.commands import bench as bench_cmd

pytestmark = pytest.mark.slow

ENGINE = ["--max-model-len", "512", "--kv-max-tokens", "2048", "--no-progress"]


@pytest.fixture(scope="module")
def make_llm(smollm2):
    from sparse_llm.llm import LLM

    return lambda args: LLM.from_loaded(smollm2, args)


def run(argv, make_llm) -> int:
    return bench_cmd.main(build_parser(argv).parse_args(argv), make_llm=make_llm)


def test_throughput_compare_writes_json(tmp_path, make_llm, capsys):
    dense, stream = tmp_path / "dense.yaml", tmp_path / "stream.yaml"
    dense.write_text("max_num_seqs: 4\n")
    stream.write_text("max_num_seqs: 4\nsparse_attention_config: {algorithm: streaming, sink_tokens: 2, local_window: 8}\n")
    out = tmp_path / "tp.json"
    argv = ["bench", "throughput", "--dataset", "random", "--num-requests", "4", "--input-len", "40", "--output-len", "3",
            "--compare", str(dense), str(stream), "--output-json", str(out), *ENGINE]
    assert run(argv, make_llm) == 0
    data = json.loads(out.read_text())
    a, b = data["results"][str(dense)], data["results"][str(stream)]
    assert data["mode"] == "throughput" and data["settings"]["num_requests"] == 4
    for r in (a, b):
        assert r["num_requests"] == 4 and r["total_prompt_tokens"] == 160 and r["total_output_tokens"] == 12
        assert r["output_tokens_per_s"] == pytest.approx(12 / r["elapsed_s"])
    assert a["sparsity"] == {"prefill": None, "decode": None} and b["sparsity"]["prefill"] > 0.5
    assert "x)" in capsys.readouterr().out  # ratios to the first config


def test_latency_batch_one(make_llm, capsys):
    argv = ["bench", "latency", "--num-requests", "2", "--input-len", "20", "--output-len", "3", "--warmup", "1", *ENGINE]
    assert run(argv, make_llm) == 0
    text = capsys.readouterr().out
    assert "TTFT mean ms" in text and "TPOT mean ms" in text and "E2EL p99 ms" in text


def test_throughput_on_eval_prompts_reports_accuracy(tmp_path, make_llm):
    out = tmp_path / "acc.json"
    argv = ["bench", "throughput", "--dataset", "ruler_niah", "--num-requests", "2", "--input-len", "300",
            "--output-json", str(out), *ENGINE]
    assert run(argv, make_llm) == 0
    r = json.loads(out.read_text())["results"]["defaults"]
    assert r["accuracy"] == 1.0


@pytest.mark.parametrize("argv,fragment", [
    (["bench", "throughput", "--dataset", "jsonl"], "--dataset jsonl needs --dataset-path"),
    (["bench", "latency", "--dataset-path", "x.jsonl"], "--dataset-path needs --dataset jsonl"),
    (["bench", "throughput", "--num-requests", "0"], "--num-requests must be >= 1"),
    (["bench", "throughput", "--compare", "a.yaml", "--config", "b.yaml"], "--compare replaces --config"),
    (["bench", "serve", "--base-url", "http://127.0.0.1:9", "--extra-body", "[1]"], "--extra-body must be a JSON object"),
])
def test_bench_cli_errors_before_loading_anything(argv, fragment, capsys):
    from sparse_llm.cli import main

    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
