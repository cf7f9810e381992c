"""Varlen causal prefill over the paged KV cache, dense or with skip-softmax (BLASST), in Triton.

Queries of many sequences are packed (cu_seqlens_q); each sequence's queries are the *last* q_len
positions of its KV (chunked prefill and prefix-cache hits). K/V are read through the block table;
GQA is native (query head h reads KV head h // group, nothing is repeated). fp16/bf16 (fp32 in tests)
in, fp32 accumulation, online softmax in base 2 (scores pre-multiplied by scale * log2(e)).

grid = (cdiv(max_seqlen_q, BLOCK_M), num_heads, num_seqs); the longest query tiles start first.
Per program, the dense build visits KV tiles in ascending order: first those every row sees whole (no
mask; that loop carries the next tile's block-table entries, CARRY_PAGES), then the diagonal ones (causal
+ end-of-sequence mask). The skip build visits them "sink,
diagonal, rest nearest first" (kernels/geometry.py, PREFILL_ORDER): tile 0, the diagonal tiles, then
the other unmasked tiles in descending order, so the running max holds the sink and the local scores
before the middle tiles are judged (when tile 0 is itself diagonal, just the diagonal tiles). It runs that
order as two loops: tile 0 and the diagonal tiles in one masked loop (the causal mask is a no-op on tile 0),
then the rest, whose loop carries the next tile's block-table entries in registers (CARRY_PAGES, below).
When the page size is a multiple of BLOCK_N a key tile lies in one page: one block-table entry per tile and
consecutive rows from one offset (`block_table.tile_block_entries`), +10-12% dense TFLOP/s on the H100 at page 128 vs 16.

Skip-softmax (IS_SKIP, a constexpr: the dense build contains none of it): after QK^T of a tile,
    skip  <=>  max over valid rows r of (tile_rowmax_r - m_r)  <  log2(λ)
and a skipped tile does no exp, no row-sum, no P·V and no V load; m is not updated. A processed
tile issues its V load first and touches V only after the exps, so the load (which Triton cannot
pipeline inside a branch) hides under them. The first tile has m = -inf so it is never skipped;
log2(λ) = -inf disables skipping.
Torch reference: backends/skip_softmax_torch.py (`skip_softmax_prefill_reference`).

Bound pre-skip (BOUND_SKIP, a constexpr; needs IS_SKIP): before QK^T of a tile, an upper bound of each
row's tile max from the per-block channel-wise key min/max (backends/key_bounds.py keeps them with the
cache), ub_r = max over the tile's blocks visible to row r of Σ_c max(q_c·kmin_c, q_c·kmax_c), computed
as q⁺·kmax + q⁻·kmin (two small dots, the box widened by PREFILL_BOUND_WIDEN so rounding can never push
ub below the computed score). If max over valid rows of (ub_r·scale − m_r) < log2(λ), BLASST would skip
the tile too (ub ≥ rowmax), so it is skipped without QK^T and counted as skipped and pre-skipped; the
skip set and the output are those of the plain skip build. Torch reference: `key_bounds.bound_skip_counts`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.block_table import tile_block_entries
from sparse_llm.kernels.geometry import (
    PREFILL_BLOCK_M,
    PREFILL_BLOCK_N,
    PREFILL_BOUND_WIDEN,
    cdiv,
    check_head_dim,
    next_pow2,
)
from sparse_llm.kernels.tuning import autotune_configs

LOG2_E = 1.0 / math.log(2.0)
_BOUND_WIDEN = tl.constexpr(PREFILL_BOUND_WIDEN)  # a global read inside @jit must be a constexpr

_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)],
    triton.Config({}, num_warps=4, num_stages=1),
)


def _keep_configs(configs, named_args, **kwargs):
    """128-row tiles need two warpgroups (4 warps spill the 128x128 fp32 accumulators)."""
    warps = 8 if kwargs["BLOCK_M"] >= 128 else 4
    return [c for c in configs if c.num_warps == warps] or configs


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, v_ok, LATE_V: tl.constexpr):
    """Online-softmax update with one processed tile; qk is raw q·k, m_tile / m_i are base-2 scaled.

    LATE_V: v was loaded into registers just before this call; touching it only after the exps keeps
    its register -> shared copy (which waits for the load) behind them, so the load latency hides.
    """
    m_new = tl.maximum(m_i, m_tile)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if LATE_V:
        v = tl.where(v_ok, v, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _tile_step(
    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k, k_ptrs, kv_idx, kv_ok,
    stride_ckv, kv_len, start_n, qk_scale,
    MASKED: tl.constexpr, IS_SKIP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """QK^T of one loaded K tile, the BLASST decision, and (if processed) V load + online softmax."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where((kv_idx[None, :] <= q_pos[:, None]) & kv_ok[None, :], qk, float("-inf"))
    m_tile = tl.max(qk, 1) * qk_scale
    if IS_SKIP:
        gap = tl.where(row_valid, m_tile - m_i, float("-inf"))
        if tl.max(gap, 0) >= log2_lam:
            if MASKED:  # V only for processed tiles; its latency hides under the exps (LATE_V)
                v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
            else:
                v = tl.load(k_ptrs + stride_ckv)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, start_n < kv_len, True)
        else:
            n_skip += 1
    else:
        if MASKED:
            v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
        else:
            v = tl.load(k_ptrs + stride_ckv)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, True, False)
    return acc, l_i, m_i, n_skip


