"""sparse-llm: an LLM inference engine whose attention is sparse where it can be and dense where it must be."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sparse_llm.configs.llm_args import KvCacheConfig, LlmArgs
from sparse_llm.configs.sparse import (
    BaseSparseAttentionConfig,
    DeepSeekSparseAttentionConfig,
    RocketSparseAttentionConfig,
    SkipSoftmaxAttentionConfig,
    SparseAttentionConfig,
    StreamingAttentionConfig,
)

__version__ = "0.1.0"

# The engine pulls in torch and transformers: load it on first use, so configs stay cheap to import.
_LAZY = {
    "LLM": "sparse_llm.llm",
    "SamplingParams": "sparse_llm.engine.sampling_params",
    "RequestOutput": "sparse_llm.engine.outputs",
}

if TYPE_CHECKING:
    from sparse_llm.engine.outputs import RequestOutput
    from sparse_llm.engine.sampling_params import SamplingParams
    from sparse_llm.llm import LLM


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_llm' has no attribute {name!r}")


__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "LlmArgs",
    "KvCacheConfig",
    "SparseAttentionConfig",
    "BaseSparseAttentionConfig",
    "SkipSoftmaxAttentionConfig",
    "RocketSparseAttentionConfig",
    "DeepSeekSparseAttentionConfig",
    "StreamingAttentionConfig",
]
