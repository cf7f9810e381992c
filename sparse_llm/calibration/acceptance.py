"""Acceptance of a calibration with the real engine: achieved vs target sparsity on held-out prompts.

The calibration's own held-out table predicts sparsity from dense activations; this runs the deployment path
itself: for each target, `LLM(sparse_attention_config=SkipSoftmaxAttentionConfig(target_sparsity=t))` (the
bundled sidecar or the checkpoint's calibrated formula) generates from held-out prompts (another seed than
calibration) one at a time (batch 1, as calibrated), prefix caching off so every prefill is measured. Achieved
= the request's skipped / visited tiles per phase (RequestOutput.metrics.sparsity); a phase passes when the
mean over lengths is within ±0.05 of the target.

    python -m sparse_llm.calibration.acceptance [--model M] [--lengths 2048,3072,4096,6144,8192]
        [--targets 0.3,0.5,0.7] [--decode-steps 64] [--per-length 1] [--attention-backend auto] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TOLERANCE = 0.05


def parse_targets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--targets {text!r}: expected comma-separated numbers like 0.3,0.5,0.7") from None
    bad = [t for t in out if not 0.0 <= t <= 1.0]
    if not out or bad:
        raise ValueError(f"--targets {text!r}: every target must be in [0, 1] (bad: {bad or 'none given'})")
    return out


def run_acceptance(model: str | None, lengths: list[int], targets: list[float], decode_steps: int, per_length: int,
                   attention_backend: str = "auto", seed: int = 0, log=print) -> dict:
    """Per (target, length): mean achieved sparsity per phase over `per_length` prompts; plus the mean over lengths."""
    from sparse_llm import LLM, SamplingParams, SkipSoftmaxAttentionConfig
    from sparse_llm.calibration.samples import heldout_samples

    if decode_steps < 1 or per_length < 1:
        raise ValueError(f"decode_steps={decode_steps} and per_length={per_length} must both be >= 1")
    common = dict(max_model_len=max(lengths), attention_backend=attention_backend,
                  kv_cache_config={"enable_prefix_caching": False})
    rows, prompts = [], None
    for t in targets:
        llm = LLM(model=model, sparse_attention_config=SkipSoftmaxAttentionConfig(target_sparsity=t), **common)
        if prompts is None:  # prompt + decode steps fit the length exactly
            prompts = heldout_samples(llm.tokenizer, max(lengths), per_length, seed=seed, reserve=decode_steps,
                                      lengths=lengths)
        params = SamplingParams(max_tokens=decode_steps, temperature=0.0, ignore_eos=True)
        for length in sorted(prompts):
            got = {"prefill": [], "decode": []}
            t0 = time.time()
            for ids in prompts[length]:
                out = llm.generate([ids], params, use_tqdm=False)[0]
                for phase in got:
                    got[phase].append(out.metrics.sparsity[phase])
            row = {"target": t, "length": length, "seconds": round(time.time() - t0, 1)}
            for phase, vals in got.items():
                row[phase] = None if None in vals else sum(vals) / len(vals)
            rows.append(row)
            log(f"target {t:.2f} length {length:6d}: prefill {_fmt(row['prefill'])} decode {_fmt(row['decode'])}"
                f" ({row['seconds']} s)")
        del llm
    summary = []
    for t in targets:
        for phase in ("prefill", "decode"):
            vals = [r[phase] for r in rows if r["target"] == t]
            mean = None if None in vals else sum(vals) / len(vals)
            summary.append({"target": t, "phase": phase, "mean": mean,
                            "within_tolerance": mean is not None and abs(mean - t) <= TOLERANCE})
    return {"model": model or "bundled SmolLM2-135M-Instruct", "lengths": lengths, "decode_steps": decode_steps,
            "per_length": per_length, "attention_backend": attention_backend, "rows": rows, "summary": summary}


def _fmt(x: float | None) -> str:
    return "  off" if x is None else f"{x:.3f}"


def markdown_table(result: dict) -> str:
    """The docs table: one row per (phase, target), one column per length, then the mean and the verdict."""
    lengths = result["lengths"]
    head = "| phase | target | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in sorted(lengths))
    lines = [head + " | mean | ±0.05 |", "|---|---|" + "---|" * (len(lengths) + 2)]
    for phase in ("prefill", "decode"):
        for s in (x for x in result["summary"] if x["phase"] == phase):
            cells = [_fmt(r[phase]) for r in sorted(result["rows"], key=lambda r: r["length"]) if r["target"] == s["target"]]
            ok = "yes" if s["within_tolerance"] else "**no**"
            lines.append(f"| {phase} | {s['target']:.2f} | " + " | ".join(cells) + f" | {_fmt(s['mean'])} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sparse_llm.calibration.samples import parse_lengths

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--lengths", default="2048,3072,4096,6144,8192")
    p.add_argument("--targets", default="0.3,0.5,0.7")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--per-length", type=int, default=1)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Write the result as JSON here.")
    ns = p.parse_args(argv)
    result = run_acceptance(ns.model, parse_lengths(ns.lengths, "--lengths"), parse_targets(ns.targets), ns.decode_steps,
                            ns.per_length, ns.attention_backend, ns.seed)
    table = markdown_table(result)
    print(table)
    if ns.out:
        Path(ns.out).write_text(json.dumps({**result, "markdown": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
