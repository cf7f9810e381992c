"""The GPU kernel benchmark must not crash: its CPU smoke mode runs every section on tiny shapes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_kernel_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "attention_kernels.py"), "--quick", "--cpu-smoke",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["correctness"]["ok"]
    assert result["prefill_dense"] and result["prefill_skip"] and result["decode_dense"] and result["decode_skip"]
    assert all(0.0 <= r["sparsity"] <= 1.0 for r in result["prefill_skip"] + result["decode_skip"])
    assert "skip-softmax decode" in proc.stdout  # the table is printed last
