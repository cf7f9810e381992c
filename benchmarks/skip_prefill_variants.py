"""Experiment: win back the skip-softmax prefill's per-tile cost lost with the "sink, diagonal, rest nearest first"
tile order (issue #4). Not a library change: the variants are copies of the library's skip build, inside this file.

Session 4 measured the library skip build (kernels/prefill.py, three tile loops: sink [0, BLOCK_N), diagonal
[mid, hi) masked, rest [sink_end, mid) descending) ≈ 8–12% slower per tile than the old ascending order at the same
tile sparsity (0.99× / 1.17× our dense at 50% / 75%, 32K). Variants (one self-contained kernel, constexpr knobs):

  copy          the library's skip build as it is (three loops; V loaded inside the processed branch)
  two_loops     (a) sink + diagonal tiles in ONE masked loop (the causal mask is a no-op on the sink tile), then the
                rest descending: one fewer pipelined loop (prologue / drain) per program
  two_counted   (b) two_loops, every loop `tl.range(0, span, BLOCK_N)` from a precomputed base (start = base ± off)
  v_top         (c) copy, V load issued at the top of every iteration (before QKᵀ, also for skipped tiles),
                first touched inside the processed branch (the library's tl.where trick keeps the copy there)
  v_top_plain   (c) copy, V loaded at the top and used as loaded (no tl.where): Triton's pipeliner may then
                multi-buffer it like K (a top-level load feeding a dot)
  lean_index    (f) two_loops, and the tile's page-table offsets / in-page offsets computed from start // PAGE and
                loop-invariant offs_n // PAGE, offs_n % PAGE (start is a multiple of BLOCK_N, a multiple of PAGE):
                no per-element 32-bit div/mod of start + offs_n per tile
  two_carried   (f) two_loops, the unmasked loop carrying the next tile's block-table entries in registers (loaded
                one iteration ahead): K's address then does not depend on a load of its own iteration, the
                indirection that keeps Triton's pipeliner at a K prefetch distance of one tile (sm_90 TTGIR)
  two_carried_vtop  two_carried + v_top_plain
  two_carried_pv_always  (session 5) two_carried, V at the top, and the decision gating only the exps and row sums:
                a skipped tile adds p = 0 through a P·V at the loop's top level (an MMA it does not need, but V and
                both dots stay pipelined, the V tile never sits in registers; it saves the exps, ≈ 1/3 of a tile)
  bn64          (d) copy with BLOCK_N = 64 (other tiles: other skip counts; its own factor is bisected)
  ascending     (e) the session-2 order (unmasked [0, mid) ascending, then the diagonal): other skips, own factor
  dense_copy, dense_carried   (f) the library's DENSE build, and it with two_carried's page carrying (the dense
                build's K/V prefetch distance is one tile too): timed at λ off against the library's dense build
(d) every variant is swept over num_warps 8 and num_stages 2 / 3 / 4 (the library autotunes over the same three),
except where stages 3 and 4 compile to the same TTGIR (--sm90-report); the config best at ≈50% is reported.

One command (GPU): (1) every variant against the library skip kernel on a small odd-sized batch (two sequences,
one with a cached prefix): outputs within bf16 tolerance and, for the order-preserving variants, the same
skipped-tile counts exactly; (2) per length, the factors for ≈50% / ≈75% tile sparsity found with the library kernel
(attention_kernels.py's generator and bisection); (3) triton.testing.do_bench medians of the library dense build,
the library skip build and every variant at λ off, ≈50% and ≈75% (achieved sparsity of each kernel beside it);
(4) a table and benchmarks/results/skip_prefill_variants_<gpu>.json.

    . benchmarks/gpu_env.sh && python benchmarks/skip_prefill_variants.py          # H100, 32K: ~3-4 min (~45 compiles)
    . benchmarks/gpu_env.sh && python benchmarks/skip_prefill_variants.py --lens 32768 131072   # + 128K: ~6 min
(at the second length only each variant's best config of the first is timed).
    python benchmarks/skip_prefill_variants.py --cpu-smoke [--dtype float16]                # CPU interpreter
    python benchmarks/skip_prefill_variants.py --sm90-report [--out F.json]   # CPU: sm_90 build, ptxas regs/spills
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the Triton import: kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_kernels import (  # noqa: E402
    _cudnn_prefill,
    _find_factor,
    metadata,
    paged_cache,
    result_path,
    synthetic_kv_q,
)
from prefill_variants import _BUILD_ERRORS, _timer  # noqa: E402  (a variant that cannot build is a result)

from sparse_llm.backends import skip_softmax_torch  # noqa: E402
from sparse_llm.kernels.geometry import PREFILL_BLOCK_N  # noqa: E402
from sparse_llm.kernels.prefill import paged_prefill  # noqa: E402

LOG2_E = 1.0 / math.log(2.0)
BLOCK_M = 128
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # vs the library kernel's output
TARGETS = (0.5, 0.75)


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, v_ok, LATE_V: tl.constexpr):
    """The library's online-softmax update (kernels/prefill.py), verbatim."""
    m_new = tl.maximum(m_i, m_tile)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if LATE_V:
        v = tl.where(v_ok, v, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _step(
    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
    kv_len, start_n, qk_scale, offs_n, offs_d, page_in,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, V_LOAD: tl.constexpr, LEAN_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PAGE_CARRIED: tl.constexpr = False, IS_SKIP: tl.constexpr = True,
):
    """One KV tile of the skip build: K load, QKᵀ, the BLASST decision, and (processed) V + online softmax.
    PAGE_CARRIED: page_in holds the tile's block-table entries (loaded by the previous iteration).
    IS_SKIP False: the library's dense build (no decision; V loaded after QKᵀ at the loop's top level)."""
    kv_idx = start_n + offs_n
    if MASKED:
        kv_ok = kv_idx < kv_len
    else:
        kv_ok = kv_idx >= 0
    if LEAN_INDEX:  # start_n % PAGE_SIZE == 0: the in-page offsets do not depend on the tile
        page_ptrs = bt_row + start_n // PAGE_SIZE + offs_n // PAGE_SIZE
        in_page = (offs_n % PAGE_SIZE) * stride_cp
    else:
        page_ptrs = bt_row + kv_idx // PAGE_SIZE
        in_page = (kv_idx % PAGE_SIZE) * stride_cp
    if PAGE_CARRIED:
        page = page_in
    elif MASKED:
        page = tl.load(page_ptrs, mask=kv_ok, other=0)
    else:
        page = tl.load(page_ptrs)
    k_ptrs = k_base + (page.to(tl.int64) * stride_cb + in_page)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if V_LOAD != "branch":  # issued before QKᵀ for every tile, skipped or not
        if MASKED:
            v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
        else:
            v = tl.load(k_ptrs + stride_ckv)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where((kv_idx[None, :] <= q_pos[:, None]) & kv_ok[None, :], qk, float("-inf"))
    m_tile = tl.max(qk, 1) * qk_scale
    if not IS_SKIP:
        if MASKED:
            v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
        else:
            v = tl.load(k_ptrs + stride_ckv)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, True, False)
    elif V_LOAD == "pv_always":
        # The decision gates only the exps and the row sums: a skipped tile contributes p = 0 to a P·V that runs
        # at the loop's top level, so V and both dots stay where Triton's pipeliner multi-buffers them.
        gap = tl.where(row_valid, m_tile - m_i, float("-inf"))
        if tl.max(gap, 0) >= log2_lam:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        else:
            alpha = tl.zeros_like(m_i) + 1.0
            p = tl.zeros_like(qk)
            n_skip += 1
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        gap = tl.where(row_valid, m_tile - m_i, float("-inf"))
        if tl.max(gap, 0) >= log2_lam:
            if V_LOAD == "branch":
                if MASKED:
                    v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
                else:
                    v = tl.load(k_ptrs + stride_ckv)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, start_n < kv_len, True)
            elif V_LOAD == "top":
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, start_n < kv_len, True)
            else:  # "top_plain"
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, qk_scale, m_tile, v, True, False)
        else:
            n_skip += 1
    return acc, l_i, m_i, n_skip


