"""Turn `sparse-llm eval` / `eval sweep` results into the accuracy table of docs/algorithms.md.

Reads every summary.json under the given directories (a sweep writes DIR/<config>/<task>/summary.json; the
config name is the summary's parent's parent directory), groups them by input length, and prints one markdown
table per length: a row per config, per task the accuracy in points, its difference to the `dense` row, and
the achieved sparsity per phase ("–" = that phase ran dense). A difference beyond --tolerance points is marked.

    python benchmarks/accuracy_table.py benchmarks/results/accuracy_h100 [--tolerance 2] [--baseline dense]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(dirs: list[Path]) -> list[dict]:
    """One row per summary.json: config (directory name), task, length, samples, accuracy, sparsity."""
    rows = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"accuracy_table: {d} is not a directory")
        for path in sorted(d.rglob("summary.json")):
            s = json.loads(path.read_text(encoding="utf-8"))
            missing = [k for k in ("task", "accuracy", "max_input_length", "sparsity", "num_samples") if k not in s]
            if missing:
                raise SystemExit(f"accuracy_table: {path} lacks {missing}; is it an eval summary.json?")
            rows.append({"config": path.parent.parent.name, "task": s["task"], "length": s["max_input_length"],
                         "samples": s["num_samples"], "accuracy": 100.0 * s["accuracy"], "sparsity": s["sparsity"],
                         "algorithm": (s.get("sparse_attention_config") or {}).get("algorithm", "dense"),
                         "scores": _scores(path.parent / "predictions.jsonl")})
    if not rows:
        raise SystemExit(f"accuracy_table: no summary.json under {[str(d) for d in dirs]}")
    return rows


def _scores(path: Path) -> dict[int, float] | None:
    """Per-sample scores by sample index (None when the predictions were not kept)."""
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["index"]] = float(rec["score"])
    return out


def paired(base: dict[int, float] | None, other: dict[int, float] | None) -> str:
    """"-lost/+gained" samples against the baseline on the same inputs: at 20 samples one flipped sample is 5
    points, and bf16 rounding alone flips borderline samples, so the paired counts say more than the difference."""
    if not base or not other or set(base) != set(other):
        return ""
    lost = sum(1 for i in base if base[i] > other[i])
    gained = sum(1 for i in base if base[i] < other[i])
    return f"; -{lost}/+{gained}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def table(rows: list[dict], length: int, baseline: str, tolerance: float) -> str:
    """The markdown table of one input length."""
    mine = [r for r in rows if r["length"] == length]
    tasks = list(dict.fromkeys(r["task"] for r in mine))
    configs = list(dict.fromkeys(r["config"] for r in mine))
    if baseline in configs:  # baseline first
        configs.remove(baseline)
        configs.insert(0, baseline)
    cell = {(r["config"], r["task"]): r for r in mine}
    samples = sorted({r["samples"] for r in mine})
    head = ["config"] + [f"{t} acc (Δ {baseline})" for t in tasks] + [f"{t} sparsity prefill / decode" for t in tasks]
    noun = "sample" if samples == [1] else "samples"
    lines = [f"**{length} tokens**, {'/'.join(map(str, samples))} {noun} per task",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        accs, spars = [], []
        for t in tasks:
            r = cell.get((c, t))
            if r is None:
                accs.append("not run")
                spars.append("")
                continue
            base = cell.get((baseline, t))
            if base is None or c == baseline:
                accs.append(f"{r['accuracy']:.1f}")
            else:
                delta = r["accuracy"] - base["accuracy"]
                mark = "" if delta >= -tolerance else " ✗"
                accs.append(f"{r['accuracy']:.1f} ({delta:+.1f}{mark}{paired(base['scores'], r['scores'])})")
            spars.append(f"{_pct(r['sparsity'].get('prefill'))} / {_pct(r['sparsity'].get('decode'))}")
        lines.append("| " + " | ".join([f"`{c}`"] + accs + spars) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="Directories searched (recursively) for summary.json files.")
    ap.add_argument("--baseline", default="dense", help="Config name the differences are taken against (default dense).")
    ap.add_argument("--tolerance", type=float, default=2.0, help="Points below the baseline marked ✗ (default 2).")
    ns = ap.parse_args(argv)
    if ns.tolerance < 0:
        ap.error(f"--tolerance must be >= 0, got {ns.tolerance}")
    rows = load(ns.dirs)
    print("\n\n".join(table(rows, n, ns.baseline, ns.tolerance) for n in sorted({r["length"] for r in rows})))
    print(f"\nAccuracy in points (0-100); ✗ = more than {ns.tolerance:g} points below `{ns.baseline}`; -lost/+gained = "
          f"samples `{ns.baseline}` answered and the config did not / the reverse (same inputs). "
          "Sparsity: the sparse algorithm's achieved fraction of work skipped per phase, mean over requests; – = dense.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
