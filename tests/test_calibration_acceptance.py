"""The acceptance report's parsing and table (the engine run itself is measured, see docs/calibration.md)."""
import pytest

from sparse_llm.calibration.acceptance import markdown_table, parse_targets
from sparse_llm.calibration.samples import parse_lengths


def test_targets_and_lengths_are_validated_with_the_option_named():
    assert parse_targets("0.3,0.5,0.7") == [0.3, 0.5, 0.7]
    with pytest.raises(ValueError, match=r"--targets '0.3,1.5'.*bad: \[1.5\]"):
        parse_targets("0.3,1.5")
    with pytest.raises(ValueError, match="--targets 'x'"):
        parse_targets("x")
    assert parse_lengths("4096,2048,2048", "--lengths") == [4096, 2048]
    with pytest.raises(ValueError, match="--heldout-lengths '8'"):
        parse_lengths("8", "--heldout-lengths")


def test_markdown_table_has_a_row_per_phase_and_target_and_flags_misses():
    rows = [{"target": 0.5, "length": n, "prefill": p, "decode": d}
            for n, p, d in ((2048, 0.45, 0.52), (4096, 0.56, None))]
    summary = [{"target": 0.5, "phase": "prefill", "mean": 0.505, "within_tolerance": True},
               {"target": 0.5, "phase": "decode", "mean": None, "within_tolerance": False}]
    table = markdown_table({"lengths": [4096, 2048], "rows": rows, "summary": summary}).splitlines()
    assert table[0] == "| phase | target | 2K | 4K | mean | ±0.05 |"
    assert table[2] == "| prefill | 0.50 | 0.450 | 0.560 | 0.505 | yes |"
    assert table[3] == "| decode | 0.50 | 0.520 |   off |   off | **no** |"
