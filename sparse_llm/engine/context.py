"""The per-step attention context: set once by the model runner, read by every attention layer.

Model code then reads like the Hugging Face reference (no metadata threaded through forward()).
"""
from __future__ import annotations

from sparse_llm.backends.base import AttentionMetadata

_CONTEXT: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _CONTEXT
    _CONTEXT = meta


def get_context() -> AttentionMetadata:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside an engine step: no AttentionMetadata is set")
    return _CONTEXT
