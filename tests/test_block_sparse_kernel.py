"""The block-sparse Triton kernel against float64 attention under a dense mask built from the same selection."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.base import write_kv
from sparse_llm.kernels.block_sparse_prefill import batched_block_sparse_attention, block_sparse_attention_launch
from sparse_llm.sparse.block_selection import (
    BlockSelection,
    QueryTiles,
    attended_pairs,
    batched_tiles,
    causal_pairs,
    decode_tiles,
    prefill_tiles,
    selection_from_masks,
    token_mask,
)
from sparse_llm.sparse.block_sparse_torch import batched_block_sparse_torch, block_sparse_sequence

TOL = {torch.float32: 3e-5, torch.float16: 4e-3}


def random_selection(tiles: QueryTiles, heads: int, kv_blocks: int, block: int, gen, p=0.5, columns=0, kv_len=None):
    """Random causal block lists per (tile, head) plus, optionally, `columns` random single keys per row
    outside the listed blocks."""
    m_abs = ((tiles.start + tiles.rows - 1) // block).long()
    causal = torch.arange(kv_blocks)[None, None, :] <= m_abs[:, None, None]
    mask = (torch.rand(tiles.num_tiles, heads, kv_blocks, generator=gen) < p) & causal
    if not columns:
        return selection_from_masks(mask, block)
    pos = torch.sort(torch.randperm(kv_len, generator=gen)[:columns]).values.view(1, 1, -1).expand(1, heads, -1)
    inside = torch.gather(mask, -1, (pos // block).expand(tiles.num_tiles, heads, -1))
    return selection_from_masks(mask, block, pos, ~inside & (torch.rand(inside.shape, generator=gen) < 0.7))


# (B, H, Hkv, Sq, Sk, D, block, dtype, per-kv-head selection, columns)
BATCHED = [
    (2, 4, 2, 45, 45, 16, 16, torch.float32, False, 0),
    (1, 6, 2, 70, 70, 32, 32, torch.float16, True, 0),
    (3, 3, 1, 23, 61, 16, 16, torch.float32, False, 5),  # queries are a suffix of the keys; GQA 3
    (1, 8, 8, 33, 33, 24, 16, torch.float32, False, 7),  # head_dim not a power of two; MHA
]


@pytest.mark.parametrize("b,h,hkv,sq,sk,d,bs,dtype,kv_sel,cols", BATCHED)
def test_batched_kernel_matches_float64_masked_reference(b, h, hkv, sq, sk, d, bs, dtype, kv_sel, cols):
    gen = torch.Generator().manual_seed(b * 100 + h * 10 + sq)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    tiles = batched_tiles(b, sq, sk, bs, "cpu")
    sel = random_selection(tiles, hkv if kv_sel else h, -(-sk // bs), bs, gen, columns=cols, kv_len=sk)
    scale = d**-0.5
    out = batched_block_sparse_attention(q, k, v, sel, scale, bs)
    ref = batched_block_sparse_torch(q.double(), k.double(), v.double(), sel, scale, bs)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    dense = batched_block_sparse_torch(q.double(), k.double(), v.double(), None, scale, bs)
    assert (ref - dense).abs().max() > 1e-2  # the selection really drops keys


def test_dense_launch_equals_causal_attention_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    out = batched_block_sparse_attention(q, k[:, :1], v[:, :1], None, 0.25, 16)
    ref = batched_block_sparse_torch(q.double(), k[:, :1].double(), v[:, :1].double(), None, 0.25, 16)
    torch.testing.assert_close(out.double(), ref, rtol=3e-5, atol=3e-5)
    # Tile 1 lists only block 2 (its future): its rows attend nothing and must be 0, not NaN.
    tiles = batched_tiles(1, 40, 40, 16, "cpu")
    mask = torch.zeros(3, 2, 3, dtype=torch.bool)
    mask[0, :, 0] = mask[2, :, 2] = True
    mask[1, :, 2] = True
    sel = selection_from_masks(mask, 16)
    out = batched_block_sparse_attention(q, k, v, sel, 0.25, 16)
    assert torch.equal(out[0, :, 16:32], torch.zeros_like(out[0, :, 16:32]))
    torch.testing.assert_close(out.double(), batched_block_sparse_torch(q.double(), k.double(), v.double(), sel, 0.25, 16),
                               rtol=3e-5, atol=3e-5)
    assert tiles.num_tiles == 3


@pytest.mark.parametrize("page,sel_block,block_n,splits", [(8, 16, 16, 1), (32, 16, 32, 1), (16, 16, 16, 3), (8, 4, 16, 2)])
def test_paged_mixed_batch_matches_reference(page, sel_block, block_n, splits):
    """Packed prefill chunks and decodes over a shuffled paged cache; page < tile (gather path),
    page > tile (contiguous path), selection blocks smaller than the key tile (Quest pages), splits."""
    h, hkv, d = 6, 2, 16
    q_lens, kv_lens, n_pre = [29, 7, 1, 1, 1], [29, 40, 1, 37, 64], 2
    batch = random_paged_batch(q_lens, kv_lens, n_pre, h, hkv, d, page, torch.float32, seed=page + splits)
    meta = batch.meta
    write_kv(batch.cache["kv"], batch.k, batch.v, meta.slot_mapping)
    gen = torch.Generator().manual_seed(11)
    pre = prefill_tiles(q_lens[:n_pre], kv_lens[:n_pre], 16, "cpu")
    dec = decode_tiles(meta.seq_lens[n_pre:], n_pre, 16)
    max_blocks = -(-max(kv_lens) // sel_block)
    kv_cache = batch.cache["kv"]
    common = dict(block_n=block_n, contiguous_pages=True)
    out = torch.empty_like(batch.q)
    for tiles, seqs, n_split in ((pre, range(n_pre), 1), (dec, range(n_pre, len(q_lens)), splits)):
        sel = random_selection(tiles, h, max_blocks, sel_block, gen, p=0.6)
        block_sparse_attention_launch(
            batch.q, 0, meta.cu_seqlens_q[:-1].to(torch.int32), out, 0,
            kv_cache[:, 0], kv_cache[:, 1], meta.block_tables, (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).to(torch.int32),
            meta.seq_lens, tiles, sel, d**-0.5, num_splits=n_split, **common,
        )
        cu = meta.cu_seqlens_q.tolist()
        for i in seqs:
            ref = block_sparse_sequence(
                batch.q[cu[i]:cu[i + 1]].double(), batch.k_full[i].double(), batch.v_full[i].double(), d**-0.5,
                tiles, sel, i,
            )
            torch.testing.assert_close(out[cu[i]:cu[i + 1]].double(), ref, rtol=3e-5, atol=3e-5)


def test_attended_pairs_count_the_masked_pairs():
    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens = torch.tensor([23, 50]), torch.tensor([61, 50])
    tiles = prefill_tiles(q_lens.tolist(), kv_lens.tolist(), 16, "cpu")
    sel = random_selection(tiles, 3, 4, 16, gen, columns=9, kv_len=50)
    pairs = attended_pairs(tiles, sel, q_lens, kv_lens)
    for t in range(tiles.num_tiles):
        s = int(tiles.seq[t])
        kv, q0 = int(kv_lens[s]), int(kv_lens[s] - q_lens[s])
        rows = torch.arange(int(tiles.start[t]), int(tiles.start[t]) + 16)
        rows = rows[(rows >= q0) & (rows < kv)]
        m = token_mask(tiles, sel, 64)[t, :, :kv]
        causal = torch.arange(kv)[None, :] <= rows[:, None]
        assert pairs[t].tolist() == [int((m[hh][None, :] & causal).sum()) for hh in range(3)]
    assert causal_pairs(q_lens, kv_lens).tolist() == [sum(range(39, 62)), 50 * 51 // 2]


def test_bad_selection_is_a_clear_error():
    tiles = batched_tiles(1, 20, 20, 16, "cpu")
    sel = BlockSelection(16, 3, torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="must divide the 4 query heads"):
        sel.validate(tiles.num_tiles, 4)
    with pytest.raises(ValueError, match="expected num_tiles"):
        BlockSelection(16, 2, sel.block_offsets, sel.block_indices).validate(tiles.num_tiles, 4)
