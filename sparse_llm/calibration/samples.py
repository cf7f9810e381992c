"""Calibration prompts: RULER-style samples built locally from the eval tasks (no downloads).

Length bins go from max_seqlen down by halves to min_seqlen; the sample count is split exactly over the
bins (the first bins take the remainder), and tasks rotate within each bin so every bin sees every kind.
Held-out samples use another seed and lengths between the bins, so the achieved-vs-target check is not
measured on the prompts the fit saw.
"""
from __future__ import annotations

from sparse_llm.eval.prompt import fit_to_length
from sparse_llm.eval.tasks import get_task

CALIBRATION_TASKS = ("ruler_niah_multikey", "ruler_vt", "ruler_cwe", "qa_packed", "ruler_niah")


def length_bins(max_seqlen: int, min_seqlen: int = 1024) -> list[int]:
    if max_seqlen < min_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} must be >= min_seqlen={min_seqlen}")
    out, n = [], max_seqlen
    while n >= min_seqlen:
        out.append(n)
        n //= 2
    return out


def split_counts(total: int, bins: int) -> list[int]:
    if total < bins:
        raise ValueError(f"samples={total} is fewer than the {bins} length bins; give at least one per bin")
    return [total // bins + (1 if i < total % bins else 0) for i in range(bins)]


def build_samples(tokenizer, lengths: list[int], counts: list[int], seed: str, reserve: int = 0) -> dict[int, list[list[int]]]:
    """Prompts of at most `length - reserve` tokens (room left for the recorded decode steps), keyed by length.

    Prompt j of the i-th length is task (i + j) mod 5: the task mix rotates across lengths too, so even one
    prompt per length (the held-out acceptance's default) covers every task instead of repeating the first.
    """
    out: dict[int, list[list[int]]] = {}
    for i, (length, count) in enumerate(zip(lengths, counts, strict=True)):
        prompts = []
        for j in range(count):
            name = CALIBRATION_TASKS[(i + j) % len(CALIBRATION_TASKS)]
            task = get_task(name, length - reserve)
            _, _, ids = fit_to_length(task.build, f"{seed}-{length}-{j}", tokenizer, length - reserve, name)
            prompts.append(ids)
        out[length] = prompts
    return out


def parse_lengths(text: str, name: str) -> list[int]:
    """'2048,3072' -> [3072, 2048] (longest first); an error names the option and the bad value."""
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()}, reverse=True)
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected comma-separated token counts like 2048,4096") from None
    if not out or out[-1] < 64:
        raise ValueError(f"{name} {text!r}: need at least one length, each >= 64 tokens")
    return out


def calibration_samples(tokenizer, max_seqlen: int, num_samples: int, min_seqlen: int = 1024, seed: int = 0,
                        reserve: int = 0, lengths: list[int] | None = None):
    """`num_samples` prompts split over `lengths` (default: halving bins from max_seqlen to min_seqlen)."""
    bins = lengths or length_bins(max_seqlen, min_seqlen)
    return build_samples(tokenizer, bins, split_counts(num_samples, len(bins)), f"calib{seed}", reserve)


def heldout_samples(tokenizer, max_seqlen: int, per_bin: int, min_seqlen: int = 1024, seed: int = 0, reserve: int = 0,
                    lengths: list[int] | None = None):
    """Another seed, so never the calibration prompts; lengths default to 3/4 of each halving bin."""
    bins = lengths or [b * 3 // 4 for b in length_bins(max_seqlen, min_seqlen)]
    return build_samples(tokenizer, bins, [per_bin] * len(bins), f"heldout{seed}", reserve)
