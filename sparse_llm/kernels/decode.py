"""Split-KV paged decode (flash-decoding), dense or with skip-softmax voted over the GQA group, in Triton.

One query token per sequence. One program per (KV head, sequence, split): it loads the KV head's
tiles of its split once and attends all `group` query heads of that KV head together (the rows of
its tile, padded to 16 for tl.dot), keeping its own running max. A second small kernel merges the
splits by log-sum-exp (skipped when there is a single split: the first kernel then writes the output).

Skip-softmax (IS_SKIP constexpr): a tile is skipped when, for every one of the group's heads,
tile_rowmax - m < log2(λ); it then loads no V and does no exp / P·V. Sink-seeded splits: before its
loop every program computes the row max of the sequence's FIRST KV tile (tile 0, usually the attention
sink) and starts its running max there (l = 0, acc = 0: only split 0 accumulates tile 0's P·V, in its
loop). Without the seed each split's first tile met m = -inf and could never be skipped, which capped
decode sparsity near 1 - 1/split_tiles. Any starting max keeps online softmax exact; only split 0's
tile 0 is never skipped. A split that skips all its tiles has l = 0 and writes o = 0, lse = -inf, which
the merge weighs 0. The skip build carries each tile's block-table entries one iteration ahead, so
its K load is not held behind a same-iteration table load (its V load, inside the processed branch, is
never pipelined; the carried address at least lets it issue at once). Torch reference: backends/skip_softmax_torch.py (`skip_softmax_decode_reference`),
which takes the same `split_tiles`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.block_table import tile_block_entries
from sparse_llm.kernels.geometry import DECODE_BLOCK_N, cdiv, check_head_dim, decode_split_tiles, next_pow2, num_sms
from sparse_llm.kernels.tuning import autotune_configs

LOG2_E = 1.0 / math.log(2.0)

# The register-capped configs serve the skip build: at its natural 168+ registers per thread fewer programs fit
# on an SM than for the dense build (benchmarks/skip_decode_variants.py picked 4 warps, r128 at 8K b64 and 128K b1).
_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    + [triton.Config({}, num_warps=4, num_stages=s, maxnreg=128) for s in (2, 3)],
    triton.Config({}, num_warps=4, num_stages=1),
)


@triton.autotune(
    configs=_CONFIGS,
    # tune_bucket ~ programs launched, split_bucket ~ tiles per program: both change which config wins (the skip
    # build at 32K b16 and 128K b1 launch the same number of programs but walk 103 vs 32 tiles each).
    key=["HEAD_DIM", "PAGE_SIZE", "BLOCK_N", "BLOCK_H", "IS_SKIP", "COLLECT_STATS", "SINGLE_SPLIT", "tune_bucket",
         "split_bucket"],
    reset_to_zero=["STATS"],
)
@triton.jit
def _decode_kernel(
    Q, CACHE, O, O_PART, LSE_PART, SEQ_LENS, BLOCK_TABLES, LOG2_LAMBDA, STATS,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cp, stride_ch, stride_bt,
    stride_pt, stride_ph, stride_ps,
    qk_scale, split_tiles, tune_bucket, split_bucket,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_SKIP: tl.constexpr, COLLECT_STATS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid = (num_kv_heads, num_seqs, num_splits)
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(SEQ_LENS + seq)
    n_tiles = tl.cdiv(kv_len, BLOCK_N)
    t_lo = split * split_tiles
    if t_lo >= n_tiles:
        return
    t_hi = tl.minimum(t_lo + split_tiles, n_tiles)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q_row = Q + seq.to(tl.int64) * stride_qt
    q = tl.load(q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None], other=0.0)
    k_base = CACHE + kv_head * stride_ch
    bt_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    if IS_SKIP:
        log2_lam = tl.load(LOG2_LAMBDA + seq)
    else:
        log2_lam = float("-inf")

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    if IS_SKIP:  # sink seed: the running max starts at tile 0's row max (one extra K tile, shared in L2)
        seed_ok = offs_n < kv_len
        seed_page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=seed_ok, other=0)
        seed_off = seed_page.to(tl.int64) * stride_cb + (offs_n % PAGE_SIZE) * stride_cp
        k0 = tl.load(k_base + seed_off[:, None] + offs_d[None, :], mask=seed_ok[:, None], other=0.0)
        qk0 = tl.dot(q, tl.trans(k0), input_precision=DOT_PRECISION)
        m_i = tl.max(tl.where(seed_ok[None, :], qk0, float("-inf")), 1) * qk_scale
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    n_skip = tl.zeros([], tl.int32)
    if IS_SKIP:  # carried block-table entries (docs/kernels.md, "Prefetch distance"): tile t_lo's now
        page_next = tile_block_entries(bt_row, t_lo * BLOCK_N, offs_n, kv_len, PAGE_SIZE, BLOCK_N)
    for t in range(t_lo, t_hi):
        kv_idx = t * BLOCK_N + offs_n
        kv_ok = kv_idx < kv_len
        if IS_SKIP:  # this tile's entries were loaded one iteration ago; load the next tile's now
            page = page_next
            page_next = tile_block_entries(bt_row, (t + 1) * BLOCK_N, offs_n, tl.where(t + 1 < t_hi, kv_len, 0),
                                           PAGE_SIZE, BLOCK_N)
        else:
            page = tile_block_entries(bt_row, t * BLOCK_N, offs_n, kv_len, PAGE_SIZE, BLOCK_N)
        kv_off = page.to(tl.int64) * stride_cb + (kv_idx % PAGE_SIZE) * stride_cp
        k_ptrs = k_base + kv_off[:, None] + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        m_tile = tl.max(qk, 1) * qk_scale
        process = True
        if IS_SKIP:
            gap = tl.where(head_ok, m_tile - m_i, float("-inf"))
            process = (tl.max(gap, 0) >= log2_lam) | (t == 0)  # tile 0 is never skipped
        if process:
            v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
        else:
            n_skip += 1

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0: every tile of the split skipped, acc = 0
    if SINGLE_SPLIT:
        o_ptrs = O + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = seq.to(tl.int64) * stride_pt + heads * stride_ph + split * stride_ps
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=head_ok)
    if COLLECT_STATS:
        tl.atomic_add(STATS + seq * 2, t_hi - t_lo)
        tl.atomic_add(STATS + seq * 2 + 1, n_skip)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, O, SEQ_LENS,
    stride_pt, stride_ph, stride_ps, stride_ot, stride_oh, split_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid = (num_seqs, num_heads): out = Σ_s 2^(lse_s - M) o_s / Σ_s 2^(lse_s - M), BLOCK_S splits at a time
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(SEQ_LENS + seq)
    n_splits = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), split_tiles)
    offs_d = tl.arange(0, HEAD_DIM)
    base = seq.to(tl.int64) * stride_pt + head * stride_ph
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_splits
        part = base + offs_s * stride_ps
        lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(lse, 0))
        w = tl.where(s_ok, tl.math.exp2(lse - m_new), 0.0)
        alpha = tl.math.exp2(m_run - m_new)
        o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l_run = l_run * alpha + tl.sum(w, 0)
        m_run = m_new
    tl.store(O + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, (acc / l_run).to(O.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    cache_kv: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_kv_len: int,
    scale: float,
    log_lambda: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    split_tiles: int | None = None,
    block_n: int = DECODE_BLOCK_N,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence, q [B, H, D], over the paged cache; returns [B, H, D].

    seq_lens [B] (KV lengths incl. the query token), block_tables [B, max_blocks]; max_kv_len >=
    max(seq_lens) sizes the split grid. split_tiles defaults to `decode_split_tiles(...)` on q's device
    (the skip policy when log_lambda is given).
    log_lambda [B] (natural log λ, -inf = off) turns skip-softmax on; stats [B, 2] int32, if given,
    receives += (visited, skipped) tiles summed over KV heads.
    """
    b, h, d = q.shape
    check_head_dim(d)
    hkv = cache_kv.shape[3]
    if h % hkv:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={hkv}")
    if cache_kv.shape[4] != d or cache_kv.stride(4) != 1 or q.stride(2) != 1:
        raise ValueError(f"cache_kv {tuple(cache_kv.shape)} / q {tuple(q.shape)}: head_dim mismatch or not contiguous")
    if seq_lens.shape != (b,) or block_tables.shape[0] < b:
        raise ValueError(
            f"seq_lens {tuple(seq_lens.shape)} / block_tables {tuple(block_tables.shape)} do not match batch {b}"
        )
    if stats is not None and (stats.dtype != torch.int32 or stats.shape != (b, 2)):
        raise ValueError(f"stats must be int32 [{b}, 2], got {stats.dtype} {tuple(stats.shape)}")
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    if split_tiles is None:
        split_tiles = decode_split_tiles(max_kv_len, b, hkv, num_sms(q.device), block_n, skip=log_lambda is not None)
    if split_tiles < 1:
        raise ValueError(f"split_tiles={split_tiles} must be >= 1")
    num_splits = cdiv(cdiv(max_kv_len, block_n), split_tiles)
    single = num_splits == 1
    o_part = torch.empty(b, h, 1 if single else num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, 1 if single else num_splits, dtype=torch.float32, device=q.device)
    is_skip = log_lambda is not None
    log2_lam = (log_lambda.to(torch.float32) * LOG2_E).contiguous() if is_skip else seq_lens
    stats_arg = stats if stats is not None else torch.zeros(2, dtype=torch.int32, device=q.device)
    group = h // hkv
    _decode_kernel[(hkv, b, num_splits)](
        q, cache_kv, out, o_part, lse_part, seq_lens, block_tables, log2_lam, stats_arg,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache_kv.stride(0), cache_kv.stride(1), cache_kv.stride(2), cache_kv.stride(3), block_tables.stride(0),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        scale * LOG2_E, split_tiles, min((b * hkv * num_splits).bit_length(), 16), split_tiles.bit_length(),
        GROUP=group, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=d, PAGE_SIZE=cache_kv.shape[2], BLOCK_N=block_n,
        IS_SKIP=is_skip, COLLECT_STATS=stats is not None, SINGLE_SPLIT=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if not single:
        _merge_kernel[(b, h)](
            o_part, lse_part, out, seq_lens,
            lse_part.stride(0), lse_part.stride(1), lse_part.stride(2), out.stride(0), out.stride(1), split_tiles,
            HEAD_DIM=d, BLOCK_N=block_n, BLOCK_S=min(32, next_pow2(num_splits)),
        )
    return out
