"""Quest per query head, bisection top-k (`kernels.page_scores._bisect_top_pages_kernel`, interpreter): the pages
`select_top_pages(per_query_head=True)` returns are exactly the torch reference's (ties to the lower page), best
first, -1 padded; and identical, slot for slot, to the per-chunk sort path it replaces (forced through
BISECT_MAX_PAGES), on tie-heavy data whose bounds are exact, random data and mostly negative bounds."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

import sparse_llm.kernels.page_scores as page_scores_mod
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.kernels.page_scores import select_top_pages
from sparse_llm.sparse.quest import page_scores
from test_page_sparse_kernels import gathered_minmax, kt_cache

D = 64
SCALE = D ** -0.5


def make_batch(lens, h, hkv, block_size, data, seed):
    """random: Gaussian keys; ties: keys in {-1, -.5, 0, .5, 1} and queries in {-1, 0, 1} (every bound exact in
    fp16/fp32 and most pages tie); negative: keys pushed against the group's mean query (bounds mostly < 0)."""
    batch = random_paged_batch([1] * len(lens), lens, 0, h, hkv, D, block_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if data == "ties":
        batch.q.copy_(torch.randint(-1, 2, batch.q.shape, generator=g).float())
    qmean = batch.q.view(len(lens), hkv, h // hkv, D).mean(2)
    for i, kf in enumerate(batch.k_full):
        if data == "ties":
            kf.copy_(torch.randint(-2, 3, kf.shape, generator=g).float() / 2)
        elif data == "negative":
            kf.mul_(0.2).add_(-1.5 * qmean[i][None])
        bt = batch.meta.block_tables[i].long()
        pos = torch.arange(lens[i])
        batch.cache["kv"][bt[pos // block_size], 0, pos % block_size] = kf
    return batch


def reference_lists(q, kt, batch, page_size, max_pages, k):
    """int64 [N, H, k]: per query head the min(k, ranked) best ranked pages by the float64 bound, best first, ties
    to the lower page (a stable sort), -1 after: `sparse.quest.quest_selection`'s pages without the current one."""
    lo, hi = gathered_minmax(kt, batch, page_size, max_pages)
    scores = page_scores(q.double(), lo.nan_to_num(0.0), hi.nan_to_num(0.0))
    n_ranked = ((batch.meta.seq_lens.long() + page_size - 1) // page_size - 1).clamp(min=0)
    ranked = torch.arange(max_pages)[None, None, :] < n_ranked[:, None, None]
    order = torch.sort(scores.masked_fill(~ranked, float("-inf")), dim=-1, descending=True, stable=True).indices
    order = torch.cat([order, torch.full_like(order[..., :1], -1).expand(*order.shape[:2], k)], -1)[..., :k]
    slots = torch.arange(k)[None, None, :]
    return torch.where(slots < n_ranked.clamp(max=k)[:, None, None], order, -1), scores


def run(batch, kt, page_size, max_pages, k, tables=None):
    meta = batch.meta
    tables = meta.block_tables if tables is None else tables
    return select_top_pages(batch.q, kt[:, 0], kt[:, 1], tables, meta.seq_lens, page_size, max_pages, SCALE, k,
                            per_query_head=True)


@pytest.mark.parametrize("page_size,block_size,h,hkv,mm_dtype,data,k", [
    (8, 16, 3, 3, torch.float32, "ties", 6),      # GQA 1
    (16, 32, 6, 2, torch.float16, "ties", 5),     # GQA 3, fp16 min/max
    (8, 32, 8, 2, torch.float32, "random", 9),    # GQA 4
    (16, 16, 4, 1, torch.float16, "negative", 4),  # GQA 4, signed keys
    (8, 8, 6, 2, torch.float16, "ties", 40),      # k above the ranked pages of all rows but the first
])
@pytest.mark.parametrize("tail", [32, 16])
def test_bisect_pages_are_the_reference_pages_best_first(monkeypatch, page_size, block_size, h, hkv, mm_dtype, data, k,
                                                         tail):
    """Slot-pass pieces narrower than the row (ties counted across pieces)."""
    monkeypatch.setattr(page_scores_mod, "BISECT_TAIL", tail)
    lens = [603, 37, 9, 1]  # several chunks of the sort path; fewer than k ranked pages; no ranked page
    batch = make_batch(lens, h, hkv, block_size, data, seed=page_size + h)
    kt = kt_cache(batch, page_size, mm_dtype)
    max_pages = -(-max(lens) // page_size)
    want, scores = reference_lists(batch.q, kt, batch, page_size, max_pages, k)
    if data == "negative":
        assert (scores[0, :, :max_pages - 1] < 0).float().mean() > 0.5
    got = run(batch, kt, page_size, max_pages, k)
    assert got.dtype == torch.int32 and got.shape == (len(lens), h, k)
    if data == "ties":  # the tie rule decides: pages equal to the k-th best bound are left out (sequence 0)
        ranked0 = scores[0, :, :-(-lens[0] // page_size) - 1]
        kth = scores[0].gather(-1, want[0, :, k - 1:k])
        assert ((ranked0 == kth).sum(-1) > (scores[0].gather(-1, want[0]) == kth).sum(-1)).any()
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("data", ["ties", "random"])
def test_bisect_equals_the_sort_path_slot_for_slot(monkeypatch, data):
    """Same S, same pages in the same slots as the per-chunk sort path (rows wider than BISECT_MAX_PAGES still take
    it), also through zero-padded decode-graph tables."""
    h, hkv, page_size, block_size, k = 8, 2, 8, 16, 7
    lens = [600, 90, 8]
    batch = make_batch(lens, h, hkv, block_size, data, seed=5)
    kt = kt_cache(batch, page_size, torch.float32)
    max_pages = -(-max(lens) // page_size)
    bisect = run(batch, kt, page_size, max_pages, k)
    wide = torch.zeros(len(lens), 2 * batch.meta.block_tables.shape[1] + 3, dtype=torch.int32)
    wide[:, :batch.meta.block_tables.shape[1]] = batch.meta.block_tables
    wide_pages = wide.shape[1] * (block_size // page_size)
    bisect_wide = run(batch, kt, page_size, wide_pages, k, wide)
    monkeypatch.setattr(page_scores_mod, "BISECT_MAX_PAGES", 1)
    sort = run(batch, kt, page_size, max_pages, k)
    assert torch.equal(bisect, sort) and torch.equal(bisect_wide, sort)
    assert (sort[2] == -1).all() and (sort[0] >= 0).all()  # 8 tokens: no ranked page; 600: more than k
