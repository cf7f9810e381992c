"""Scheduler: token budget, chunked prefill, prefills-before-decodes order, preemption by recompute.

The model is replaced by `fake_step`, which does what the engine does after a step: marks the scheduled
tokens computed and appends one token to sequences whose tokens are all computed.
"""
from __future__ import annotations

import pytest

from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch, Scheduler
from sparse_llm.engine.sequence import Sequence, SequenceStatus

BS = 4


def seq(n_prompt: int, max_tokens: int = 4, start: int = 0) -> Sequence:
    return Sequence("r", 0, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens), 1000, detokenizer=None)


def fake_step(sched: Scheduler, batch: ScheduledBatch) -> None:
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.block_manager.register_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
            if s.num_tokens >= s.max_num_tokens:
                sched.finish(s)


def make(num_blocks=64, max_seqs=8, budget=64, chunked=True, prefix=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix), max_seqs, budget, chunked)


def test_budget_chunks_a_long_prompt_and_mixes_in_decodes():
    sched = make(budget=8)
    short, long = seq(3), seq(20, start=100)
    sched.add(short)
    b1 = sched.schedule()
    assert b1.seqs == [short] and b1.num_new_tokens == [3]
    fake_step(sched, b1)
    sched.add(long)
    b2 = sched.schedule()
    # prefill chunk first, then the decode; together within the budget
    assert b2.seqs == [long, short] and b2.num_new_tokens == [7, 1] and b2.num_prefills == 1
    fake_step(sched, b2)
    b3 = sched.schedule()
    assert b3.num_new_tokens[-1] == 1 and sum(b3.num_new_tokens) <= 8
    # the long prompt's chunks cover it exactly once
    done = 7
    while long.num_output_tokens == 0:
        done += dict(zip(map(id, b3.seqs), b3.num_new_tokens)).get(id(long), 0)
        fake_step(sched, b3)
        b3 = sched.schedule()
    assert done == 20


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched = make(budget=10, chunked=False)
    a, b = seq(6), seq(6, start=50)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a]  # b (6 tokens) does not fit the 4 left; it is not split
    fake_step(sched, batch)
    batch = sched.schedule()
    assert batch.seqs == [b, a] and batch.num_new_tokens == [6, 1]


def test_max_num_seqs_caps_the_batch():
    sched = make(max_seqs=2)
    seqs = [seq(2, start=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences of 8 prompt tokens and 12 new tokens each cannot both finish.
    sched = make(num_blocks=6, budget=64)
    a, b = seq(8, max_tokens=12), seq(8, max_tokens=12, start=100)
    sched.add(a)
    sched.add(b)
    preempted_b = False
    for _ in range(100):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert batch.num_prefills == sum(1 for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_decode_step(n))
        used = sum(len(s.block_table) for s in sched.running)
        assert used <= 6
        if b.status is SequenceStatus.WAITING and b.num_output_tokens > 0:
            preempted_b = True
            assert b.block_table == [] and b.num_computed_tokens == 0
            assert a.status is SequenceStatus.RUNNING  # the older sequence keeps running
        fake_step(sched, batch)
    assert preempted_b and sched.num_preemptions >= 1
    assert a.is_finished and b.is_finished
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert sched.block_manager.num_free_blocks == 6


def test_recompute_after_preemption_is_a_prefill_of_prompt_and_output():
    sched = make(num_blocks=3, budget=64)
    a = seq(5, max_tokens=3)
    sched.add(a)
    fake_step(sched, sched.schedule())
    fake_step(sched, sched.schedule())
    sched._preempt(sched.running.pop())
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_prefills == 1 and batch.num_new_tokens == [a.num_tokens]


def test_prefix_hit_skips_cached_tokens():
    sched = make(prefix=True, budget=64)
    a = seq(13)
    sched.add(a)
    fake_step(sched, sched.schedule())
    b = seq(13)
    sched.add(b)
    batch = sched.schedule()
    i = batch.seqs.index(b)
    assert b.num_cached_tokens == 12 and batch.num_new_tokens[i] == 1
    assert b.num_computed_tokens == 12


def test_finish_and_abort_free_blocks_at_once():
    sched = make(num_blocks=8)
    a, b = seq(5), seq(5, start=30)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 4
    sched.finish(a)  # running
    assert sched.block_manager.num_free_blocks == 6 and a.is_finished and a not in sched.running
    c = seq(3, start=60)
    sched.add(c)
    sched.finish(c)  # waiting
    assert c not in sched.waiting and c.is_finished


def test_an_unschedulable_state_is_an_error_not_a_hang():
    sched = make(num_blocks=1)
    sched.add(seq(9))  # needs 3 blocks; the engine refuses such a cache size, the scheduler must not spin
    with pytest.raises(RuntimeError, match="nothing could be scheduled"):
        sched.schedule()
