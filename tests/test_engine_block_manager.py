"""Block manager: allocation, ref counts, prefix caching (hash chain, collision checks, eviction)."""
from __future__ import annotations

import pytest

from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.sequence import Sequence

BS = 4


def seq(tokens, max_tokens=8):
    return Sequence("r", 0, list(tokens), SamplingParams(max_tokens=max_tokens), 1000, detokenizer=None)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """Admit s with its cached prefix, allocate the rest, mark every prompt token computed, register blocks."""
    cached = bm.find_cached_prefix(s)
    assert bm.can_admit(cached, s.num_tokens)
    bm.admit(s, cached)
    assert bm.ensure_blocks(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_allocation_and_free_restore_every_block():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a, b = seq(range(9)), seq(range(100, 105))
    run_prefill(bm, a)
    run_prefill(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert len(set(a.block_table) | set(b.block_table)) == 5
    assert bm.num_free_blocks == 5
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10 and a.block_table == [] and a.num_computed_tokens == 0


def test_ensure_blocks_is_all_or_nothing():
    bm = BlockManager(3, BS, enable_prefix_caching=False)
    s = seq(range(5))
    assert bm.ensure_blocks(s, 5) and len(s.block_table) == 2
    assert not bm.ensure_blocks(s, 13)  # needs 4 blocks, only 3 exist
    assert len(s.block_table) == 2 and bm.num_free_blocks == 1


def test_prefix_hit_reuses_full_blocks_and_counts_references():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    a = seq(prompt)
    run_prefill(bm, a)
    b = seq(prompt[:8] + [77, 78, 79])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    run_prefill(bm, b)
    assert b.num_cached_tokens is None  # the scheduler records it; the manager only shares blocks
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    prompt = list(range(8))  # exactly 2 blocks
    run_prefill(bm, seq(prompt))
    assert len(bm.find_cached_prefix(seq(prompt))) == 1  # the second block holds the last token: recomputed


def test_hit_after_free_revives_block_until_it_is_evicted():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    prompt = list(range(9))
    a = seq(prompt)
    run_prefill(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.find_cached_prefix(seq(prompt)) == first_two  # still registered while free
    # Fill the cache with other content: LRU eviction must drop the registration.
    other = seq(range(200, 216))
    run_prefill(bm, other)
    assert bm.find_cached_prefix(seq(prompt)) == []


def test_revived_blocks_count_against_free_blocks():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = seq(range(9))  # 3 blocks
    run_prefill(bm, a)
    bm.free(a)
    b = seq(list(range(8)) + [50] * 8)  # hits 2 freed blocks, needs 2 more: 4 > 3
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    assert not bm.can_admit(hits, b.num_tokens)
    assert bm.can_admit(hits, 11)  # 3 blocks: the 2 revived + 1 new


def test_hash_collisions_never_give_a_wrong_hit(monkeypatch):
    """Every chain hash collides: only exact token and parent checks keep prefixes apart."""
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda parent, tokens: 42))
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(bm, a)
    assert bm.find_cached_prefix(seq([9, 9, 9, 9, 5, 6, 7, 8, 9])) == []  # first block differs
    # Same first block; the second block's tokens equal a's second block but the hash maps to a's FIRST block.
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 0])) == a.block_table[:1]


def test_parent_check_rejects_a_block_whose_prefix_differs():
    """Block 2 of `b` has the same tokens as block 2 of `a`, but after a different first block."""
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq([1, 1, 1, 1, 2, 2, 2, 2, 0])
    run_prefill(bm, a)
    h_a1 = a.block_hashes[1]

    b = seq([3, 3, 3, 3, 2, 2, 2, 2, 0])
    run_prefill(bm, b)
    # Force b's chain to look up a's second block: same hash for different parents.
    bm._cached[BlockManager.chain_hash(b.block_hashes[0], (2, 2, 2, 2))] = bm._cached[h_a1]
    c = seq([3, 3, 3, 3, 2, 2, 2, 2, 5])
    assert bm.find_cached_prefix(c) == b.block_table[:1]


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    run_prefill(bm, seq(range(9)))
    assert bm.find_cached_prefix(seq(range(9))) == []


def test_double_free_is_an_error():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    s = seq(range(3))
    run_prefill(bm, s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(s)


def test_zero_blocks_is_refused():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, BS, enable_prefix_caching=True)