@triton.jit
def _tiles(
    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
    kv_len, lo, hi, mid, qk_scale, offs_n, offs_d,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DESCENDING: tl.constexpr,
    SINK_FIRST: tl.constexpr, LOOP: tl.constexpr, LOOP_STAGES: tl.constexpr, V_LOAD: tl.constexpr,
    LEAN_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_SKIP: tl.constexpr = True,
):
    """KV tiles [lo, hi) (lo a multiple of BLOCK_N). DESCENDING: from the last tile down (hi a multiple too).
    SINK_FIRST: lo = mid - BLOCK_N stands for tile 0, then mid, mid + BLOCK_N, ... (sink + diagonal in one loop).
    LOOP "range": the library's `range(lo, hi, BLOCK_N)`, start = lo + hi - BLOCK_N - i when descending;
    "counted": `tl.range(0, hi - lo, BLOCK_N)` over an offset, start = base ± off (LOOP_STAGES > 0: its num_stages)."""
    if LOOP == "carried" and not MASKED:
        # Block-table entries of the next tile loaded one iteration ahead into registers (a plain load whose
        # result is first used next iteration, so its latency hides by itself): K's address no longer comes from
        # a load of the same iteration, which may let the pipeliner fetch K further ahead.
        top = hi - BLOCK_N
        span = hi - lo
        if DESCENDING:
            first = top
        else:
            first = lo
        page = tl.load(bt_row + (first + offs_n) // PAGE_SIZE, mask=(offs_n >= 0) & (span > 0), other=0)
        for off in tl.range(0, span, BLOCK_N):
            if DESCENDING:
                start_n = top - off
                nxt = start_n - BLOCK_N
            else:
                start_n = lo + off
                nxt = start_n + BLOCK_N
            page_next = tl.load(bt_row + (nxt + offs_n) // PAGE_SIZE, mask=(offs_n >= 0) & (off + BLOCK_N < span),
                                other=0)
            acc, l_i, m_i, n_skip = _step(
                acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv,
                stride_cp, kv_len, start_n, qk_scale, offs_n, offs_d, page, PAGE_SIZE, MASKED, V_LOAD, LEAN_INDEX,
                DOT_PRECISION, PAGE_CARRIED=True, IS_SKIP=IS_SKIP,
            )
            page = page_next
    elif LOOP == "range" or LOOP == "carried":
        for i in range(lo, hi, BLOCK_N):
            if DESCENDING:
                start_n = lo + hi - BLOCK_N - i
            elif SINK_FIRST:
                start_n = tl.where(i < mid, 0, i)
            else:
                start_n = i
            acc, l_i, m_i, n_skip = _step(
                acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv,
                stride_cp, kv_len, start_n, qk_scale, offs_n, offs_d, offs_n, PAGE_SIZE, MASKED, V_LOAD, LEAN_INDEX,
                DOT_PRECISION, IS_SKIP=IS_SKIP,
            )
    else:
        top = hi - BLOCK_N
        span = hi - lo
        if LOOP_STAGES > 0:
            for off in tl.range(0, span, BLOCK_N, num_stages=LOOP_STAGES):
                if DESCENDING:
                    start_n = top - off
                elif SINK_FIRST:
                    start_n = tl.where(off == 0, 0, lo + off)
                else:
                    start_n = lo + off
                acc, l_i, m_i, n_skip = _step(
                    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv,
                    stride_cp, kv_len, start_n, qk_scale, offs_n, offs_d, offs_n, PAGE_SIZE, MASKED, V_LOAD, LEAN_INDEX,
                    DOT_PRECISION, IS_SKIP=IS_SKIP,
                )
        else:
            for off in tl.range(0, span, BLOCK_N):
                if DESCENDING:
                    start_n = top - off
                elif SINK_FIRST:
                    start_n = tl.where(off == 0, 0, lo + off)
                else:
                    start_n = lo + off
                acc, l_i, m_i, n_skip = _step(
                    acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv,
                    stride_cp, kv_len, start_n, qk_scale, offs_n, offs_d, offs_n, PAGE_SIZE, MASKED, V_LOAD, LEAN_INDEX,
                    DOT_PRECISION, IS_SKIP=IS_SKIP,
                )
    return acc, l_i, m_i, n_skip


@triton.jit
def _variant_kernel(
    Q, CACHE, O, CU_Q, SEQ_LENS, BLOCK_TABLES, LOG2_LAMBDA, STATS,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ckv, stride_cp, stride_ch, stride_bt,
    qk_scale, group_size,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ORDER: tl.constexpr, LOOP: tl.constexpr, LOOP_STAGES: tl.constexpr, V_LOAD: tl.constexpr,
    LEAN_INDEX: tl.constexpr, COLLECT_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_SKIP: tl.constexpr,
):
    """The library's _prefill_kernel with IS_SKIP (no bound pre-skip); ORDER "three" (library), "two" or "ascending"."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    kv_len = tl.load(SEQ_LENS + seq)
    ctx = kv_len - q_len
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < q_len
    q_pos = ctx + offs_m
    q_rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    k_base = CACHE + (head // group_size) * stride_ch
    bt_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    if IS_SKIP:
        log2_lam = tl.load(LOG2_LAMBDA + seq)
    else:
        log2_lam = float("-inf")

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_skip = tl.zeros([], tl.int32)
    first_pos = ctx + pid_m * BLOCK_M
    hi = ctx + tl.minimum(q_len, (pid_m + 1) * BLOCK_M)
    mid = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    if ORDER == "ascending":  # session 2: [0, mid) unmasked ascending, then the diagonal tiles
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, 0, mid, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, False, False, LOOP,
            LOOP_STAGES, V_LOAD, LEAN_INDEX, DOT_PRECISION, IS_SKIP,
        )
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, mid, hi, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, True, False, False, LOOP,
            LOOP_STAGES, V_LOAD, False, DOT_PRECISION, IS_SKIP,
        )
    elif ORDER == "three":  # the library: sink, diagonal, rest descending
        sink_end = tl.minimum(mid, BLOCK_N)
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, 0, sink_end, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, False, False, LOOP,
            LOOP_STAGES, V_LOAD, LEAN_INDEX, DOT_PRECISION, IS_SKIP,
        )
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, mid, hi, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, True, False, False, LOOP,
            LOOP_STAGES, V_LOAD, False, DOT_PRECISION, IS_SKIP,
        )
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, sink_end, mid, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, True, False, LOOP,
            LOOP_STAGES, V_LOAD, LEAN_INDEX, DOT_PRECISION, IS_SKIP,
        )
    else:  # "two": tile 0 then the diagonal tiles in one masked loop (when mid == 0 tile 0 is diagonal), then the rest
        sink_end = tl.minimum(mid, BLOCK_N)
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, mid - sink_end, hi, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, True, False, True, LOOP,
            LOOP_STAGES, V_LOAD, False, DOT_PRECISION, IS_SKIP,
        )
        acc, l_i, m_i, n_skip = _tiles(
            acc, l_i, m_i, n_skip, q, q_pos, row_valid, log2_lam, k_base, bt_row, stride_cb, stride_ckv, stride_cp,
            kv_len, sink_end, mid, mid, qk_scale, offs_n, offs_d, PAGE_SIZE, BLOCK_N, False, True, False, LOOP,
            LOOP_STAGES, V_LOAD, LEAN_INDEX, DOT_PRECISION, IS_SKIP,
        )
    out = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_valid[:, None])
    if COLLECT_STATS:
        tl.atomic_add(STATS + seq * 2, (hi + BLOCK_N - 1) // BLOCK_N)
        tl.atomic_add(STATS + seq * 2 + 1, n_skip)


# ----------------------------------------------------------------------------------------------- variants
_COPY = dict(BLOCK_N=128, ORDER="three", LOOP="range", LOOP_STAGES=0, V_LOAD="branch", LEAN_INDEX=False, IS_SKIP=True)
_W8 = [(8, 2), (8, 3), (8, 4)]


def variants() -> dict:
    """name -> (kernel constexprs, (num_warps, num_stages) configs swept, kind).

    kind "same": the library's tiles in the library's order, so the same skips as the library kernel; "other": bn64
    (checked against the library kernel called with block_n=64) and ascending (against the torch oracle in that
    order), each timed at its own factors; "dense": copies of the dense build, checked and timed against it."""
    two = {**_COPY, "ORDER": "two"}
    counted = {**two, "LOOP": "counted"}
    s23 = [(8, 2), (8, 3)]  # stages 3 and 4 compile to the same TTGIR for these (sm_90 report): not swept twice
    dense = {**_COPY, "ORDER": "ascending", "IS_SKIP": False}
    return {
        "copy": (_COPY, _W8, "same"),
        "two_loops": (two, s23, "same"),
        "two_counted": (counted, s23, "same"),
        "v_top": ({**_COPY, "V_LOAD": "top"}, [(8, 3), (8, 4)], "same"),
        "v_top_plain": ({**_COPY, "V_LOAD": "top_plain"}, s23, "same"),
        "lean_index": ({**two, "LEAN_INDEX": True}, s23, "same"),
        "two_carried": ({**two, "LOOP": "carried"}, _W8, "same"),
        "two_carried_vtop": ({**two, "LOOP": "carried", "V_LOAD": "top_plain"}, _W8, "same"),
        "two_carried_pv_always": ({**two, "LOOP": "carried", "V_LOAD": "pv_always"}, _W8, "same"),
        "bn64": ({**_COPY, "BLOCK_N": 64}, s23, "other"),
        "ascending": ({**_COPY, "ORDER": "ascending"}, s23, "other"),
        "dense_copy": (dense, _W8, "dense"),
        "dense_carried": ({**dense, "LOOP": "carried"}, _W8, "dense"),
    }


class Case:
    """q and a shuffled-page cache for a batch of sequences; queries are the last q_len positions of each."""

    def __init__(self, q_lens, kv_lens, heads, kv_heads, head_dim, dtype, device, block_m, block_n, page=16):
        data = [synthetic_kv_q(kl, torch.arange(kl - ql, kl, device=device), heads, kv_heads, head_dim, dtype,
                               device, seed=kl + i) for i, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True))]
        self.q = torch.cat([d[2] for d in data])
        self.cache, tables = paged_cache(kv_lens, kv_heads, head_dim, page, dtype, device,
                                         fill=lambda i, _: data[i][:2], seed=page)
        self.k, self.v = (data[0][0], data[0][1]) if len(data) == 1 else (None, None)  # for cuDNN (one sequence)
        self.meta = metadata(q_lens, kv_lens, len(q_lens), tables, page, device)
        self.kv_lens = torch.tensor(kv_lens, dtype=torch.float64)
        self.scale = head_dim ** -0.5
        self.device = device
        self.block_m, self.block_n = block_m, block_n  # the library's tiles (128 x 128; smaller in --cpu-smoke)
        self.out = torch.empty_like(self.q)

    def log_lam(self, factor):
        """Natural log λ per sequence, λ = factor / kv_len (factor None: off, -inf)."""
        if factor is None:
            return torch.full((len(self.kv_lens),), -math.inf, device=self.device)
        return torch.log(factor / self.kv_lens).to(torch.float32).to(self.device)

    def library(self, log_lam=None, stats=None, block_n=None):
        m = self.meta
        return paged_prefill(self.q, self.cache, m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q,
                             self.scale, log_lam, stats, block_m=self.block_m, block_n=block_n or self.block_n,
                             out=self.out)

    def ascending_oracle(self, factor):
        """Float64 torch simulation of the skip rule in the session-2 ascending order: (out, counts [S, 2]).

        The oracle (backends/skip_softmax_torch.py) reads its tile order from `prefill_tile_order`; it is rebound
        to the identity order for this call only."""
        m, saved = self.meta, skip_softmax_torch.prefill_tile_order
        skip_softmax_torch.prefill_tile_order = _ascending_order
        try:
            out, counts = skip_softmax_torch.skip_softmax_paged_torch(
                self.q.double(), self.cache.double(), m, self.scale, "prefill", self.log_lam(factor),
                block_m=self.block_m, block_n=self.block_n)
        finally:
            skip_softmax_torch.prefill_tile_order = saved
        return out, counts.to(torch.int32)

    def variant(self, consts, warps, stages, log_lam, stats=None):
        if consts["LEAN_INDEX"] and consts["BLOCK_N"] % self.cache.shape[2]:
            raise ValueError(f"LEAN_INDEX needs BLOCK_N={consts['BLOCK_N']} a multiple of page {self.cache.shape[2]}")
        m, c, q = self.meta, self.cache, self.q
        h, d = q.shape[1], q.shape[2]
        stats_arg = stats if stats is not None else torch.zeros(2, dtype=torch.int32, device=q.device)
        grid = (triton.cdiv(m.max_seqlen_q, self.block_m), h, m.seq_lens.shape[0])
        _variant_kernel[grid](
            q, c, self.out, m.cu_seqlens_q, m.seq_lens, m.block_tables, (log_lam * LOG2_E).contiguous(), stats_arg,
            q.stride(0), q.stride(1), self.out.stride(0), self.out.stride(1),
            c.stride(0), c.stride(1), c.stride(2), c.stride(3), m.block_tables.stride(0),
            self.scale * LOG2_E, h // c.shape[3],
            HEAD_DIM=d, PAGE_SIZE=c.shape[2], BLOCK_M=self.block_m, COLLECT_STATS=stats is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages, **consts,
        )
        return self.out

    def counts(self, run, factor):
        """(visited, skipped) tiles per sequence of run(log_lam, stats)."""
        stats = torch.zeros(len(self.kv_lens), 2, dtype=torch.int32, device=self.device)
        run(self.log_lam(factor), stats)
        return stats.cpu()


def _ascending_order(first_pos, end_pos, block_n, n_cols):
    """Every query tile visits its KV tiles 0, 1, 2, ... (columns t >= its tile count are never processed)."""
    return torch.arange(n_cols, device=first_pos.device)[None, :].expand(first_pos.shape[0], n_cols)


def sparsity(counts) -> float:
    return float(counts[:, 1].sum()) / float(counts[:, 0].sum())


# ----------------------------------------------------------------------------------------------- checks
def check_small(args, device, dtype, table) -> dict:
    """Every variant vs its reference at λ off and ≈50% on two odd sequences (one with a cached prefix).

    Reference: the library kernel (same block_n) for the library's order, where the skipped-tile counts must be
    equal exactly; the float64 torch oracle in ascending order for `ascending` (counts: 0.1% bf16 near-tie flips).
    """
    case = Case(args.check_q, args.check_kv, args.heads, args.kv_heads, args.head_dim, dtype, device, args.block_m,
                args.block_n)
    factor, _ = _find_factor(lambda f: sparsity(case.counts(case.library, f)), 0.5, max(args.check_kv),
                             args.search_steps)
    tol = TOL[dtype]
    res = {"q_lens": args.check_q, "kv_lens": args.check_kv, "factor": factor, "tolerance": tol, "variants": {}}
    for name, (consts, cfgs, kind) in table.items():
        row = res["variants"][name] = {"ok": True}
        ascending = kind == "other" and consts["ORDER"] == "ascending"
        block_n = consts["BLOCK_N"]
        for key, f in (("off", None),) if kind == "dense" else (("off", None), ("skip", factor)):
            if ascending and f is not None:
                ref, ref_counts = case.ascending_oracle(f)
            elif kind == "dense":  # the library's dense build (log_lam None), which counts no skips
                ref = case.library(None, block_n=block_n).clone()
                ref_counts = case.counts(lambda lam, st: case.library(None, st, block_n), f)
            else:
                ref = case.library(case.log_lam(f), block_n=block_n).clone()
                ref_counts = case.counts(lambda lam, st: case.library(lam, st, block_n), f)
            try:
                out = case.variant(consts, *cfgs[0], case.log_lam(f)).clone()
                counts = case.counts(lambda lam, st, c=consts, w=cfgs[0]: case.variant(c, *w, lam, st), f)
            except _BUILD_ERRORS as e:  # a variant that does not build is a result, not a crash
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                break
            err = float((out.double() - ref.double()).abs().max())
            counts, ref_counts = counts.cpu(), ref_counts.cpu()  # the oracle's counts live on the host
            same = bool(torch.equal(counts, ref_counts))
            close = same or (ascending and dtype == torch.bfloat16 and _near_ties(counts, ref_counts))
            row.update({f"{key}_max_err": err, f"{key}_counts": counts.tolist(),
                        f"{key}_ref_counts": ref_counts.tolist(), f"{key}_same_counts": same})
            row["ok"] = row["ok"] and err <= tol and close
    return res


def _near_ties(counts, ref) -> bool:
    """bf16 kernel vs float64 oracle: the visited tiles equal, skipped ones within 0.1% (decisions at a tie)."""
    flips = (counts[:, 1] - ref[:, 1]).abs().sum()
    return bool(torch.equal(counts[:, 0], ref[:, 0]) and flips <= 1e-3 * ref[:, 0].sum())


# ----------------------------------------------------------------------------------------------- timing
def time_length(n, args, device, dtype, table, bench, small) -> dict:
    case = Case([n], [n], args.heads, args.kv_heads, args.head_dim, dtype, device, args.block_m, args.block_n)
    flops = 2.0 * n * n * args.heads * args.head_dim
    res = {"seq_len": n, "library_dense_ms": bench(lambda: case.library())}
    dense_ref = case.library().clone()
    if device.type == "cuda":
        res.update(_cudnn_prefill(case.q, case.k, case.v, args.heads, args.kv_heads, case.scale, bench, flops))
    case.k = case.v = None
    lib = {}
    factors = {"off": None}
    for t in TARGETS:
        f, s = _find_factor(lambda f: sparsity(case.counts(case.library, f)), t, n, args.search_steps)
        factors[f"{t:.2f}"] = f
    for key, f in factors.items():
        lam = case.log_lam(f)
        lib[key] = {"factor": f, "sparsity": sparsity(case.counts(case.library, f)), "_ref": case.library(lam).clone(),
                    "ms": bench(lambda lam=lam: case.library(lam))}
    res["library_skip"] = {k: {kk: vv for kk, vv in v.items() if kk != "_ref"} for k, v in lib.items()}
    print(_lib_line(res), flush=True)
    rows = []
    for name, (consts, cfgs, kind) in table.items():
        if not small["variants"].get(name, {}).get("ok"):
            rows.append({"variant": name, "skipped": "small-size check failed"})
            continue
        if n != args.lens[0] and args.best_cfg.get(name):  # longer lengths: only the config best at the first
            cfgs = [tuple(args.best_cfg[name])]
        rows.append(_time_variant(name, consts, cfgs, kind, case, lib, dense_ref, n, args, bench))
        print(_var_line(rows[-1], res), flush=True)
    res["variants"] = rows
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _time_variant(name, consts, cfgs, kind, case, lib, dense_ref, n, args, bench) -> dict:
    """Every config at λ off, ≈50%, ≈75% (dense copies: off only, vs the library's dense build)."""
    row = {"variant": name, "kind": kind, **{k.lower(): v for k, v in consts.items()}, "configs": []}

    def run(w, s):
        return lambda lam, st=None: case.variant(consts, w, s, lam, st)

    if kind == "dense":
        factors, refs = {"off": None}, {"off": dense_ref}
    else:
        factors, refs = {k: v["factor"] for k, v in lib.items()}, {k: v["_ref"] for k, v in lib.items()}
    if kind == "other":  # another tile order / geometry: its own factors for the same sparsities (first config)
        try:
            for t in TARGETS:
                factors[f"{t:.2f}"], _ = _find_factor(lambda f: sparsity(case.counts(run(*cfgs[0]), f)), t, n,
                                                      args.search_steps)
        except _BUILD_ERRORS as e:
            return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    achieved = {}  # tile sparsity per factor, counted with the variant's stats build at its first working config
    for w, s in cfgs:
        cfg = {"num_warps": w, "num_stages": s}
        try:
            run(w, s)(case.log_lam(None))
            if not achieved:  # (the stats build is one more compile: once per variant, not per config)
                achieved = {key: sparsity(case.counts(run(w, s), f)) for key, f in factors.items()}
        except _BUILD_ERRORS as e:
            cfg["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["configs"].append(cfg)
            continue
        for key, f in factors.items():
            lam = case.log_lam(f)
            point = {"factor": f, "sparsity": achieved[key]}
            if kind != "other" or key == "off":  # another order skips other tiles: its output differs legitimately
                point["max_err_vs_library"] = float((run(w, s)(lam).float() - refs[key].float()).abs().max())
            point["ms"] = bench(lambda lam=lam, w=w, s=s: run(w, s)(lam))
            cfg[key] = point
        row["configs"].append(cfg)
    timed = [c for c in row["configs"] if "error" not in c]
    if timed:
        at = "off" if kind == "dense" else "0.50"
        best = min(timed, key=lambda c: c[at]["ms"])  # the config best at ≈50% (dense: off) represents the variant
        row["best"] = best
        args.best_cfg.setdefault(name, (best["num_warps"], best["num_stages"]))
        tol = TOL[case.q.dtype]
        row["ok"] = all(p.get("max_err_vs_library", 0.0) <= tol for c in timed for k, p in c.items()
                        if isinstance(p, dict))
        if kind == "same":
            row["same_sparsity"] = all(abs(c[k]["sparsity"] - lib[k]["sparsity"]) < 1e-12 for c in timed for k in lib)
    else:
        row["ok"] = False
    return row


# ----------------------------------------------------------------------------------------------- sm_90 build
def sm90_report(table) -> dict:
    """Compile every variant (bf16, D=128, page 16, 8 warps) for sm_90 on this machine and read ptxas' resource use.

    No GPU needed: triton.compile with a GPUTarget, then the bundled ptxas -v on the PTX. Reports registers,
    spill bytes, shared memory and how many async copies (pipelined loads) the TTGIR holds per loop."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    sig = {n: "*bf16" for n in ("Q", "CACHE", "O")}
    sig.update(CU_Q="*i32", SEQ_LENS="*i32", BLOCK_TABLES="*i32", LOG2_LAMBDA="*fp32", STATS="*i32")
    for n in ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ckv", "stride_cp",
              "stride_ch", "stride_bt", "group_size"):
        sig[n] = "i32"
    sig["qk_scale"] = "fp32"
    # What the JIT specialises on the GPU at the benchmark's shapes: pointers and strides divisible by 16 (without
    # it the K/V loads' alignment is unknown, nothing becomes cp.async and the loop is not pipelined at all).
    names = _variant_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in ("group_size", "qk_scale")}
    rep = {}
    for name, (consts, cfgs, _) in table.items():
        for w, s in cfgs:
            c = dict(HEAD_DIM=128, PAGE_SIZE=16, BLOCK_M=BLOCK_M, COLLECT_STATS=False, DOT_PRECISION="tf32", **consts)
            full = {**sig, **{k: "constexpr" for k in c}}
            try:
                k = triton.compile(ASTSource(_variant_kernel, full, c, attrs), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=w, num_stages=s))
            except _BUILD_ERRORS as e:
                rep[f"{name} w{w}s{s}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            rep[f"{name} w{w}s{s}"] = _ptxas_usage(ptxas, k.asm["ptx"], k.metadata.name) | {
                "shared_bytes": k.metadata.shared,
                "async_copies": len(re.findall(r"ttg\.async_copy_global_to_local", k.asm["ttgir"])),
                "async_wait_num": sorted({int(x) for x in re.findall(r"async_wait .*?\{num = (\d+)", k.asm["ttgir"])}),
                "wgmma_waits": len(re.findall(r"ttng\.warp_group_dot_wait", k.asm["ttgir"])),
                "loops": len(re.findall(r"\bscf\.for\b", k.asm["ttgir"])),
            }
            print(f"  {name:<16} w{w} s{s}: {rep[f'{name} w{w}s{s}']}", flush=True)
    return rep


def _ptxas_usage(ptxas, ptx, name) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        done = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None}


# ----------------------------------------------------------------------------------------------- report
def _lib_line(res) -> str:
    s = res["library_skip"]
    cudnn = f"  cuDNN {res['cudnn_ms']:.2f} ms" if res.get("cudnn_ms") else ""
    return (f"N={res['seq_len']}: library dense {res['library_dense_ms']:.2f} ms{cudnn}; library skip "
            + ", ".join(f"{k} {v['ms']:.2f} ms ({v['sparsity']:.1%})" for k, v in s.items()))


def _var_line(r, res) -> str:
    if "best" not in r:
        why = r.get("skipped") or r.get("error") or [c.get("error") for c in r.get("configs", [])]
        return f"  {r['variant']:<16} not timed: {why}"
    b, dense, lib = r["best"], res["library_dense_ms"], res["library_skip"]
    cells = []
    for k in ("off", "0.50", "0.75"):
        if k in b:
            base = dense if r["kind"] == "dense" else lib[k]["ms"]  # dense copies: vs the library's dense build
            cells.append(f"{k} {b[k]['ms']:7.2f} ms {b[k]['sparsity']:5.1%} x{dense / b[k]['ms']:.2f} "
                         f"(lib x{base / b[k]['ms']:.3f})")
    flag = "" if r["ok"] and r.get("same_sparsity", True) else "  [CHECK FAILED]"
    return f"  {r['variant']:<16} w{b['num_warps']}s{b['num_stages']}  " + "  ".join(cells) + flag


def table_text(result) -> str:
    """Per length: ms, achieved tile sparsity, × our dense, × cuDNN, × the library build it copies."""
    lines = []
    for res in result["lengths"]:
        dense, lib, cudnn = res["library_dense_ms"], res["library_skip"], res.get("cudnn_ms")
        lines.append(f"N={res['seq_len']}  (ms; sparsity; x our dense; x cuDNN; x library skip, dense rows: x library "
                     f"dense)  library dense {dense:.2f} ms" + (f", cuDNN {cudnn:.2f} ms" if cudnn else ""))
        lines.append(f"  {'kernel':<17}{'cfg':<6}" + "".join(f"{k:>40}" for k in ("λ off", "≈50%", "≈75%")))

        def cells(points, is_dense=False):
            out = ""
            for k in ("off", "0.50", "0.75"):
                if k not in points:
                    continue
                pt = points[k]
                xc = f"{cudnn / pt['ms']:.2f}" if cudnn else "-"
                base = dense if is_dense else lib[k]["ms"]
                out += (f"{pt['ms']:>9.2f} {pt['sparsity']:>6.1%} {dense / pt['ms']:>5.2f}x {xc:>5}x "
                        f"{base / pt['ms']:>6.3f}x")
            return out
        lines.append(f"  {'library skip':<17}{'auto':<6}" + cells(lib))
        for r in res["variants"]:
            if "best" not in r:
                lines.append(f"  {r['variant']:<17}not timed")
                continue
            b = r["best"]
            flag = "" if r["ok"] and r.get("same_sparsity", True) else "  CHECK FAILED"
            lines.append(f"  {r['variant']:<17}w{b['num_warps']}s{b['num_stages']:<3}"
                         + cells(b, r["kind"] == "dense") + flag)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[32768], help="sequence lengths timed (one causal sequence)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="--cpu-smoke dtype")
    ap.add_argument("--sm90-report", action="store_true", help="CPU: compile for sm_90, print ptxas regs/spills, exit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    table = variants()
    if args.only:
        unknown = sorted(set(args.only) - set(table))
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; known: {sorted(table)}")
        table = {k: v for k, v in table.items() if k in args.only}
    if args.sm90_report:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--sm90-report compiles for the GPU: unset TRITON_INTERPRET")
        rep = sm90_report(table)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rep, fh, indent=1)
            print(f"wrote {args.out}")
        return 0
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim, args.lens = 2, 1, 64, [300]
        args.check_q, args.check_kv, args.search_steps = [141, 77], [405, 77], 6
        args.block_m = args.block_n = 32  # smaller tiles: more of them, so the skip rule and every loop get exercised
        table = {k: ({**c, "BLOCK_N": c["BLOCK_N"] // 4}, cfgs[:1], o)  # the interpreter ignores warps/stages
                 for k, (c, cfgs, o) in table.items()}
        dtype = getattr(torch, args.dtype)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or with --cpu-smoke")
        args.heads, args.kv_heads, args.head_dim = 32, 8, 128
        args.check_q, args.check_kv, args.search_steps = [333, 277], [1000, 277], 12
        args.block_m, args.block_n = BLOCK_M, PREFILL_BLOCK_N
        dtype = torch.bfloat16
    args.best_cfg = {}
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    gpu, out_path = result_path("skip_prefill_variants", device, args.cpu_smoke, args.out)
    bench = _timer(device)
    result = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": str(dtype).replace("torch.", ""), "block_m": args.block_m, "page_size": 16}}
    t0 = time.time()
    result["check_small"] = check_small(args, device, dtype, table)
    print("small check:", json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.endswith("counts")}
                                      for k, v in result["check_small"]["variants"].items()}), flush=True)
    result["lengths"] = [time_length(n, args, device, dtype, table, bench, result["check_small"]) for n in args.lens]
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(table_text(result))
    print(f"wrote {out_path} ({result['seconds']} s)")
    ok = all(v["ok"] for v in result["check_small"]["variants"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
