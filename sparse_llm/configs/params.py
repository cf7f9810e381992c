"""Frozen per-layer parameters: what user configs are lowered into and the only thing backends see.

`None` for a layer means "this layer stays dense".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LayerSparseParams:
    """Base of all per-layer params. `algorithm` selects the backend family."""

    algorithm: str

    @property
    def registry_key(self) -> str:
        """The algorithm key of backends.registry.BACKENDS (an algorithm with variants overrides it)."""
        return self.algorithm


@dataclass(frozen=True, slots=True)
class SkipSoftmaxParams(LayerSparseParams):
    """BLASST / TensorRT-LLM skip-softmax: λ = factor / kv_len; None for a phase = that phase is dense."""

    prefill_factor: float | None = None
    decode_factor: float | None = None
    # Prefill also skips tiles before QK^T when a per-block key min/max bound proves BLASST would skip them
    # (same output and skip set; backends/key_bounds.py).
    bound_skip: bool = False

    def factor(self, phase: str) -> float | None:
        return self.prefill_factor if phase == "prefill" else self.decode_factor


@dataclass(frozen=True, slots=True)
class StreamingParams(LayerSparseParams):
    """StreamingLLM / MInference A-shape: attend to the first sink tokens and a local window."""

    sink_tokens: int = 4
    local_window: int = 256


@dataclass(frozen=True, slots=True)
class RocketParams(LayerSparseParams):
    window_size: int = 32
    kernel_size: int = 63
    topr: int = 32  # resolved to a channel count
    topk: int = 64
    prompt_budget: int = 2048
    page_size: int = 4
    kt_cache_dtype: str = "float8_e5m2"
    seq_len_threshold: int | None = None


@dataclass(frozen=True, slots=True)
class DsaParams(LayerSparseParams):
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_max_chunk_size: int = 32768
    skip_indexer_for_short_seqs: bool = True
    indexer_k_dtype: str = "fp8"
    seq_len_threshold: int | None = None
