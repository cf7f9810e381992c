"""Eval end to end on the real SmolLM2: dense finds the needles, the streaming baseline loses them, the
files are written, and `eval sweep` makes its table and PNG (through the CLI parser)."""
from __future__ import annotations

import json

import pytest

from sparse_llm.cli import build_parser
from sparse_llm.commands import eval as eval_cmd

pytestmark = pytest.mark.slow

ENGINE_FLAGS = ["--max-model-len", "1024", "--kv-max-tokens", "4096", "--no-progress"]


@pytest.fixture(scope="module")
def make_llm(smollm2):
    from sparse_llm.llm import LLM

    return lambda args: LLM.from_loaded(smollm2, args)


def run_cli(argv, make_llm):
    ns = build_parser(argv).parse_args(argv)
    return eval_cmd.main(ns, make_llm=make_llm)


def test_eval_dense_then_streaming(tmp_path, make_llm, capsys):
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "streaming"
    base = ["eval", "ruler_niah", "--max-input-length", "500", "--num-samples", "2", *ENGINE_FLAGS]
    assert run_cli([*base, "--output-dir", str(dense_dir)], make_llm) == 0
    assert run_cli([*base, "--output-dir", str(sparse_dir), "--set",
                    "sparse_attention_config={algorithm: streaming, sink_tokens: 4, local_window: 32}"], make_llm) == 0
    dense = json.loads((dense_dir / "summary.json").read_text())
    sparse = json.loads((sparse_dir / "summary.json").read_text())
    assert dense["accuracy"] == 1.0 and dense["sparsity"] == {"prefill": None, "decode": None}
    assert sparse["accuracy"] < dense["accuracy"]
    assert sparse["sparsity"]["prefill"] > 0.7 and sparse["sparsity"]["decode"] > 0.8
    assert sparse["sparse_attention_config"] == {"algorithm": "streaming", "sink_tokens": 4, "local_window": 32}
    assert 450 <= dense["input_tokens"]["min"] <= dense["input_tokens"]["max"] <= 500
    rows = [json.loads(line) for line in (dense_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(r["score"] == 1.0 for r in rows)
    assert all(r["answers"][0] in r["prediction"] for r in rows)
    assert '"accuracy": 1.0' in capsys.readouterr().out


def test_eval_sweep_table_and_png(tmp_path, make_llm, capsys):
    dense = tmp_path / "dense.yaml"
    dense.write_text("max_num_seqs: 8\n")
    stream = tmp_path / "stream.yaml"
    stream.write_text("sparse_attention_config:\n  algorithm: streaming\n  sink_tokens: 4\n  local_window: 16\n")
    out = tmp_path / "sweep"
    argv = ["eval", "sweep", "--configs", str(dense), str(stream), "--tasks", "ruler_vt", "qa_packed",
            "--max-input-length", "300", "--num-samples", "1", "--max-tokens", "8", "--output-dir", str(out), *ENGINE_FLAGS]
    assert run_cli(argv, make_llm) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["config"], r["task"]) for r in rows] == [("dense", "ruler_vt"), ("dense", "qa_packed"),
                                                         ("stream", "ruler_vt"), ("stream", "qa_packed")]
    assert all(r["sparsity"]["prefill"] is None for r in rows[:2]) and all(r["sparsity"]["prefill"] > 0.5 for r in rows[2:])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "stream" / "qa_packed" / "predictions.jsonl").is_file()
    table = capsys.readouterr().out
    assert "accuracy" in table and "dense" in table and "stream" in table


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "sweep", "--tasks", "ruler_vt"], "needs --configs"),
    (["eval", "ruler_vt", "--tasks", "ruler_vt"], "belong to `eval sweep`"),
])
def test_eval_cli_errors(argv, fragment, capsys):
    from sparse_llm.cli import main

    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
