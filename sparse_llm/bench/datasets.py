"""Benchmark request sets: random token ids of fixed lengths, token-norm-dist lengths, a JSONL of
prompts, or the prompts of an eval task (scored, so accuracy can be measured through a server).

Random prompts are token ids (no decode/re-encode round trip), so their lengths are exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("random", "token-norm-dist", "jsonl", "eval")


@dataclass(slots=True)
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    answers: list[str] = field(default_factory=list)  # eval prompts only: gold answers for scoring


def _sampleable_ids(tokenizer) -> np.ndarray:
    """Every id of the vocabulary except special tokens (they would change how a model reads the prompt)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


def random_requests(tokenizer, num: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """vLLM's `random` dataset with range_ratio 0: every prompt exactly input_len tokens."""
    _positive(num=num, input_len=input_len, output_len=output_len)
    rng = np.random.default_rng(seed)
    ids = _sampleable_ids(tokenizer)
    return [BenchRequest(rng.choice(ids, input_len).tolist(), input_len, output_len) for _ in range(num)]


def token_norm_dist_requests(tokenizer, num: int, input_mean: int, input_std: float, output_mean: int, output_std: float,
                             seed: int) -> list[BenchRequest]:
    """TensorRT-LLM's `token-norm-dist`: lengths drawn from normal distributions, rounded, at least 1."""
    _positive(num=num, input_len=input_mean, output_len=output_mean)
    if input_std < 0 or output_std < 0:
        raise ValueError(f"--input-len-std and --output-len-std must be >= 0, got {input_std} and {output_std}")
    rng = np.random.default_rng(seed)
    ids = _sampleable_ids(tokenizer)
    in_lens = np.maximum(1, np.rint(rng.normal(input_mean, input_std, num))).astype(int)
    out_lens = np.maximum(1, np.rint(rng.normal(output_mean, output_std, num))).astype(int)
    return [BenchRequest(rng.choice(ids, n).tolist(), int(n), int(m)) for n, m in zip(in_lens, out_lens)]


def jsonl_requests(path: str | Path, tokenizer, num: int | None, output_len: int) -> list[BenchRequest]:
    """One JSON object per line: {"prompt": str} or {"prompt_token_ids": [...]}, optional "output_len"."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--dataset-path {str(path)!r}: no such file")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("prompt_token_ids" in row):
            raise ValueError(f"{path}:{lineno}: expected an object with exactly one of 'prompt' or 'prompt_token_ids'")
        n_out = row.get("output_len", output_len)
        if not isinstance(n_out, int) or n_out < 1:
            raise ValueError(f"{path}:{lineno}: output_len must be an integer >= 1, got {n_out!r}")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
            out.append(BenchRequest(row["prompt"], len(tokenizer.encode(row["prompt"])), n_out))
        else:
            ids = row["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"{path}:{lineno}: 'prompt_token_ids' must be a non-empty list of ids >= 0")
            out.append(BenchRequest(ids, len(ids), n_out))
        if num is not None and len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no requests found")
    return out


def eval_requests(task_name: str, tokenizer, num: int, input_len: int, seed: int, output_len: int | None) -> list[BenchRequest]:
    """The samples of an eval task (chat template applied), as token ids, with their gold answers."""
    from sparse_llm.eval.runner import make_samples
    from sparse_llm.eval.tasks import get_task

    task = get_task(task_name, input_len)
    return [
        BenchRequest(s.prompt_token_ids, len(s.prompt_token_ids), output_len or task.max_tokens, s.answers)
        for s in make_samples(task, tokenizer, num, seed)
    ]


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
