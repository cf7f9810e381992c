"""Runs one eval task through an `LLM`: deterministic samples, greedy answers, per-sample scores,
`predictions.jsonl` and `summary.json` (accuracy and achieved sparsity per phase)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparse_llm.eval.prompt import Sample, fit_to_length
from sparse_llm.eval.tasks import get_task
from sparse_llm.eval.tasks.base import Task

PHASES = ("prefill", "decode")


def make_samples(task: Task, tokenizer, num_samples: int, seed: int, progress: bool = True) -> list[Sample]:
    """Sample i depends only on (task, length, seed, i): asking for more samples keeps the first ones."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    samples = []
    for i in tqdm(range(num_samples), desc=f"{task.name}: building inputs", disable=not progress):
        spec, text, ids = fit_to_length(task.build, f"{task.name}:{seed}:{i}", tokenizer, task.max_input_length, task.name)
        samples.append(Sample(i, task.name, text, ids, spec.answers, spec.info))
    return samples


def mean_sparsity(per_request: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean achieved sparsity per phase over the requests that ran that phase sparsely (None: none did)."""
    out: dict[str, float | None] = {}
    for phase in PHASES:
        vals = [s[phase] for s in per_request if s.get(phase) is not None]
        out[phase] = statistics.fmean(vals) if vals else None
    return out


def config_description(llm) -> dict[str, Any]:
    args = llm.args
    sac = args.sparse_attention_config
    return {"model": args.model or "bundled SmolLM2-135M-Instruct", "sparse_attention_config": sac.model_dump() if sac else None}


def evaluate(
    llm,
    task_name: str,
    max_input_length: int = 4096,
    num_samples: int = 20,
    seed: int = 0,
    output_dir: str | Path | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    samples: list[Sample] | None = None,
) -> dict[str, Any]:
    """Score `llm` on a task; returns the summary (also written with the predictions when output_dir is set).

    samples: inputs already built by `make_samples` for this task, length, count and seed (a sweep builds them once
    for all its configs); None builds them here."""
    from sparse_llm import SamplingParams

    task = get_task(task_name, max_input_length)
    t0 = time.perf_counter()
    if samples is None:
        samples = make_samples(task, llm.tokenizer, num_samples, seed, progress)
    elif len(samples) != num_samples or any(s.task != task.name for s in samples):
        raise ValueError(f"evaluate: the {len(samples)} prebuilt samples are not {num_samples} samples of {task.name!r}")
    t_build = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens or task.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outputs = llm.generate([s.prompt_token_ids for s in samples], params, use_tqdm=progress)
    t_gen = time.perf_counter() - t0
    records = []
    for s, out in zip(samples, outputs, strict=True):
        records.append({
            "index": s.index,
            "task": s.task,
            "input_tokens": len(s.prompt_token_ids),
            "answers": s.answers,
            "prediction": out.text,
            "score": task.score(out.text, s.answers),
            "finish_reason": out.finish_reason,
            "sparsity": dict(out.metrics.sparsity),
            "info": s.info,
        })
    lengths = [r["input_tokens"] for r in records]
    summary = {
        "task": task.name,
        "description": task.description,
        "metric": task.metric,
        "accuracy": statistics.fmean(r["score"] for r in records),
        "num_samples": len(records),
        "max_input_length": max_input_length,
        "input_tokens": {"min": min(lengths), "mean": statistics.fmean(lengths), "max": max(lengths)},
        "seed": seed,
        "sparsity": mean_sparsity([r["sparsity"] for r in records]),
        **config_description(llm),
        "build_seconds": round(t_build, 3),
        "generate_seconds": round(t_gen, 3),
    }
    if output_dir is not None:
        write_results(Path(output_dir), records, summary)
    return summary


def write_results(out: Path, records: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
