"""Prompt compression on the paged cache (RocketKV, SnapKV, Ada-SnapKV): which sequences compact after a
step, and the block bookkeeping afterwards.

After the step that computes a sequence's last prompt token, every attention layer keeps `prompt_budget`
tokens per KV head and packs them into cache slots [0, prompt_budget) (the backend does the data movement in
`on_step_end`; K is stored after RoPE, so the kept tokens keep their original positions). Ada-SnapKV keeps a
different number n_h per head (their sum is Hkv x prompt_budget, so max n_h >= prompt_budget): its layers
raise `meta.compact_to[i]` in `on_step_end` to their longest head, never lower it, so after the step the list
holds the max over layers. The engine then counts the dropped tokens in `Sequence.num_evicted_tokens` — the
cache holds num_computed_tokens - num_evicted_tokens tokens while positions keep counting — and gives the
blocks past the new cache length back to the block manager, so the saving shows in the engine's block counts.

The block table is shared by all layers, so every layer must compact: a model where only some layers run a
compacting algorithm is refused. Prefix caching is switched off (with a warning): a compacted block no
longer holds the tokens its hash names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sparse_llm.configs.params import LayerSparseParams, RocketParams
from sparse_llm.configs.sparse_more import SnapKVParams
from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

# Params of the algorithms that compact the prompt (each has prompt_budget and seq_len_threshold).
COMPACTING_PARAMS = (RocketParams, SnapKVParams)


@dataclass(frozen=True, slots=True)
class CompactionPolicy:
    prompt_budget: int
    seq_len_threshold: int | None
    algorithm: str = "rocket"

    @classmethod
    def from_layer_params(cls, layer_params: list[LayerSparseParams | None]) -> "CompactionPolicy | None":
        """The policy of a compacting model, None for any other; clear errors for mixes the shared cache cannot hold."""
        compacting = [p for p in layer_params if isinstance(p, COMPACTING_PARAMS)]
        if not compacting:
            return None
        algorithm = compacting[0].algorithm
        other = [i for i, p in enumerate(layer_params) if not isinstance(p, COMPACTING_PARAMS)]
        if other:
            raise ValueError(
                f"algorithm {algorithm!r} compacts the paged cache that all layers share, so every attention layer must "
                f"run it; layers {other[:8]} would not (remove them from the checkpoint's ignore list / dense layers)"
            )
        keys = {(p.prompt_budget, p.seq_len_threshold, p.algorithm) for p in compacting}
        if len(keys) != 1:
            raise ValueError(
                f"compacting layers must share prompt_budget, seq_len_threshold and algorithm, got {sorted(keys, key=str)}"
            )
        budget, threshold, algorithm = keys.pop()
        return cls(budget, threshold, algorithm)

    def prefix_caching(self, enabled: bool) -> bool:
        """Prefix caching is off under compaction; say so when the user had it on."""
        if enabled:
            logger.warning(
                "algorithm %r: prefix caching disabled (kv_cache_config.enable_prefix_caching=False), "
                "because compacted KV blocks cannot be shared between requests", self.algorithm
            )
        return False

    def targets(self, batch: ScheduledBatch) -> list[int]:
        """Per sequence of the batch: the cache length after this step's compaction, or 0 (none).

        A sequence compacts once, after the step that computes its last prompt token (the last chunk with
        chunked prefill; after a preemption the recompute compacts again), when its cache then holds more
        than prompt_budget tokens and at least seq_len_threshold tokens.
        """
        out = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            kv_len = seq.num_kv_tokens + n
            last_chunk = i < batch.num_prefills and seq.num_computed_tokens + n == seq.num_tokens
            big = kv_len > self.prompt_budget and (self.seq_len_threshold is None or kv_len >= self.seq_len_threshold)
            out.append(self.prompt_budget if last_chunk and seq.num_evicted_tokens == 0 and big else 0)
        return out


def apply_compaction(block_manager: BlockManager, batch: ScheduledBatch, compact_to: list[int] | None) -> int:
    """After the step ran (num_computed_tokens already advanced): record evictions and free tail blocks.

    compact_to: the step's meta.compact_to after every layer's on_step_end (Ada-SnapKV may have raised it).
    Returns the number of blocks given back.
    """
    if compact_to is None:
        return 0
    freed = 0
    for seq, target in zip(batch.seqs, compact_to):
        if target:
            seq.num_evicted_tokens = seq.num_computed_tokens - target
            freed += block_manager.free_tail(seq, target)
    return freed
