"""Triton page scoring, page top-k and page-sparse decode (interpreter) vs their torch references in float64."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

from sparse_llm.backends.paged_batch import random_paged_batch  # noqa: E402
from sparse_llm.backends.rocket_select import channel_mask, group_page_scores, select_pages  # noqa: E402
from sparse_llm.kernels.page_scores import group_page_scores as group_page_scores_triton  # noqa: E402
from sparse_llm.kernels.page_scores import select_top_pages  # noqa: E402
from sparse_llm.kernels.page_sparse_decode import page_sparse_decode, page_sparse_decode_reference  # noqa: E402

D = 64
SCALE = D ** -0.5


def decode_batch(lens, h, hkv, block_size, dtype, seed):
    return random_paged_batch([1] * len(lens), lens, 0, h, hkv, D, block_size, dtype=dtype, seed=seed, sink_logit=2.0)


def kt_cache(batch, page_size, dtype):
    """Rocket's KT layout [num_blocks, 2, block_size // page_size, Hkv, D] with the pages of every sequence
    (its new token included), built from the unpaged keys; unused entries stay NaN."""
    kv = batch.cache["kv"]
    nb, _, bs, hkv, d = kv.shape
    kt = torch.full((nb, 2, bs // page_size, hkv, d), float("nan"), dtype=torch.float32)
    for i, kf in enumerate(batch.k_full):
        n = kf.shape[0]
        for p in range(-(-n // page_size)):
            keys = kf[p * page_size:min(n, (p + 1) * page_size)].float()
            blk = int(batch.meta.block_tables[i, p * page_size // bs])
            kt[blk, 0, p % (bs // page_size)] = keys.amin(0)
            kt[blk, 1, p % (bs // page_size)] = keys.amax(0)
    return kt.to(dtype)


def gathered_minmax(kt, batch, page_size, max_pages):
    """[B, P, Hkv, D] min and max read through the block tables (pages past the end: whatever is there)."""
    ppb = kt.shape[2]
    pages = torch.arange(max_pages)
    blocks = batch.meta.block_tables.long()[:, (pages // ppb).clamp(max=batch.meta.block_tables.shape[1] - 1)]
    entry = kt[blocks, :, (pages % ppb)[None, :]].double()  # [B, P, 2, Hkv, D]
    return entry[:, :, 0], entry[:, :, 1]


@pytest.mark.parametrize("page_size,block_size,h,hkv,topr,kt_dtype", [
    (4, 8, 6, 2, 64, torch.float8_e5m2),
    (4, 16, 8, 4, 19, torch.bfloat16),
    (16, 32, 12, 3, 64, torch.float32),
])
def test_page_scores_and_topk_match_reference(page_size, block_size, h, hkv, topr, kt_dtype):
    lens = [173, 9, 66, 4]
    batch = decode_batch(lens, h, hkv, block_size, torch.float32, seed=page_size + h)
    kt = kt_cache(batch, page_size, kt_dtype)
    max_pages = -(-max(lens) // page_size)
    q = batch.q
    mask = channel_mask(q, hkv, topr)
    qm = q if mask is None else q * mask.repeat_interleave(h // hkv, 1)
    got = group_page_scores_triton(qm, kt[:, 0], kt[:, 1], batch.meta.block_tables, batch.meta.seq_lens,
                                   page_size, max_pages, SCALE)
    lo, hi = gathered_minmax(kt, batch, page_size, max_pages)
    n_pages = (batch.meta.seq_lens.long() + page_size - 1) // page_size
    ref = group_page_scores(q.double(), lo.nan_to_num(0.0), hi.nan_to_num(0.0), n_pages, topr, SCALE)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert got[2].abs().sum() > 0 and (got[3] == 0).all()  # one page only: nothing ranked

    k = 5
    picked = select_top_pages(qm, kt[:, 0], kt[:, 1], batch.meta.block_tables, batch.meta.seq_lens, page_size,
                              max_pages, SCALE, k)
    want = select_pages(q.double(), lo.nan_to_num(0.0), hi.nan_to_num(0.0), n_pages, topr, k, SCALE)
    as_mask = torch.zeros_like(want)
    for b in range(len(lens)):
        for j in range(hkv):
            ids = picked[b, j][picked[b, j] >= 0].long()
            assert ids.unique().numel() == ids.numel()
            as_mask[b, j, ids] = True
        as_mask[b, :, n_pages[b] - 1] = True
    assert torch.equal(as_mask, want)


def test_top_pages_several_rounds_best_first_and_ties_to_lower_pages():
    lens, page_size, k = [1001, 450], 4, 7  # 251 pages: 4 reduce chunks x 8 candidates, then two sort rounds
    batch = decode_batch(lens, 4, 1, 16, torch.float32, seed=11)
    kt = kt_cache(batch, page_size, torch.float32)
    max_pages = -(-max(lens) // page_size)
    meta = batch.meta
    picked = select_top_pages(batch.q, kt[:, 0], kt[:, 1], meta.block_tables, meta.seq_lens, page_size, max_pages,
                              SCALE, k)
    lo, hi = gathered_minmax(kt, batch, page_size, max_pages)
    n_pages = (meta.seq_lens.long() + page_size - 1) // page_size
    ref = group_page_scores(batch.q.double(), lo.nan_to_num(0.0), hi.nan_to_num(0.0), n_pages, D, SCALE)
    want = ref.masked_fill(torch.arange(max_pages)[None, None, :] >= (n_pages - 1)[:, None, None], -1).topk(k, -1)
    assert torch.equal(picked.long(), want.indices)  # best first, same pages
    # All bounds equal (zero min/max): every ranked page ties, the lowest pages win.
    zero = torch.zeros_like(kt)
    tied = select_top_pages(batch.q, zero[:, 0], zero[:, 1], meta.block_tables, meta.seq_lens, page_size, max_pages,
                            SCALE, k)
    assert tied.tolist() == [[list(range(k))]] * 2
    # Fewer ranked pages than k: all of them, then -1.
    short = select_top_pages(batch.q, kt[:, 0], kt[:, 1], meta.block_tables, torch.tensor([13, 3], dtype=torch.int32),
                             page_size, 4, SCALE, k)
    assert sorted(short[0, 0].tolist()) == [-1] * 4 + [0, 1, 2] and short[1].tolist() == [[-1] * k]


@pytest.mark.parametrize("page_size,block_size,h,hkv,dtype", [
    (4, 8, 6, 2, torch.float32),
    (16, 32, 8, 1, torch.float16),
    (32, 32, 4, 4, torch.float32),
    (64, 64, 6, 3, torch.float16),
])
def test_page_sparse_decode_matches_reference(page_size, block_size, h, hkv, dtype):
    lens = [301, 7, 130]
    batch = decode_batch(lens, h, hkv, block_size, dtype, seed=page_size)
    kv = batch.cache["kv"]
    from sparse_llm.backends.base import write_kv

    write_kv(kv, batch.k, batch.v, batch.meta.slot_mapping)
    g = torch.Generator().manual_seed(1)
    k_list = 6
    pages = torch.full((len(lens), hkv, k_list), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        others = -(-n // page_size) - 1
        for j in range(hkv):
            take = torch.randperm(others, generator=g)[:min(k_list, others)]
            pages[b, j, :take.numel()] = take.int()  # leftover slots stay -1 (padding)
    meta = batch.meta
    ref = page_sparse_decode_reference(batch.q, kv, pages, meta.block_tables, meta.seq_lens, page_size, SCALE)
    for split_tiles in (1, None):
        got = page_sparse_decode(batch.q, kv, pages, meta.block_tables, meta.seq_lens, page_size, SCALE,
                                 split_tiles=split_tiles)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # The selection matters: attending every page gives a different answer.
    full = page_sparse_decode_reference(batch.q, kv, pages[:, :, :0], meta.block_tables, meta.seq_lens, page_size, SCALE)
    assert (full - ref).abs().max() > 1e-2


def test_page_sparse_decode_rejects_bad_input():
    batch = decode_batch([20], 4, 2, 8, torch.float32, seed=0)
    kv, meta = batch.cache["kv"], batch.meta
    pages = torch.zeros(1, 2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="pages must be int32"):
        page_sparse_decode(batch.q, kv, pages, meta.block_tables, meta.seq_lens, 4, SCALE)
    with pytest.raises(ValueError, match="page_size=3"):
        page_sparse_decode(batch.q, kv, pages.int(), meta.block_tables, meta.seq_lens, 3, SCALE)
    with pytest.raises(ValueError, match="k=0 pages must be in"):
        select_top_pages(batch.q, kv[:, 0, ::4], kv[:, 1, ::4], meta.block_tables, meta.seq_lens, 4, 5, SCALE, 0)