@triton.jit
def _bound_skips(
    q_plus, q_minus, q_pos, row_valid, m_i, log2_lam, b_base, bt_row, stride_bb, stride_bmm,
    kv_len, start_n, qk_scale, offs_d,
    PAGE_SIZE: tl.constexpr, SEG: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """True when the key min/max bound proves BLASST would skip this tile (before any QK^T).

    The tile's NB segments of SEG keys each lie in one cache block; a row sees a segment when the
    segment's first key is at or before the row's position. ub[r, s] = q⁺_r·(kmax_s + w) + q⁻_r·(kmin_s − w),
    w = PREFILL_BOUND_WIDEN·max(|kmin_s|, |kmax_s|): ≥ Σ_c max(q_c·kmin_c, q_c·kmax_c) ≥ q_r·k for every key
    of the segment, with enough slack that rounding (of the box to the dot dtype, of tf32 / fp32
    accumulation) never makes it smaller than the kernel's own QK^T.
    """
    seg = tl.arange(0, NB_PAD)
    seg_start = start_n + seg * SEG
    seg_ok = (seg < NB) & (seg_start < kv_len)
    page = tl.load(bt_row + seg_start // PAGE_SIZE, mask=seg_ok, other=0)
    b_ptrs = b_base + page.to(tl.int64)[None, :] * stride_bb + offs_d[:, None]  # [D, NB_PAD]
    lo = tl.load(b_ptrs, mask=seg_ok[None, :], other=0.0).to(tl.float32)
    hi = tl.load(b_ptrs + stride_bmm, mask=seg_ok[None, :], other=0.0).to(tl.float32)
    w = tl.maximum(tl.abs(lo), tl.abs(hi)) * _BOUND_WIDEN
    ub = tl.dot(q_plus, (hi + w).to(q_plus.dtype), input_precision=DOT_PRECISION)
    ub = tl.dot(q_minus, (lo - w).to(q_minus.dtype), ub, input_precision=DOT_PRECISION)
    seen = (seg_start[None, :] <= q_pos[:, None]) & seg_ok[None, :]
    ub_row = tl.max(tl.where(seen, ub, float("-inf")), 1) * qk_scale
    gap = tl.where(row_valid, ub_row - m_i, float("-inf"))  # +inf while m = -inf: tile 0 is never pre-skipped
    return tl.max(gap, 0) < log2_lam


@triton.jit
def _kv_tiles(
    acc, l_i, m_i, n_skip, n_pre, q, q_plus, q_minus, q_pos, row_valid, log2_lam,
    k_base, b_base, bt_row, stride_cb, stride_ckv, stride_cp, stride_bb, stride_bmm, kv_len, lo, hi, qk_scale,
    offs_n, offs_d,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    IS_SKIP: tl.constexpr, BOUND_SKIP: tl.constexpr, SEG: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DESCENDING: tl.constexpr = False, SINK_FIRST: tl.constexpr = False,
    CARRY_PAGES: tl.constexpr = False, mid=0,
):
    """KV tiles [lo, hi) of one query tile. MASKED: apply causal + end-of-sequence masks. DESCENDING: visit
    them from hi - BLOCK_N down to lo (lo, hi multiples of BLOCK_N). SINK_FIRST: the first step, lo = mid - BLOCK_N,
    stands for tile 0, then mid, mid + BLOCK_N, ... (tile 0 and the diagonal tiles in one loop).
    CARRY_PAGES (unmasked): each step loads the next tile's block-table entries into registers, so K's address
    does not come from a load of its own step; Triton's pipeliner then fetches K num_stages - 1 tiles ahead
    instead of one (sm_90 TTGIR: async_wait num 1 at 3 stages, 0 without; benchmarks/skip_prefill_variants.py)."""
    if CARRY_PAGES:
        if DESCENDING:
            first = hi - BLOCK_N
        else:
            first = lo
        page_next = tile_block_entries(bt_row, first, offs_n, tl.where(lo < hi, kv_len, 0), PAGE_SIZE, BLOCK_N)
    for i in range(lo, hi, BLOCK_N):
        if DESCENDING:
            start_n = lo + hi - BLOCK_N - i
        elif SINK_FIRST:
            start_n = tl.where(i < mid, 0, i)
        else:
            start_n = i
        kv_idx = start_n + offs_n
        if MASKED:
            kv_ok = kv_idx < kv_len
            if PAGE_SIZE % BLOCK_N == 0:
                page = tl.load(bt_row + start_n // PAGE_SIZE)  # a visited tile starts before kv_len
            else:
                page = tl.load(bt_row + kv_idx // PAGE_SIZE, mask=kv_ok, other=0)
        elif CARRY_PAGES:
            kv_ok = kv_idx >= 0
            page = page_next
            if DESCENDING:
                nxt = start_n - BLOCK_N
            else:
                nxt = start_n + BLOCK_N
            page_next = tile_block_entries(bt_row, nxt, offs_n, tl.where(i + BLOCK_N < hi, kv_len, 0), PAGE_SIZE,
                                           BLOCK_N)
        else:
            kv_ok = kv_idx >= 0
            page = tile_block_entries(bt_row, start_n, offs_n, kv_len, PAGE_SIZE, BLOCK_N)
        if PAGE_SIZE % BLOCK_N == 0:  # the tile lies in one page: one row offset, the rows consecutive
            kv_off = page.to(tl.int64) * stride_cb + (start_n % PAGE_SIZE + offs_n) * stride_cp
        else:
            kv_off = page.to(tl.int64) * stride_cb + (kv_idx % PAGE_SIZE) * stride_cp
        k_ptrs = k_base + kv_off[:, None] + offs_d[None, :]
        # BOUND_SKIP: K is still issued first, so its latency hides under the bound's dots when the tile
        # is processed (the QK^T dot sits in a branch, where Triton does not pipeline the load).
        if MASKED:
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if BOUND_SKIP:
            if _bound_skips(
                q_plus, q_minus, q_pos, row_valid, m_i, log2_lam, b_base, bt_row, stride_bb, stride_bmm,
                kv_len, start_n, qk_scale, offs_d, PAGE_SIZE, SEG, NB, NB_PAD, DOT_PRECISION,
            ):
                n_skip += 1
                n_pre += 1
            else:
                acc, l_i, m_i, n_skip = _tile_step(
                    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k, k_ptrs, kv_idx, kv_ok,
                    stride_ckv, kv_len, start_n, qk_scale, MASKED, IS_SKIP, DOT_PRECISION,
                )
        else:
            acc, l_i, m_i, n_skip = _tile_step(
                acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k, k_ptrs, kv_idx, kv_ok,
                stride_ckv, kv_len, start_n, qk_scale, MASKED, IS_SKIP, DOT_PRECISION,
            )
    return acc, l_i, m_i, n_skip, n_pre


@triton.autotune(
    configs=_CONFIGS,
    key=["HEAD_DIM", "PAGE_SIZE", "BLOCK_M", "BLOCK_N", "IS_SKIP", "BOUND_SKIP", "COLLECT_STATS", "tune_bucket"],
    reset_to_zero=["STATS"],
    prune_configs_by={"early_config_prune": _keep_configs},
)
@triton.jit
def _prefill_kernel(
    Q, CACHE, BOUNDS, O, CU_Q, SEQ_LENS, BLOCK_TABLES, LOG2_LAMBDA, STATS,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cp, stride_ch, stride_bt, stride_bb, stride_bmm, stride_bh,
    qk_scale, group_size, tune_bucket,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SKIP: tl.constexpr, BOUND_SKIP: tl.constexpr, SEG: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
    COLLECT_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    kv_len = tl.load(SEQ_LENS + seq)
    ctx = kv_len - q_len  # cached prefix: query row i sits at position ctx + i
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < q_len
    q_pos = ctx + offs_m
    q_rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    k_base = CACHE + (head // group_size) * stride_ch
    b_base = BOUNDS + (head // group_size) * stride_bh
    bt_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    if IS_SKIP:
        log2_lam = tl.load(LOG2_LAMBDA + seq)
    else:
        log2_lam = float("-inf")
    if BOUND_SKIP:  # q = q⁺ + q⁻: Σ_c max(q_c·lo_c, q_c·hi_c) = q⁺·hi + q⁻·lo
        q_plus = tl.maximum(q, 0.0)
        q_minus = tl.minimum(q, 0.0)
    else:
        q_plus = q
        q_minus = q

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_skip = tl.zeros([], tl.int32)
    n_pre = tl.zeros([], tl.int32)
    first_pos = ctx + pid_m * BLOCK_M
    hi = ctx + tl.minimum(q_len, (pid_m + 1) * BLOCK_M)  # one past the last valid row's position
    mid = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # tiles below `mid` are visible to every row
    if IS_SKIP:  # sink, diagonal, rest nearest first (geometry.prefill_tile_order); when mid == 0 tile 0 is diagonal
        sink_end = tl.minimum(mid, BLOCK_N)
        acc, l_i, m_i, n_skip, n_pre = _kv_tiles(  # tile 0, then the diagonal tiles
            acc, l_i, m_i, n_skip, n_pre, q, q_plus, q_minus, q_pos, row_valid, log2_lam,
            k_base, b_base, bt_row, stride_cb, stride_ckv, stride_cp, stride_bb, stride_bmm, kv_len, mid - sink_end, hi,
            qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, True, IS_SKIP, BOUND_SKIP, SEG, NB, NB_PAD, DOT_PRECISION,
            SINK_FIRST=True, mid=mid,
        )
        acc, l_i, m_i, n_skip, n_pre = _kv_tiles(  # the rest, nearest first
            acc, l_i, m_i, n_skip, n_pre, q, q_plus, q_minus, q_pos, row_valid, log2_lam,
            k_base, b_base, bt_row, stride_cb, stride_ckv, stride_cp, stride_bb, stride_bmm, kv_len, sink_end, mid,
            qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, IS_SKIP, BOUND_SKIP, SEG, NB, NB_PAD, DOT_PRECISION,
            DESCENDING=True, CARRY_PAGES=True,
        )
    else:
        acc, l_i, m_i, n_skip, n_pre = _kv_tiles(
            acc, l_i, m_i, n_skip, n_pre, q, q_plus, q_minus, q_pos, row_valid, log2_lam,
            k_base, b_base, bt_row, stride_cb, stride_ckv, stride_cp, stride_bb, stride_bmm, kv_len, 0, mid, qk_scale,
            offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, IS_SKIP, BOUND_SKIP, SEG, NB, NB_PAD, DOT_PRECISION,
            CARRY_PAGES=True,
        )
        acc, l_i, m_i, n_skip, n_pre = _kv_tiles(
            acc, l_i, m_i, n_skip, n_pre, q, q_plus, q_minus, q_pos, row_valid, log2_lam,
            k_base, b_base, bt_row, stride_cb, stride_ckv, stride_cp, stride_bb, stride_bmm, kv_len, mid, hi, qk_scale,
            offs_n, offs_d, PAGE_SIZE, BLOCK_N, True, IS_SKIP, BOUND_SKIP, SEG, NB, NB_PAD, DOT_PRECISION,
        )
    out = acc / l_i[:, None]
    o_ptrs = O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_valid[:, None])
    if COLLECT_STATS:
        ncol = 3 if BOUND_SKIP else 2
        tl.atomic_add(STATS + seq * ncol, (hi + BLOCK_N - 1) // BLOCK_N)
        tl.atomic_add(STATS + seq * ncol + 1, n_skip)
        if BOUND_SKIP:
            tl.atomic_add(STATS + seq * ncol + 2, n_pre)


def paged_prefill(
    q: torch.Tensor,
    cache_kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    log_lambda: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
    out: torch.Tensor | None = None,
    key_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q [T, H, D] over the paged cache; returns [T, H, D].

    cu_seqlens_q [S+1], seq_lens [S] (KV length incl. these queries), block_tables [S, max_blocks]
    describe the S sequences. log_lambda [S] (natural log λ, -inf = off) turns skip-softmax on;
    stats [S, 2] int32, if given, receives += (visited, skipped) tiles summed over heads and tiles.
    key_bounds [num_blocks, 2, Hkv, D] (per-block channel-wise key min, max; backends/key_bounds.py),
    with log_lambda, turns on the bound pre-skip; stats must then be [S, 3]: + pre-skipped tiles.
    """
    t, h, d = q.shape
    check_head_dim(d)
    num_seqs = seq_lens.shape[0]
    hkv = cache_kv.shape[3]
    page_size = cache_kv.shape[2]
    if h % hkv:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={hkv}")
    if cache_kv.shape[4] != d or cache_kv.stride(4) != 1 or q.stride(2) != 1:
        raise ValueError(f"cache_kv {tuple(cache_kv.shape)} / q {tuple(q.shape)}: head_dim mismatch or not contiguous")
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries and block_tables {block_tables.shape[0]} rows "
            f"for {num_seqs} sequences"
        )
    bound = key_bounds is not None
    if bound:
        _check_key_bounds(key_bounds, cache_kv, log_lambda, page_size, block_n)
    ncol = 3 if bound else 2
    if stats is not None and (stats.dtype != torch.int32 or stats.shape != (num_seqs, ncol)):
        raise ValueError(
            f"stats must be int32 [{num_seqs}, {ncol}]{' (key_bounds given)' if bound else ''}, "
            f"got {stats.dtype} {tuple(stats.shape)}"
        )
    out = torch.empty_like(q) if out is None else out
    if t == 0 or num_seqs == 0:
        return out
    is_skip = log_lambda is not None
    log2_lam = (log_lambda.to(torch.float32) * LOG2_E).contiguous() if is_skip else seq_lens
    stats_arg = stats if stats is not None else torch.zeros(2, dtype=torch.int32, device=q.device)
    bounds = key_bounds if bound else cache_kv[:, 0, 0]  # never read by the plain builds
    seg = min(page_size, block_n)
    nb = block_n // seg
    grid = (cdiv(max_seqlen_q, block_m), h, num_seqs)
    _prefill_kernel[grid](
        q, cache_kv, bounds, out, cu_seqlens_q, seq_lens, block_tables, log2_lam, stats_arg,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache_kv.stride(0), cache_kv.stride(1), cache_kv.stride(2), cache_kv.stride(3), block_tables.stride(0),
        bounds.stride(0), bounds.stride(1) if bound else 0, bounds.stride(-2),
        scale * LOG2_E, h // hkv, min(max_seqlen_q.bit_length(), 17),
        HEAD_DIM=d, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_SKIP=is_skip, BOUND_SKIP=bound, SEG=seg, NB=nb, NB_PAD=max(16, next_pow2(nb)),
        COLLECT_STATS=stats is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def _check_key_bounds(key_bounds, cache_kv, log_lambda, page_size, block_n) -> None:
    num_blocks, _, _, hkv, d = cache_kv.shape
    want = (num_blocks, 2, hkv, d)
    if tuple(key_bounds.shape) != want or key_bounds.stride(-1) != 1:
        raise ValueError(f"key_bounds must be [num_blocks, 2, Hkv, D] = {want}, contiguous in D; "
                         f"got {tuple(key_bounds.shape)}")
    if log_lambda is None:
        raise ValueError("key_bounds (the bound pre-skip) needs log_lambda: it only refines skip-softmax")
    if block_n % page_size and page_size % block_n:
        raise ValueError(f"block_n={block_n} and the cache page size {page_size}: one must divide the other "
                         "for the bound pre-skip")
