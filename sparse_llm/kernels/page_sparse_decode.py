"""Page-sparse paged decode (Triton): each page list attends its selected pages plus the current one.

One query token per sequence. The selection is padded per (sequence, list): pages [B, L, K] int32,
-1 = unused slot; slot K (implicit) is the sequence's current page, (kv_len - 1) // page_size, so the
caller never concatenates it. A list belongs to a KV head (L = Hkv: the GQA group shares it, RocketKV and
Quest per KV head) or to a query head (L = H: Quest per query head). One program per (sequence, list, split)
loads the list's query heads once (rows of a tile, padded to 16 for tl.dot) and walks its share of the list
in tiles of BLOCK_N keys (BLOCK_N // page_size pages per tile, each key found through the block table): with
KV-head lists every selected K/V page is read once per GQA group; with query-head lists once per query head.
Online softmax in base 2 with fp32 accumulation:
    m' = max(m, rowmax(S)),  P = 2^(S - m'),  l' = l 2^(m - m') + rowsum(P),  acc' = acc 2^(m - m') + P V
Split-KV (flash-decoding): each split writes its normalised partial output and log2-sum-exp, a small kernel
merges them (a split with no valid key has lse = -inf and weight 0).
Torch reference: `page_sparse_decode_reference` below (float64 in tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import cdiv, check_head_dim, decode_split_tiles, next_pow2, num_sms
from sparse_llm.kernels.tuning import interpreting

LOG2_E = 1.0 / math.log(2.0)


@triton.jit
def _page_decode_kernel(
    Q, CACHE, PAGES, BT, LENS, O, O_PART, LSE_PART,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_ckv, stride_cp, stride_ch,
    stride_pn, stride_ph, stride_bt,
    stride_xn, stride_xh, stride_xs,
    num_listed, split_tiles, qk_scale,
    GROUP: tl.constexpr, LISTS_PER_KV: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid = (num_seqs, num_lists, num_splits); list slots [0, num_listed) from PAGES, slot num_listed = current.
    # List `lst` serves query heads [lst * GROUP, (lst + 1) * GROUP) and reads KV head lst // LISTS_PER_KV.
    n = tl.program_id(0)
    kvh = tl.program_id(1)  # the list
    split = tl.program_id(2)
    PAGES_PER_TILE: tl.constexpr = BLOCK_N // PAGE_SIZE
    kv_len = tl.load(LENS + n)
    current = (kv_len - 1) // PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + n.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None], other=0.0)
    list_row = PAGES + n.to(tl.int64) * stride_pn + kvh * stride_ph
    bt_row = BT + n.to(tl.int64) * stride_bt
    k_base = CACHE + (kvh // LISTS_PER_KV) * stride_ch
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    n_tiles = tl.cdiv(num_listed + 1, PAGES_PER_TILE)
    t_hi = tl.minimum((split + 1) * split_tiles, n_tiles)
    for t in range(split * split_tiles, t_hi):
        slot = t * PAGES_PER_TILE + offs_n // PAGE_SIZE
        page = tl.load(list_row + slot, mask=slot < num_listed, other=-1)
        page = tl.where(slot == num_listed, current, page)
        pos = page * PAGE_SIZE + offs_n % PAGE_SIZE
        ok = (page >= 0) & (pos < kv_len)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        k_ptrs = k_base + (blk * stride_cb + (pos % BLOCK_SIZE) * stride_cp)[:, None] + offs_d[None, :]
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of padding only changes nothing
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        v = tl.load(k_ptrs + stride_ckv, mask=ok[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        o_ptrs = O + n.to(tl.int64) * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = n.to(tl.int64) * stride_xn + heads * stride_xh + split * stride_xs
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=head_ok)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, O, stride_xn, stride_xh, stride_xs, stride_on, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid = (num_seqs, num_heads): out = Σ_s 2^(lse_s - M) o_s / Σ_s 2^(lse_s - M)
    n = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    part = n.to(tl.int64) * stride_xn + head * stride_xh + offs_s * stride_xs
    lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))  # the current page is never empty: max(lse) is finite
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(O + n.to(tl.int64) * stride_on + head * stride_oh + offs_d, out.to(O.dtype.element_ty))


def page_sparse_decode(
    q: torch.Tensor,
    cache_kv: torch.Tensor,
    pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    block_n: int = 64,
    split_tiles: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D]; cache_kv [num_blocks, 2, block_size, Hkv, D]; pages int32 [B, Hkv, K] (one list per KV head)
    or [B, H, K] (one per query head) (-1 = unused; the current page is added implicitly and must not be
    listed); block_tables int32 [B, *]; seq_lens int32 [B] (KV length including the query token) -> [B, H, D]."""
    b, h, d = q.shape
    check_head_dim(d)
    nblocks, two, bs, hkv, d2 = cache_kv.shape
    if two != 2 or d2 != d or cache_kv.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"cache_kv {tuple(cache_kv.shape)} / q {tuple(q.shape)}: layout or head_dim mismatch")
    if h % hkv:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={hkv}")
    if (pages.dtype != torch.int32 or pages.dim() != 3 or pages.shape[0] != b or pages.shape[1] not in (hkv, h)
            or pages.stride(-1) != 1):
        raise ValueError(f"pages must be int32 [{b}, {hkv} or {h}, K] contiguous in K, got {pages.dtype} "
                         f"{tuple(pages.shape)}")
    if page_size < 1 or page_size & (page_size - 1) or bs % page_size or page_size > block_n:
        raise ValueError(
            f"page_size={page_size} must be a power of two dividing block_size={bs} and at most block_n={block_n}"
        )
    if seq_lens.shape != (b,) or block_tables.shape[0] < b:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} / block_tables {tuple(block_tables.shape)} vs batch {b}")
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    num_lists, num_listed = pages.shape[1], pages.shape[2]
    n_tiles = cdiv(num_listed + 1, block_n // page_size)
    if split_tiles is None:
        split_tiles = decode_split_tiles(n_tiles * block_n, b, num_lists, num_sms(q.device), block_n)
    if split_tiles < 1:
        raise ValueError(f"split_tiles={split_tiles} must be >= 1")
    num_splits = cdiv(n_tiles, split_tiles)
    single = num_splits == 1
    o_part = torch.empty(b, h, 1 if single else num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, 1 if single else num_splits, dtype=torch.float32, device=q.device)
    group = h // num_lists
    _page_decode_kernel[(b, num_lists, num_splits)](
        q, cache_kv, pages, block_tables, seq_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache_kv.stride(0), cache_kv.stride(1), cache_kv.stride(2), cache_kv.stride(3),
        pages.stride(0), pages.stride(1), block_tables.stride(0),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        num_listed, split_tiles, scale * LOG2_E,
        GROUP=group, LISTS_PER_KV=num_lists // hkv, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=d, BLOCK_SIZE=bs,
        PAGE_SIZE=page_size, BLOCK_N=block_n, SINGLE_SPLIT=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if interpreting() else 2,
    )
    if not single:
        _merge_kernel[(b, h)](
            o_part, lse_part, out, lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
            out.stride(0), out.stride(1), num_splits, HEAD_DIM=d, BLOCK_S=max(2, next_pow2(num_splits)),
        )
    return out


def page_sparse_decode_reference(
    q: torch.Tensor, cache_kv: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, page_size: int, scale: float,
) -> torch.Tensor:
    """Masked dense attention over each sequence's keys, keeping per list (KV head or query head, by
    pages.shape[1]) the listed pages plus the current one; computed in float64. Gathers only the blocks the
    sequences own (reference, not fast)."""
    b, h, d = q.shape
    bs, hkv = cache_kv.shape[2], cache_kv.shape[3]
    g = h // hkv
    out = torch.empty(b, h, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        nb = cdiv(n, bs)
        blocks = cache_kv[block_tables[i, :nb].long()].double()  # [nb, 2, bs, Hkv, D]
        k = blocks[:, 0].reshape(nb * bs, hkv, d)[:n]
        v = blocks[:, 1].reshape(nb * bs, hkv, d)[:n]
        page_of = torch.arange(n, device=q.device) // page_size
        listed = pages[i].long()  # [L, K]
        keep = (page_of[None, :, None] == listed[:, None, :]).any(-1) | (page_of == (n - 1) // page_size)[None, :]
        keep = keep.repeat_interleave(h // listed.shape[0], 0).view(hkv, g, n)  # per query head
        s = torch.einsum("kgd,lkd->kgl", q[i].double().view(hkv, g, d), k) * scale
        s = s.masked_fill(~keep, float("-inf"))
        out[i] = torch.einsum("kgl,lkd->kgd", torch.softmax(s, -1), v).reshape(h, d)
    return out
