"""User-facing sparse-attention configs: one pydantic class per algorithm, a union keyed by `algorithm`.

The same objects come from Python, from YAML (`sparse_attention_config:` in `--config`), from `--set`
and from the server's per-request override. They are strict (unknown fields are errors) and are lowered
into frozen per-layer params by `configs.resolve`; backends never see them.
Adding an algorithm = one class here, added to `SparseAttentionConfig`, plus its lowering.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, field_validator, model_validator

from sparse_llm.configs.sparse_base import BaseSparseAttentionConfig, PhaseValues, as_phase_values
from sparse_llm.configs.sparse_more import (
    AdaSnapKVConfig,
    FlexPrefillConfig,
    QuestConfig,
    SnapKVConfig,
    VerticalSlashConfig,
    XAttentionConfig,
)

logger = logging.getLogger(__name__)


class SkipSoftmaxAttentionConfig(BaseSparseAttentionConfig):
    """BLASST / TensorRT-LLM skip-softmax: skip KV tiles whose softmax contribution is provably tiny.

    A tile is skipped when exp(tile_rowmax - running_max) < λ for every query row, with
    λ = threshold_scale_factor / kv_len. Per phase, the first source that gives a value wins:
    threshold_scale_factor > target_sparsity (through the checkpoint's calibrated formula) >
    the checkpoint's own target_sparsity > dense.
    """

    algorithm: Literal["skip_softmax"] = Field("skip_softmax", description="Selects this algorithm.")
    threshold_scale_factor: PhaseValues | None = Field(
        None,
        description="λ·kv_len: a number for both phases or {prefill: x, decode: y}; >= 0; 0 means off. "
        "Wins over target_sparsity for the phases it names.",
    )
    target_sparsity: PhaseValues | None = Field(
        None,
        description="Fraction of KV tiles to skip, in [0, 1], a number or {prefill: x, decode: y}. Needs a "
        "checkpoint calibrated with a threshold_scale_factor formula (see `sparse-llm calibrate`).",
    )
    bound_skip: bool = Field(
        False,
        description="Prefill also skips a KV tile before QK^T when a per-block key min/max bound proves the rule "
        "would skip it (same output and skipped tiles; counted as pre_skipped). Keeps a small per-block key "
        "min/max cache. Triton backend only; others compute the same output without it.",
    )

    @field_validator("threshold_scale_factor", mode="before")
    @classmethod
    def _factor(cls, v: Any) -> PhaseValues | None:
        pv = as_phase_values(v)
        for phase in ("prefill", "decode"):
            x = None if pv is None else pv.get(phase)
            if x is not None and not x >= 0:
                raise ValueError(f"threshold_scale_factor.{phase} must be >= 0, got {x}")
        return pv

    @field_validator("target_sparsity", mode="before")
    @classmethod
    def _target(cls, v: Any) -> PhaseValues | None:
        pv = as_phase_values(v)
        for phase in ("prefill", "decode"):
            x = None if pv is None else pv.get(phase)
            if x is not None and not 0.0 <= x <= 1.0:
                raise ValueError(f"target_sparsity.{phase} must be in [0, 1], got {x}")
        return pv


class RocketSparseAttentionConfig(BaseSparseAttentionConfig):
    """RocketKV: SnapKV-style prompt compression at prefill, KT-cache top-k page selection at decode."""

    algorithm: Literal["rocket"] = Field("rocket", description="Selects this algorithm.")
    window_size: int = Field(32, gt=0, description="Last prompt queries whose attention scores rank the prefix tokens.")
    kernel_size: int = Field(63, gt=0, description="Max-pooling width over the scores (odd, 'same' padding).")
    topr: int | float = Field(
        128, description="Channels of |q| used to score pages: an int > 0, or a float in (0, 1] = fraction of head_dim."
    )
    topk: int = Field(64, gt=0, description="Pages attended per KV head at each decode step (plus the current page).")
    prompt_budget: int = Field(2048, gt=0, description="Tokens kept per KV head after prompt compression.")
    page_size: int = Field(4, gt=0, description="Tokens per KT-cache page (a power of two).")
    kt_cache_dtype: Literal["bfloat16", "float8_e5m2"] = Field(
        "float8_e5m2", description="Storage type of the KT cache (per-page channel min/max of K)."
    )
    seq_len_threshold: int | None = Field(None, gt=0, description="Sequences shorter than this stay dense.")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {v}")
        return v

    @field_validator("page_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"page_size must be a power of two, got {v}")
        return v

    @field_validator("topr")
    @classmethod
    def _topr(cls, v: int | float) -> int | float:
        if isinstance(v, bool):
            raise ValueError(f"topr must be an int > 0 or a float in (0, 1], got {v!r}")
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"topr as an int must be > 0, got {v}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"topr as a float is a fraction of head_dim and must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "RocketSparseAttentionConfig":
        if self.prompt_budget <= self.window_size:
            raise ValueError(
                f"prompt_budget ({self.prompt_budget}) must be larger than window_size ({self.window_size})"
            )
        return self


class DeepSeekSparseAttentionConfig(BaseSparseAttentionConfig):
    """DeepSeek Sparse Attention: a lightning indexer picks index_topk tokens per query. Model-native:
    the checkpoint must have indexer weights; fields left None come from its config.json."""

    algorithm: Literal["dsa"] = Field("dsa", description="Selects this algorithm.")
    index_n_heads: int | None = Field(None, gt=0, description="Indexer heads (None = from the checkpoint).")
    index_head_dim: int | None = Field(None, gt=0, description="Indexer head size (None = from the checkpoint).")
    index_topk: int | None = Field(None, gt=0, description="Tokens attended per query (None = from the checkpoint).")
    indexer_max_chunk_size: int | None = Field(
        None, gt=0, description="Max query tokens per indexer chunk (None = 32768), bounds indexer memory."
    )
    skip_indexer_for_short_seqs: bool = Field(
        True, description="Sequences no longer than index_topk attend densely without running the indexer."
    )
    indexer_k_dtype: Literal["fp8", "bf16"] = Field("fp8", description="Storage type of the indexer key cache.")
    seq_len_threshold: int | None = Field(None, gt=0, description="Sequences shorter than this stay dense.")
    enable_heuristic_topk: bool | None = Field(
        None, description="Accepted for TensorRT-LLM files; has no effect here (a warning says so)."
    )

    @model_validator(mode="after")
    def _heuristic(self) -> "DeepSeekSparseAttentionConfig":
        if self.enable_heuristic_topk is not None:
            logger.warning(
                "sparse_attention_config.enable_heuristic_topk=%s is accepted for TensorRT-LLM compatibility "
                "but has no effect in sparse-llm (exact top-k is always used)",
                self.enable_heuristic_topk,
            )
        return self


class StreamingAttentionConfig(BaseSparseAttentionConfig):
    """StreamingLLM / MInference A-shape: each query sees the first sink_tokens keys and a local window.

    A baseline that forgets the middle of the context: long-context tasks must score lower with it."""

    algorithm: Literal["streaming"] = Field("streaming", description="Selects this algorithm.")
    sink_tokens: int = Field(4, ge=0, description="Leading tokens every query attends to.")
    local_window: int = Field(256, gt=0, description="Most recent keys (the query's own included) each query attends to.")


SparseAttentionConfig = Annotated[
    Union[
        SkipSoftmaxAttentionConfig,
        RocketSparseAttentionConfig,
        DeepSeekSparseAttentionConfig,
        StreamingAttentionConfig,
        XAttentionConfig,
        FlexPrefillConfig,
        VerticalSlashConfig,
        QuestConfig,
        SnapKVConfig,
        AdaSnapKVConfig,
    ],
    Field(discriminator="algorithm"),
]

ALGORITHM_ALIASES = {"softmax_skip": "skip_softmax", "deepseek_sparse_attention": "dsa", "rocketkv": "rocket"}

_ADAPTER: TypeAdapter = TypeAdapter(SparseAttentionConfig)


def algorithms() -> list[str]:
    """The `algorithm` values the union accepts."""
    return sorted(_ADAPTER.json_schema()["discriminator"]["mapping"].keys())


def parse_sparse_config(value: Any) -> BaseSparseAttentionConfig | None:
    """Validate a dict (or an existing config) into the right class; None stays None."""
    if value is None or isinstance(value, BaseSparseAttentionConfig):
        return value
    if isinstance(value, dict) and isinstance(value.get("algorithm"), str):
        value = {**value, "algorithm": ALGORITHM_ALIASES.get(value["algorithm"], value["algorithm"])}
    return _ADAPTER.validate_python(value)
