"""Page ranking sized by a decode graph's static table width costs and selects what the real cache does.

In a CUDA graph the block tables are max_model_len wide (zeros past each sequence's blocks), so the page
scoring kernels launch for max_model_len / page_size pages; programs past a sequence's last ranked page must
do nothing that changes the result. Here: wide zero-padded tables give bit-identical scores and page lists to
tight tables and agree with the float64 torch reference (interpreter, fp32); the final top-k sorts only the
width that holds every nonzero candidate key and decodes the same pages as a full sort.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

from sparse_llm.backends.rocket_select import group_page_scores as group_page_scores_reference  # noqa: E402
from sparse_llm.backends.rocket_select import select_pages  # noqa: E402
from sparse_llm.kernels import page_scores  # noqa: E402
from sparse_llm.kernels.page_scores import _top_keys_kernel, group_page_scores, select_top_pages  # noqa: E402
from test_page_sparse_kernels import decode_batch, gathered_minmax, kt_cache  # noqa: E402

D = 64
SCALE = D ** -0.5


def widened(tables: torch.Tensor, width: int) -> torch.Tensor:
    """The block tables as a decode graph holds them: `width` columns, zeros past each sequence's blocks
    (block 0 is a real block of another sequence: reading it past the end would change the ranking)."""
    wide = torch.zeros(tables.shape[0], width, dtype=torch.int32)
    wide[:, :tables.shape[1]] = tables
    return wide


@pytest.mark.parametrize("page_size,block_size,h,hkv,lens,k,width_factor", [
    (4, 8, 6, 2, [300, 9, 66, 4, 1], 5, 9),  # 74 ranked pages: 2 reduce chunks, 2 rounds; 9 -> 2 (< k); 4, 1 -> 0
    (16, 32, 12, 3, [700, 17, 300], 7, 5),   # 17 -> 1 ranked page (< k)
    (4, 16, 4, 4, [601, 250], 1, 3),         # group 1, k = 1
])
def test_wide_zero_padded_tables_rank_like_tight_tables(page_size, block_size, h, hkv, lens, k, width_factor):
    batch = decode_batch(lens, h, hkv, block_size, torch.float32, seed=page_size + h + k)
    kt = kt_cache(batch, page_size, torch.float32)
    tables, seq_lens = batch.meta.block_tables, batch.meta.seq_lens
    wide = widened(tables, width_factor * tables.shape[1] + 3)
    ppb = block_size // page_size
    tight_pages, wide_pages = -(-max(lens) // page_size), wide.shape[1] * ppb
    # Wide enough that programs loop over several chunks and most chunks lie past every sequence.
    assert page_scores._programs_per_row(-(-wide_pages // 32), len(lens) * hkv) < -(-wide_pages // 32)
    lo, hi = kt[:, 0], kt[:, 1]

    tight = group_page_scores(batch.q, lo, hi, tables, seq_lens, page_size, tight_pages, SCALE)
    got = group_page_scores(batch.q, lo, hi, wide, seq_lens, page_size, wide_pages, SCALE)
    assert torch.equal(got[..., :tight_pages], tight) and (got[..., tight_pages:] == 0).all()
    kmin, kmax = gathered_minmax(kt, batch, page_size, tight_pages)
    n_pages = (seq_lens.long() + page_size - 1) // page_size
    ref = group_page_scores_reference(batch.q.double(), kmin.nan_to_num(0.0), kmax.nan_to_num(0.0), n_pages, D, SCALE)
    torch.testing.assert_close(tight.double(), ref, rtol=1e-5, atol=1e-6)

    picked_tight = select_top_pages(batch.q, lo, hi, tables, seq_lens, page_size, tight_pages, SCALE, k)
    picked = select_top_pages(batch.q, lo, hi, wide, seq_lens, page_size, wide_pages, SCALE, k)
    assert torch.equal(picked, picked_tight)
    want = select_pages(batch.q.double(), kmin.nan_to_num(0.0), kmax.nan_to_num(0.0), n_pages, D, k, SCALE)
    for b, n in enumerate(n_pages.tolist()):
        for j in range(hkv):
            ids = picked[b, j]
            assert (ids[:min(k, n - 1)] >= 0).all() and (ids[max(n - 1, 0):] == -1).all()  # -1 only past the ranked
            chosen = torch.zeros(tight_pages, dtype=torch.bool)
            chosen[ids[ids >= 0].long()] = True
            chosen[n - 1] = True  # the current page, which the decode kernel adds
            assert torch.equal(chosen, want[b, j]), (b, j)


@pytest.mark.parametrize("filled", [0, 1, 3, 8, 9, 16, 40, 64])
def test_final_top_keys_sorts_only_the_width_holding_every_key(filled):
    """Rows of 64 candidate keys, nonzero only in the first `filled` (random positions of zeros among them);
    KC = 4 and MID = 16, so rows take the KC, MID or full sort: all decode what a full torch sort does."""
    g = torch.Generator().manual_seed(filled)
    rows, num_keys, k, kc = 3, 64, 3, 4
    pages = torch.randperm(1000, generator=g)[:rows * filled].view(rows, filled)
    score_bits = torch.randint(1, 2 ** 30, (rows, filled), generator=g)
    keys = torch.zeros(rows, num_keys, dtype=torch.int64)
    keys[:, :filled] = ((score_bits + 2 ** 31) << 31) | (2 ** 31 - 1 - pages)  # _page_keys' layout
    keys[:, :filled] *= torch.rand(rows, filled, generator=g) > 0.2  # unranked pages among the candidates
    out = torch.full((rows, k), -7, dtype=torch.int32)
    _top_keys_kernel[(rows, 1)](keys, keys, out, keys.stride(0), keys.stride(0), out.stride(0), num_keys, k,
                                BLOCK=num_keys, KC=kc, MID=16, FINAL=True)
    top = keys.sort(-1, descending=True).values[:, :k]
    want = torch.where(top > 0, 2 ** 31 - 1 - (top & (2 ** 31 - 1)), -1)
    assert torch.equal(out.long(), want)
