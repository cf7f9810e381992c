"""One sequence (one completion of one request) and the request that groups its `n` sequences.

A sequence's tokens are prompt + generated. `num_computed_tokens` counts the tokens whose K/V are in
the paged cache; the scheduler always asks the model for tokens [num_computed_tokens, num_tokens), so a
prompt chunk, a decode step and a recompute after preemption are the same operation (vLLM v1's view).
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from sparse_llm.backends.base import PHASES
from sparse_llm.engine.detokenizer import IncrementalDetokenizer
from sparse_llm.engine.outputs import FinishReason, RequestMetrics
from sparse_llm.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids, KV bookkeeping, sampling state and per-phase attention work of one completion."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_model_len: int,
        detokenizer: IncrementalDetokenizer,
        generator: torch.Generator | None = None,
        threshold_factors: dict[str, float | None] | None = None,
    ):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # Generation stops at max_tokens or when the sequence fills max_model_len, whichever comes first.
        self.max_num_tokens = min(self.num_prompt_tokens + params.max_tokens, max_model_len)
        self.detokenizer = detokenizer
        self.generator = generator
        self.threshold_factors = threshold_factors or {p: None for p in PHASES}

        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the full blocks registered so far
        self._table_list: list[int] | None = None  # the block_table list _table_array was built from
        self._table_array = np.zeros(0, dtype=np.int32)
        self.num_computed_tokens = 0
        # Tokens dropped from the paged cache by prompt compression (RocketKV): the cache holds
        # num_computed_tokens - num_evicted_tokens tokens, while positions keep counting (engine/compaction.py).
        self.num_evicted_tokens = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # attention work units summed over layers: work[phase] = [total, skipped]
        self.work = {p: [0, 0] for p in PHASES}
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose K/V are held in the paged cache (computed minus evicted by compaction)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_table_array(self) -> np.ndarray:
        """block_table as int32, rebuilt only when it changed (a new block every block_size tokens), so a step
        does not convert every sequence's whole table again. The block manager only appends to a table or
        replaces it with a new list, so the list's identity and length tell whether the array is current."""
        t = self.block_table
        if t is not self._table_list or len(t) != len(self._table_array):
            self._table_list, self._table_array = t, np.array(t, dtype=np.int32)
        return self._table_array

    def is_decode_step(self, num_new_tokens: int) -> bool:
        """One new token after at least one generated one: a decode (a 1-token prompt tail is still prefill)."""
        num_tokens = len(self.token_ids)  # (no property calls: the scheduler asks this for every sequence, every step)
        return num_new_tokens == 1 and num_tokens > self.num_prompt_tokens and self.num_computed_tokens == num_tokens - 1

    def phase(self, num_new_tokens: int) -> str:
        return "decode" if self.is_decode_step(num_new_tokens) else "prefill"

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )


@dataclass(slots=True)
class Request:
    """A user request: prompt, sampling params and its `n` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.aborted or all(s.is_finished for s in self.seqs)
