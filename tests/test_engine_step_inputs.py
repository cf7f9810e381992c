"""The per-step metadata against a per-token reference: positions, slots, lengths, thresholds."""
from __future__ import annotations

import math

import torch

from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence
from sparse_llm.engine.step_inputs import build_step_inputs

BS = 4


def seq(tokens, computed, table, outputs=0, factors=None):
    s = Sequence("r", 0, list(tokens), SamplingParams(), 1000, detokenizer=None, threshold_factors=factors)
    s.num_prompt_tokens -= outputs  # the last `outputs` tokens were generated
    s.num_computed_tokens, s.block_table = computed, list(table)
    return s


def test_metadata_matches_a_per_token_reference():
    chunk = seq(range(100, 111), computed=4, table=[7, 2, 9])  # a middle chunk: tokens 4..8 of 11
    first = seq(range(200, 203), computed=0, table=[5])  # a whole short prompt
    dec = seq(range(300, 306), computed=5, table=[1, 3], outputs=2)  # a decode at position 5
    batch = ScheduledBatch([chunk, first, dec], [5, 3, 1], num_prefills=2)
    inp = build_step_inputs(batch, BS, torch.device("cpu"), collect_stats=False)

    ids, pos, slots = [], [], []
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // BS] * BS + p % BS)
    assert inp.input_ids.tolist() == ids
    assert inp.positions.tolist() == pos
    m = inp.meta
    assert m.slot_mapping.tolist() == slots
    assert m.cu_seqlens_q.tolist() == [0, 5, 8, 9]
    assert m.seq_lens.tolist() == [9, 3, 6] and m.seq_lens_cpu == [9, 3, 6] and m.query_lens_cpu == [5, 3, 1]
    assert m.block_tables.tolist() == [[7, 2, 9], [5, 0, 0], [1, 3, 0]]
    assert (m.num_prefills, m.num_prefill_tokens, m.max_seqlen_q, m.max_seqlen_k) == (2, 8, 5, 9)
    assert m.threshold_scale_factor is None and m.seq_stats is None
    assert inp.phases == ["prefill", "prefill", "decode"]
    # the middle chunk does not sample; the others sample their last token
    assert inp.sampling_seqs == [first, dec] and inp.sample_rows.tolist() == [7, 8]


def test_thresholds_follow_each_sequence_phase():
    pre = seq(range(8), computed=0, table=[0, 1], factors={"prefill": 2000.0, "decode": None})
    dec = seq(range(10, 15), computed=4, table=[2, 3], outputs=1, factors={"prefill": 5.0, "decode": 7.0})
    plain = seq(range(20, 23), computed=2, table=[4], outputs=1)
    batch = ScheduledBatch([pre, dec, plain], [8, 1, 1], num_prefills=1)
    m = build_step_inputs(batch, BS, torch.device("cpu"), collect_stats=True).meta
    tsf = m.threshold_scale_factor.tolist()
    assert tsf[:2] == [2000.0, 7.0] and math.isnan(tsf[2])
    assert m.seq_stats.shape == (3, 2) and m.seq_stats.dtype == torch.int64 and not m.seq_stats.any()
