"""The sampled top-k kernel (kernels/dsa_topk_sampled.py) against the torch oracle, exactly, under TRITON_INTERPRET=1.

Scaled-down shapes (k 16-64, rows of 300-5000 logits, capacity 4k, sample 512): the fast path, rows selected
straight from the row (n_valid <= capacity), rows with n_valid <= k, heavy ties, and rows built so that the
sampled threshold fails in both directions (too few and too many candidates), which must take the fallback.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.dsa_torch import topk_positions_ref
from sparse_llm.kernels.dsa_topk_sampled import sample_positions, topk_positions_sampled

LAUNCH = dict(chunk=256, sample=512)


def _check(logits, n_valid, k, capacity, **kw):
    got, counts = topk_positions_sampled(logits, n_valid, k, capacity=capacity, return_candidates=True, **LAUNCH, **kw)
    want = topk_positions_ref(logits, n_valid, k)
    for r in range(logits.shape[0]):
        assert torch.equal(got[r], want[r]), f"row {r} (n_valid={int(n_valid[r])}, candidates={int(counts[r])})"
    return counts


def _fast(counts, n_valid, k, capacity):
    """Rows that took the sampled fast path."""
    return (n_valid > capacity) & (counts >= k) & (counts <= capacity)


@pytest.mark.parametrize("k, seed", [(16, 0), (37, 1), (64, 2)])
def test_random_rows_equal_the_oracle(k, seed):
    g = torch.Generator().manual_seed(seed)
    capacity = 4 * 64
    logits = torch.randn(6, 5003, generator=g) * 3
    n_valid = torch.tensor([5003, 4097, 1201, capacity - 5, k, 9], dtype=torch.int32)
    counts = _check(logits, n_valid, k, capacity)
    assert bool(_fast(counts, n_valid, k, capacity)[:3].all()), counts  # the path this kernel exists for


def test_rows_no_longer_than_the_buffer_select_straight_from_the_row():
    """No row can need the candidate buffers (N <= capacity): they are not allocated, the select reads the row."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 251, generator=g)
    n_valid = torch.tensor([251, 17, 5], dtype=torch.int32)
    _check(logits, n_valid, 16, 256)


def test_tie_free_rows_give_torch_topk_sets():
    g = torch.Generator().manual_seed(5)
    logits = torch.stack([torch.randperm(2999, generator=g).float() - 1500 for _ in range(3)])
    n_valid = torch.tensor([2999, 2001, 333], dtype=torch.int32)
    got = topk_positions_sampled(logits, n_valid, 40, capacity=256, **LAUNCH)
    for r in range(3):
        want = torch.topk(logits[r, : n_valid[r]], 40).indices
        assert set(got[r].tolist()) == set(want.tolist())


def test_ties_at_the_kth_value_on_the_fast_path():
    """Logits on a 0.1 grid: many keys share the k-th value; the lowest positions among them win."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 3001, generator=g) * 10).round() / 10
    n_valid = torch.tensor([3001, 2999, 1777, 200], dtype=torch.int32)
    k, capacity = 32, 256
    counts = _check(logits, n_valid, k, capacity)
    assert bool(_fast(counts, n_valid, k, capacity)[:3].all()), counts
    for r in range(3):
        row = logits[r, : n_valid[r]]
        kth = row.topk(k).values[-1]
        assert int((row == kth).sum()) > int((row.topk(k).values == kth).sum())  # the tie rule decides


def test_heavy_ties_and_signed_zeros():
    """Few distinct values (like ReLU'd indexer zeros): ties overflow the candidate buffer -> fallback; -0.0
    and +0.0 are the same value to the oracle's sort, so they tie too."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (3, 1500), generator=g).float()
    logits[1] = 0.0
    logits[1, 1::3] = -0.0
    logits[1, 700:710] = 1.0
    logits[2, 10:1400] = -0.0
    n_valid = torch.tensor([1500, 1499, 1401], dtype=torch.int32)
    k, capacity = 50, 256
    counts = _check(logits, n_valid, k, capacity)
    assert bool((counts[:2] > capacity).all()), counts  # the fallback ran


def test_unlucky_samples_fall_back_and_stay_exact():
    """Row 0: the sampled positions hold the row's largest values, so too few keys pass the threshold. Row 1:
    they hold the smallest, so too many pass. Both must fall back and still equal the oracle."""
    n, k, capacity = 2000, 16, 256
    sampled = sample_positions(n, LAUNCH["sample"])
    assert int(sampled.min()) >= 0 and int(sampled.max()) < n
    g = torch.Generator().manual_seed(9)
    logits = torch.rand(2, n, generator=g)
    logits[0, sampled] += 10.0
    logits[1, sampled] -= 10.0
    n_valid = torch.tensor([n, n], dtype=torch.int32)
    counts = _check(logits, n_valid, k, capacity)
    assert int(counts[0]) < k and int(counts[1]) > capacity, counts


def test_physical_slots_follow_the_block_tables():
    page = 16
    g = torch.Generator().manual_seed(11)
    tables = torch.randperm(3 * 200, generator=g).view(3, 200).to(torch.int32)
    logits = torch.randn(4, 3001, generator=g)
    n_valid = torch.tensor([3001, 150, 20, 2500], dtype=torch.int32)
    row_seq = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    idx, slot = topk_positions_sampled(logits, n_valid, 24, capacity=128, block_tables=tables, row_seq=row_seq,
                                       page=page, **LAUNCH)
    assert torch.equal(idx, topk_positions_ref(logits, n_valid, 24))
    seq_tables = tables[row_seq.long()]
    want = seq_tables.gather(1, idx.clamp(min=0).long() // page) * page + idx.clamp(min=0) % page
    assert torch.equal(slot, torch.where(idx >= 0, want.int(), -1))


def test_bad_arguments_are_refused():
    logits, one = torch.randn(2, 40), torch.full((2,), 40, dtype=torch.int32)
    with pytest.raises(ValueError, match="capacity=16 must be >= 2k = 20"):
        topk_positions_sampled(logits, one, 10, capacity=16)
    with pytest.raises(ValueError, match="sample=48 must be a power of two"):
        topk_positions_sampled(logits, one, 4, sample=48)
    with pytest.raises(ValueError, match="float32 logits"):
        topk_positions_sampled(logits.double(), one, 4)
    with pytest.raises(ValueError, match="block_tables, row_seq and page go together"):
        topk_positions_sampled(logits, one, 4, page=16)
