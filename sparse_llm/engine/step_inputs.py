"""Turns a scheduled batch into the model's inputs and the one AttentionMetadata of the step.

Done once per step on the host (FlashInfer's plan/run split): token ids, positions, slot mapping, block
tables, per-sequence thresholds; layers only read the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [num_sampling]: token index whose logits are sampled
    sampling_seqs: list[Sequence]  # sequences that get a new token this step (their last token is computed)
    phases: list[str]  # per sequence of the batch


def build_step_inputs(batch: ScheduledBatch, block_size: int, device: torch.device, collect_stats: bool) -> StepInputs:
    seqs, qlens = batch.seqs, batch.num_new_tokens
    starts = [s.num_computed_tokens for s in seqs]  # true positions (RoPE)
    # Cache lengths: after prompt compression a sequence's cache holds fewer tokens than its position.
    evicted = [s.num_evicted_tokens for s in seqs]
    seq_lens = [st - e + n for st, e, n in zip(starts, evicted, qlens)]
    phases = batch.phases

    input_ids: list[int] = []
    for s, st, n in zip(seqs, starts, qlens):
        input_ids.extend(s.token_ids[st:st + n])
    qlens_t = torch.tensor(qlens, dtype=torch.int64)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(qlens_t, 0, out=cu[1:])
    # positions: each sequence's tokens continue from its num_computed_tokens
    offsets = torch.repeat_interleave(cu[:-1] - torch.tensor(starts, dtype=torch.int64), qlens_t)
    positions = torch.arange(int(cu[-1])) - offsets

    width = max(len(s.block_table) for s in seqs)
    block_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
    token_seq = torch.repeat_interleave(torch.arange(len(seqs)), qlens_t)
    cache_pos = positions - torch.tensor(evicted, dtype=torch.int64)[token_seq]
    slot_mapping = block_tables[token_seq, cache_pos // block_size].long() * block_size + cache_pos % block_size

    sampling = [i for i, (s, st, n) in enumerate(zip(seqs, starts, qlens)) if st + n == s.num_tokens]
    sample_rows = cu[1:][sampling] - 1

    tsf = None
    if collect_stats and any(s.threshold_factors[p] is not None for s, p in zip(seqs, phases)):
        tsf = torch.tensor(
            [math.nan if s.threshold_factors[p] is None else s.threshold_factors[p] for s, p in zip(seqs, phases)],
            dtype=torch.float32,
        ).to(device)
    meta = AttentionMetadata(
        num_prefills=batch.num_prefills,
        num_prefill_tokens=sum(qlens[:batch.num_prefills]),
        cu_seqlens_q=cu.to(torch.int32).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        max_seqlen_q=max(qlens),
        max_seqlen_k=max(seq_lens),
        slot_mapping=slot_mapping.to(device),
        block_tables=block_tables.to(device),
        block_size=block_size,
        threshold_scale_factor=tsf,
        seq_stats=torch.zeros(len(seqs), 2, dtype=torch.int64, device=device) if collect_stats else None,
        seq_lens_cpu=seq_lens,
        query_lens_cpu=list(qlens),
        seq_ids=[s.seq_id for s in seqs],
    )
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device),
        positions=positions.to(device),
        meta=meta,
        sample_rows=sample_rows.to(device),
        sampling_seqs=[seqs[i] for i in sampling],
        phases=phases,
    )
