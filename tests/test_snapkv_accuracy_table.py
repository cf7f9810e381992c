"""benchmarks/accuracy_table.py: sweep summaries (the runner's summary.json format) -> the docs table."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "accuracy_table.py"


@pytest.fixture(scope="module")
def accuracy_table():
    spec = importlib.util.spec_from_file_location("accuracy_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(root: Path, length: int, config: str, task: str, accuracy: float, prefill=None, decode=None, algorithm=None):
    d = root / str(length) / config / task
    d.mkdir(parents=True)
    summary = {"task": task, "metric": "string_match_all", "accuracy": accuracy, "num_samples": 20,
               "max_input_length": length, "sparsity": {"prefill": prefill, "decode": decode},
               "sparse_attention_config": None if algorithm is None else {"algorithm": algorithm}}
    (d / "summary.json").write_text(json.dumps(summary))


def test_table_per_length_with_deltas_marks_and_sparsity(tmp_path, accuracy_table, capsys):
    for task, dense in [("ruler_niah", 1.0), ("ruler_niah_multikey", 0.9)]:
        write(tmp_path, 4096, "dense", task, dense)
        write(tmp_path, 4096, "snapkv", task, dense - 0.05, decode=0.5, algorithm="snapkv")
        write(tmp_path, 4096, "xattention", task, dense, prefill=0.62, algorithm="xattention")
    write(tmp_path, 8150, "dense", "ruler_niah", 0.95)
    write(tmp_path, 8150, "snapkv", "ruler_niah", 0.94, decode=0.75, algorithm="snapkv")
    assert accuracy_table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    t4, t8 = out.split("**8150 tokens**")
    assert "**4096 tokens**, 20 samples per task" in t4
    lines = [line for line in t4.splitlines() if line.startswith("| `")]
    assert lines[0].startswith("| `dense` | 100.0 | 90.0 | – / – | – / – |")
    snap = next(line for line in lines if line.startswith("| `snapkv`"))
    assert "95.0 (-5.0 ✗)" in snap and "85.0 (-5.0 ✗)" in snap and "– / 50%" in snap
    xatt = next(line for line in lines if line.startswith("| `xattention`"))
    assert "100.0 (+0.0)" in xatt and "62% / –" in xatt and "✗" not in xatt
    assert "94.0 (-1.0)" in t8 and "✗" not in t8.split("Accuracy in points")[0]


def test_errors_name_the_problem(tmp_path, accuracy_table):
    with pytest.raises(SystemExit, match="no summary.json under"):
        accuracy_table.main([str(tmp_path)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text(json.dumps({"task": "t"}))
    with pytest.raises(SystemExit, match=r"lacks \['accuracy', 'max_input_length', 'sparsity', 'num_samples'\]"):
        accuracy_table.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a directory"):
        accuracy_table.main([str(tmp_path / "missing")])


def test_paired_counts_from_predictions(tmp_path, accuracy_table, capsys):
    """Same inputs, per-sample scores: dense answers 0,1,2; the config loses 1 and 2 and gains 3."""
    def predictions(config, scores):
        write(tmp_path, 4096, config, "ruler_niah", sum(scores) / len(scores), decode=0.5 if config != "dense" else None)
        lines = [json.dumps({"index": i, "score": s}) for i, s in enumerate(scores)]
        (tmp_path / "4096" / config / "ruler_niah" / "predictions.jsonl").write_text("\n".join(lines) + "\n")

    predictions("dense", [1.0, 1.0, 1.0, 0.0])
    predictions("quest", [1.0, 0.0, 0.0, 1.0])
    write(tmp_path, 4096, "nopred", "ruler_niah", 0.5)  # summary only: no paired counts
    assert accuracy_table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `quest` | 50.0 (-25.0 ✗; -2/+1) |" in out
    assert "| `nopred` | 50.0 (-25.0 ✗) |" in out
