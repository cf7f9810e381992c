"""Per-sequence skip-softmax thresholds: the part of the BLASST rule shared by every backend.

λ = threshold_scale_factor / kv_len per sequence (TensorRT-LLM's convention, so calibrated factors are
portable). A sequence is "off" (never skips) when its factor is None, 0, negative or NaN-without-a-
default, or when λ >= 1. Kernels receive log λ with -inf meaning off, so "off" needs no extra branch.
"""
from __future__ import annotations

import math

import torch

from sparse_llm.backends.base import AttentionMetadata, SparsityStats
from sparse_llm.configs.params import SkipSoftmaxParams

# (metadata object, phase) -> whether any sequence of that phase carries an override. Checked once per
# engine step (one host sync at most), not once per layer.
_override_seen: tuple[object, dict[str, bool]] | None = None


def capturing() -> bool:
    """Inside CUDA-graph capture: no host syncs allowed, shapes must come from static metadata."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def max_decode_kv_len(meta: AttentionMetadata) -> int:
    """Longest decode KV, sizing the decode split grid: the host copy if the runner gave one, else
    meta.max_seqlen_k (an upper bound; under CUDA graphs the model's maximum). Never syncs."""
    if meta.seq_lens_cpu is not None:
        return max(meta.seq_lens_cpu[meta.num_prefills:])
    return meta.max_seqlen_k


def phase_slice(meta: AttentionMetadata, phase: str) -> slice:
    """Sequences of `phase` in the metadata's vLLM order (prefills first, then decodes)."""
    if phase == "prefill":
        return slice(0, meta.num_prefills)
    if phase == "decode":
        return slice(meta.num_prefills, meta.num_seqs)
    raise ValueError(f"phase={phase!r} is not one of 'prefill', 'decode'")


def _phase_has_override(meta: AttentionMetadata, phase: str) -> bool:
    global _override_seen
    tsf = meta.threshold_scale_factor
    if tsf is None:
        return False
    if capturing():  # cannot look: capture the skip build, which handles any later values
        return True
    if _override_seen is None or _override_seen[0] is not meta:
        _override_seen = (meta, {})
    cache = _override_seen[1]
    if phase not in cache:
        vals = tsf[phase_slice(meta, phase)]
        cache[phase] = bool(((~torch.isnan(vals)) & (vals > 0)).any().item())
    return cache[phase]


def phase_log_lambda(params: SkipSoftmaxParams, meta: AttentionMetadata, phase: str) -> torch.Tensor | None:
    """Natural log λ per sequence of `phase` (float32, -inf = off), or None when the whole phase is dense.

    The phase runs the skip variant when the layer has a factor for it or any sequence overrides it;
    otherwise None, and the backend takes its dense path (no skip code, no counters).
    """
    default = params.factor(phase)
    if default is not None and (not math.isfinite(default) or default < 0):
        raise ValueError(f"threshold_scale_factor for {phase}={default!r}: must be a finite number >= 0 (0 = off)")
    sl = phase_slice(meta, phase)
    if sl.stop == sl.start:
        return None
    if not default and not _phase_has_override(meta, phase):
        return None
    kv_lens = meta.seq_lens[sl].to(torch.float32)
    base = torch.full_like(kv_lens, float(default or 0.0))
    tsf = meta.threshold_scale_factor
    if tsf is not None:
        vals = tsf[sl].to(device=kv_lens.device, dtype=torch.float32)
        base = torch.where(torch.isnan(vals), base, vals)
    lam = base / kv_lens
    on = (base > 0) & (lam < 1)
    return torch.where(on, torch.log(lam.clamp_min(torch.finfo(torch.float32).tiny)), float("-inf"))


def record_phase_stats(stats: SparsityStats, meta: AttentionMetadata, phase: str, counts: torch.Tensor) -> None:
    """Add per-sequence (total, skipped) tile counts [n, 2] to meta.seq_stats and the layer's phase totals.

    counts may carry a third column, pre-skipped tiles (the prefill bound pre-skip): layer totals only.
    Under CUDA-graph capture only the device-side per-sequence counts are kept (the runner reads them).
    """
    meta.seq_stats[phase_slice(meta, phase)] += counts[:, :2].to(device=meta.seq_stats.device,
                                                                 dtype=meta.seq_stats.dtype)
    if capturing():
        return
    stats.add(phase, *counts.sum(0).tolist())
