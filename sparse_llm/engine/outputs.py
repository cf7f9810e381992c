"""What the engine returns per request (vLLM's shapes), plus the engine-wide statistics snapshot."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class RequestMetrics:
    """Timings (time.monotonic seconds) and counts of one request; sparsity = skipped / total work per phase."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    ttft: float | None = None  # first_token_time - arrival_time
    decode_time: float | None = None  # last token time - first_token_time
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    sparsity: dict[str, float | None] = field(default_factory=lambda: {"prefill": None, "decode": None})


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS / length


@dataclass(slots=True)
class RequestOutput:
    """Cumulative state of one request (every step returns the whole text so far, vLLM semantics)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason


@dataclass(slots=True)
class EngineStats:
    """A snapshot for /metrics, bench reports and logs."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    cached_tokens_total: int
    sparsity: dict[str, float | None]  # over all sparse layers and requests so far
    layer_sparsity: dict[int, dict[str, float | None]]  # sparse layers only
    # Of all visited tiles, the fraction the prefill key-bound pre-check skipped before QK^T (part of `sparsity`).
    pre_skipped: dict[str, float | None] = field(default_factory=lambda: {"prefill": None, "decode": None})

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
