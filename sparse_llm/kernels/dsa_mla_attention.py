"""Absorbed-MLA attention over the paged latent cache, sparse (given positions) or dense (Triton).

Each query row r has H heads q[r] = [q_lat (DV) | q_pe (DPE)] and one shared key per token, the cached
latent [c_kv (DV) | k_pe (DPE)]; V is c_kv. The row attends n[r] tokens:
  SPARSE: positions idx[r, 0:n[r]] (the indexer's top-k; a valid prefix, -1 after it),
  dense:  positions 0 .. n[r]-1 (n[r] = row position + 1, i.e. causal).
    o[r, h] = sum_j softmax_j(scale * q[r, h] . kv[j]) kv[j, :DV]

Split-KV ("flash-decoding"): grid (head blocks, splits, rows). A program keeps BLOCK_H heads of one row in
registers and walks its split's tokens BLOCK_N at a time, gathering the latent rows through the block table,
so one latent load serves BLOCK_H heads (MQA). It writes a normalised partial output and its log2-sum-exp;
`_combine_kernel` merges the splits (with one split the kernel writes the output itself, no combine).
Variants a sweep picks (benchmarks/dsa_tune.py): `dv_split` programs per head block, each accumulating a
slice of the 512-wide V (a [64, 512] fp32 accumulator is 128 registers a thread at 8 warps, before q, scores
and probabilities; splitting V, as FlashMLA's two warpgroups do, trades recomputed QK^T for no spills), and
`indices_are_slots` (physical slots from the top-k kernel: the gather chain idx -> kv loses the block table).
Head blocks (and their V slices) are the fastest grid axis so the programs that read the same tokens run
together and share them through L2. The torch oracle is sparse_llm.backends.dsa_torch.mla_attention_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.tuning import interpreting

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_lh", "num_splits"])  # one compile for every split count a sweep tries
def _mla_split_kernel(
    Q, KV, BLOCK_TABLES, ROW_SEQ, ROW_LEN, IDX, O_PART, LSE_PART,
    stride_qr, stride_qh, stride_kvb, stride_kvt, stride_bt, stride_ir,
    stride_or, stride_oh, stride_os, stride_lr, stride_lh,
    scale_log2, num_splits,
    H: tl.constexpr, DV: tl.constexpr, DPE: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV_SPLIT: tl.constexpr, SPARSE: tl.constexpr,
    SLOTS: tl.constexpr, SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (head block, DV slice, KV split, row). With DV_SPLIT > 1 each program still computes the full
    576-wide scores but accumulates only DV / DV_SPLIT output columns: a smaller fp32 accumulator (fewer
    registers, no spills) bought with recomputed QK^T, as FlashMLA's two warpgroups split V."""
    DVS: tl.constexpr = DV // DV_SPLIT
    hb = tl.program_id(0) // DV_SPLIT
    vs = tl.program_id(0) % DV_SPLIT
    split = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    n = tl.load(ROW_LEN + r)
    seq = tl.load(ROW_SEQ + r).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(n, lo + split_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_v = tl.arange(0, DV)
    offs_out = vs * DVS + tl.arange(0, DVS)
    offs_pe = DV + tl.arange(0, DPE)
    q_row = Q + r * stride_qr + offs_h[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_v[None, :], mask=h_mask[:, None], other=0.0)  # [BLOCK_H, DV]
    q_pe = tl.load(q_row + offs_pe[None, :], mask=h_mask[:, None], other=0.0)  # [BLOCK_H, DPE]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DVS], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        if SPARSE:
            pos = tl.load(IDX + r * stride_ir + offs_n, mask=n_mask, other=0)
        else:
            pos = offs_n
        if SLOTS:  # IDX holds physical slots (block * PAGE + offset): one dependent load less per tile
            row = KV + pos.to(tl.int64) * stride_kvt
        else:
            block = tl.load(BLOCK_TABLES + seq * stride_bt + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
            row = KV + block * stride_kvb + (pos % PAGE) * stride_kvt
        kv = tl.load(row[:, None] + offs_v[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, DV]
        k_pe = tl.load(row[:, None] + offs_pe[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, DPE]
        s = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DV_SPLIT == 1:
            v = kv
        else:  # this program's V columns (the rows were just read: L1/L2 hits)
            v = tl.load(row[:, None] + offs_out[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, DVS]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptr = O_PART + r * stride_or + offs_h[:, None] * stride_oh + split * stride_os + offs_out[None, :]
    tl.store(o_ptr, out.to(O_PART.dtype.element_ty), mask=h_mask[:, None])
    if not SINGLE:  # SINGLE: the only split wrote the final output, nothing to combine
        if vs == 0:
            tl.store(LSE_PART + r * stride_lr + offs_h * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, stride_or, stride_oh, stride_os, stride_lr, stride_lh, stride_outr, stride_outh,
    num_splits, DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[r, h] = sum_s 2^(lse_s - lse) * o_s: the exact softmax over the union of the splits."""
    h = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    lse = tl.load(LSE_PART + r * stride_lr + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    w = w / tl.sum(w, 0)
    offs_v = tl.arange(0, DV)
    o = tl.load(O_PART + r * stride_or + h * stride_oh + offs_s[:, None] * stride_os + offs_v[None, :],
                mask=s_mask[:, None], other=0.0)
    tl.store(OUT + r * stride_outr + h * stride_outh + offs_v, tl.sum(o * w[:, None], 0).to(OUT.dtype.element_ty))


def default_tiles(rows: int, heads: int, max_tokens: int) -> tuple[int, int, int, int]:
    """(block_h, block_n, num_warps, num_stages) from a sweep on an H100 (session 1, DeepSeek-V3.2
    shapes): 64 heads x 64 tokens, 8 warps when the grid is large; 32 x 32, 4 warps when it would be too small."""
    if interpreting():
        return 16, 16, 4, 1
    if heads >= 64 and rows * triton.cdiv(heads, 64) * min(128, triton.cdiv(max_tokens, 256)) >= 128:
        return 64, 64, 8, 2
    return max(16, min(32, triton.next_power_of_2(heads))), 32, 4, 2


def default_num_splits(rows: int, head_blocks: int, max_tokens: int, block_n: int) -> int:
    """Enough programs to fill the GPU (~2 per SM on an H100), but at least 4 tiles of tokens per split."""
    if interpreting():
        return 2
    want = triton.cdiv(264, max(1, rows * head_blocks))
    return max(1, min(want, triton.cdiv(max_tokens, 4 * block_n), 128))


def _check_launch(name: str, value: int | None, allowed: str, ok) -> None:
    if value is not None and not ok(value):
        raise ValueError(f"mla_attention: {name}={value} is not allowed; {allowed}")


def _pow2_at_least(lo: int):
    return lambda v: v >= lo and v & (v - 1) == 0


def mla_attention(
    q: torch.Tensor,  # [R, H, DV + DPE]
    kv_cache: torch.Tensor,  # [num_blocks, page, 1, DV + DPE]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    row_seq: torch.Tensor,  # int32 [R]
    row_len: torch.Tensor,  # int32 [R]: tokens attended (sparse: valid prefix of indices; dense: position + 1)
    scale: float,
    v_dim: int,
    max_tokens: int,  # >= max(row_len), sizes the split
    indices: torch.Tensor | None = None,  # int32 [R, K] positions (SPARSE), or None (dense causal)
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dv_split: int = 1,
    indices_are_slots: bool = False,
) -> torch.Tensor:  # [R, H, DV] in q.dtype
    """`dv_split` programs share one (head block, KV split, row), each accumulating v_dim / dv_split output
    columns; `indices_are_slots`: `indices` are physical cache slots (block * page + offset, as
    topk_positions(..., block_tables=...) returns them) instead of positions, so no block-table lookup."""
    R, H, D = q.shape
    dpe = D - v_dim
    if kv_cache.shape[-1] != D or kv_cache.shape[2] != 1:
        raise ValueError(f"mla_attention: kv_cache must be [blocks, page, 1, {D}], got {tuple(kv_cache.shape)}")
    for name, dim in (("kv_lora_rank (v_dim)", v_dim), ("rope dim", dpe)):
        if dim < 16 or dim & (dim - 1):
            raise ValueError(f"mla_attention: {name}={dim} must be a power of two >= 16")
    _check_launch("dv_split", dv_split, f"a power of two with v_dim / dv_split >= 16 (v_dim={v_dim})",
                  lambda v: _pow2_at_least(1)(v) and v_dim // v >= 16)
    _check_launch("block_h", block_h, "a power of two >= 16", _pow2_at_least(16))
    _check_launch("block_n", block_n, "a power of two >= 16", _pow2_at_least(16))
    _check_launch("num_splits", num_splits, "an integer >= 1", lambda v: v >= 1)
    if indices_are_slots and (indices is None or kv_cache.stride(0) != kv_cache.shape[1] * kv_cache.stride(1)):
        raise ValueError("mla_attention: indices_are_slots=True needs indices and a kv_cache whose pages are "
                         f"contiguous (stride(0) == page * stride(1)); got indices "
                         f"{'given' if indices is not None else 'None'}, strides {kv_cache.stride()}")
    out = torch.empty(R, H, v_dim, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    tiles = default_tiles(R, H, max_tokens)
    block_h, block_n = block_h or tiles[0], block_n or tiles[1]
    num_warps, num_stages = num_warps or tiles[2], num_stages or tiles[3]
    head_blocks = triton.cdiv(H, block_h)
    num_splits = num_splits or default_num_splits(R, head_blocks * dv_split, max_tokens, block_n)
    single = num_splits == 1  # the split kernel writes `out` itself: no partials, no combine launch
    o_part = out[:, :, None, :] if single else torch.empty(R, H, num_splits, v_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(1 if single else R, H, num_splits, dtype=torch.float32, device=q.device)
    idx = indices if indices is not None else row_len  # any tensor when dense: the SPARSE=False kernel never reads it
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _mla_split_kernel[(head_blocks * dv_split, num_splits, R)](
        q, kv_cache, block_tables, row_seq, row_len, idx, o_part, lse_part,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        idx.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        scale * LOG2E, num_splits,
        H=H, DV=v_dim, DPE=dpe, PAGE=kv_cache.shape[1], BLOCK_H=block_h, BLOCK_N=block_n, DV_SPLIT=dv_split,
        SPARSE=indices is not None, SLOTS=indices_are_slots, SINGLE=single, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if single:
        return out
    _combine_kernel[(H, R)](
        o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0),
        lse_part.stride(1), out.stride(0), out.stride(1), num_splits, DV=v_dim,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
    )
    return out
