"""Experiment: bring the skip-softmax decode build's fixed cost down to the dense build's (issue #4, target ≥ 1.25×
our dense at ≈50% tile sparsity). Not a library change: the variants are copies of kernels/decode.py's
`_decode_kernel`, inside this file, with constexpr knobs; the library's `_merge_kernel` merges their splits.

Why: decode is bandwidth bound and a skipped tile (BLASST) still reads its K, so at 50% tile sparsity at most 25% of
the bytes are saved (≤ 1.33×). The library skip build at λ off costs +19% over dense (V is loaded inside the
"processed" branch, where Triton's pipeliner does not prefetch it, and every tile's K address comes from a
block-table load of the same iteration, which holds the K prefetch to one tile — docs/kernels.md "Prefetch distance").

  dense_copy          the library's dense build as it is
  dense_carried       (a) dense, the next tile's block-table entries loaded one iteration ahead into registers
  skip_copy           the library's skip build as it is (V loaded in the processed branch)
  skip_carried        (a) skip_copy + carried block-table entries
  skip_carried_vtop   (b) skip_carried, V loaded at the top of every iteration (before QKᵀ and the decision): V is
                      then pipelined like K, but a skipped tile's V is read too (no bytes saved: predicted ≈ dense)
  skip_ahead          (c) decision one tile ahead: iteration t computes QKᵀ and the vote of tile t+1 (against the
                      running max after tile t, known before tile t's P·V), issues tile t+1's V load masked by that
                      vote (a masked-off load reads no bytes), then does tile t's exps and P·V with the V loaded one
                      iteration earlier. V's latency hides under a whole iteration and skipped tiles read no V.
                      Same decisions as the library (exact counts checked).
  skip_carried_ahead  (a) + (c). The sm_90 TTGIR shows Triton turning the V load into an async copy that it waits
                      for (async_wait num=1) before tile t's P·V, so V's latency is only partly hidden.
  skip_carried_ahead_reg  skip_carried_ahead with a no-op select on the loaded V: it stays a plain register load
                      (no async copy in the TTGIR), at 220-255 registers (4 warps: 2 programs / SM).
(d) every variant is swept over (num_warps, num_stages[, maxnreg]); the config best at ≈50% (dense copies: at λ off)
represents the variant in the table. Register caps (r128 / r168) are tried where the sm_90 report shows the skip
build's registers limiting resident programs per SM (65536 / (regs × 32 × warps)) below the dense build's.
The library kernels are timed as the library runs them (autotuned).

One command (GPU): (1) every variant against the library kernels on a small odd-sized batch (three sequences of odd
lengths, several splits each): outputs within bf16 tolerance, skipped-tile counts equal to the library skip build's
exactly; (2) per case (8K b64, 32K b16, 128K b1; attention_kernels.py's synthetic sinks + locality generator) the
factor for ≈50% tile sparsity bisected with the library skip kernel; (3) CUDA-graph replay medians (attention_kernels.
graph_timer) of the library dense build, the library skip build at λ off and ≈50%, and every variant × config;
(4) a table (µs, effective TB/s = dense bytes / time, sparsity, × library dense, × library skip) and
benchmarks/results/skip_decode_variants_<gpu>.json.

    . benchmarks/gpu_env.sh && python benchmarks/skip_decode_variants.py                 # H100: ~3-4 min
    python benchmarks/skip_decode_variants.py --cpu-smoke [--dtype float16]              # CPU interpreter
    python benchmarks/skip_decode_variants.py --sm90-report [--out F.json]   # CPU: sm_90 build, ptxas regs/spills
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the Triton import: kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_kernels import _find_factor, graph_timer, paged_cache, result_path, synthetic_kv_q  # noqa: E402
from skip_prefill_variants import _BUILD_ERRORS, TOL, _ptxas_usage, sparsity  # noqa: E402

from sparse_llm.kernels.decode import _merge_kernel, paged_decode  # noqa: E402
from sparse_llm.kernels.geometry import DECODE_BLOCK_N, cdiv, decode_split_tiles, next_pow2, num_sms  # noqa: E402

LOG2_E = 1.0 / math.log(2.0)
CASES = ((8192, 64), (32768, 16), (131072, 1))


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _pages(bt_row, t, lim, offs_n, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Block-table entries of tile t's keys below `lim` (kv_len, or 0 for none; 0 where masked).
    Masks are written as `index < limit` with a scalar limit: `vector & scalar-bool` fails in the interpreter."""
    kv_idx = t * BLOCK_N + offs_n
    return tl.load(bt_row + kv_idx // PAGE_SIZE, mask=kv_idx < lim, other=0)


@triton.jit
def _kv_ptrs(k_base, page, t, offs_n, offs_d, stride_cb, stride_cp, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    kv_idx = t * BLOCK_N + offs_n
    kv_off = page.to(tl.int64) * stride_cb + (kv_idx % PAGE_SIZE) * stride_cp
    return k_base + kv_off[:, None] + offs_d[None, :]


@triton.jit(do_not_specialize=["split_tiles"])  # one build for every case (compile time of the GPU run)
def _variant_kernel(
    Q, CACHE, O, O_PART, LSE_PART, SEQ_LENS, BLOCK_TABLES, LOG2_LAMBDA, STATS,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cp, stride_ch, stride_bt,
    stride_pt, stride_ph, stride_ps,
    qk_scale, split_tiles,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_SKIP: tl.constexpr, COLLECT_STATS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CARRY: tl.constexpr, V_LOAD: tl.constexpr,
):
    """The library's _decode_kernel; CARRY: block-table entries one tile ahead; V_LOAD "branch" (library),
    "top" (every tile's V before QKᵀ) or "ahead" (decision and masked V load one tile ahead)."""
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
    if IS_SKIP:  # sink seed (library): the running max starts at tile 0's row max
        seed_ok = offs_n < kv_len
        seed_page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=seed_ok, other=0)
        seed_off = seed_page.to(tl.int64) * stride_cb + (offs_n % PAGE_SIZE) * stride_cp
        k0 = tl.load(k_base + seed_off[:, None] + offs_d[None, :], mask=seed_ok[:, None], other=0.0)
        qk0 = tl.dot(q, tl.trans(k0), input_precision=DOT_PRECISION)
        m_i = tl.max(tl.where(seed_ok[None, :], qk0, float("-inf")), 1) * qk_scale
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    n_skip = tl.zeros([], tl.int32)
    if V_LOAD == "ahead" or V_LOAD == "ahead_reg":
        # Prologue: tile t_lo's QKᵀ, vote and (voted) V; the loop then works one tile behind its loads.
        page_c = _pages(bt_row, t_lo, kv_len, offs_n, BLOCK_N, PAGE_SIZE)
        ptrs_c = _kv_ptrs(k_base, page_c, t_lo, offs_n, offs_d, stride_cb, stride_cp, BLOCK_N, PAGE_SIZE)
        ok_c = t_lo * BLOCK_N + offs_n < kv_len
        k = tl.load(ptrs_c, mask=ok_c[:, None], other=0.0)
        qk_c = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk_c = tl.where(ok_c[None, :], qk_c, float("-inf"))
        m_tile_c = tl.max(qk_c, 1) * qk_scale
        gap = tl.where(head_ok, m_tile_c - m_i, float("-inf"))
        proc_c = (tl.max(gap, 0) >= log2_lam) | (t_lo == 0)  # tile 0 is never skipped
        v_c = tl.load(ptrs_c + stride_ckv, mask=(t_lo * BLOCK_N + offs_n < tl.where(proc_c, kv_len, 0))[:, None],
                      other=0.0)
        if CARRY:
            page_n = _pages(bt_row, t_lo + 1, tl.where(t_lo + 1 < t_hi, kv_len, 0), offs_n, BLOCK_N, PAGE_SIZE)
        for t in range(t_lo, t_hi):
            nx = t + 1
            has_nx = nx < t_hi
            lim_n = tl.where(has_nx, kv_len, 0)  # tile t+1's keys exist only inside the split
            if CARRY:
                page = page_n
                page_n = _pages(bt_row, nx + 1, tl.where(nx + 1 < t_hi, kv_len, 0), offs_n, BLOCK_N, PAGE_SIZE)
            else:
                page = _pages(bt_row, nx, lim_n, offs_n, BLOCK_N, PAGE_SIZE)
            ptrs_n = _kv_ptrs(k_base, page, nx, offs_n, offs_d, stride_cb, stride_cp, BLOCK_N, PAGE_SIZE)
            ok_n = nx * BLOCK_N + offs_n < lim_n
            k = tl.load(ptrs_n, mask=ok_n[:, None], other=0.0)
            qk_n = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            qk_n = tl.where(ok_n[None, :], qk_n, float("-inf"))
            m_tile_n = tl.max(qk_n, 1) * qk_scale
            m_new = tl.maximum(m_i, m_tile_c)
            m_after = tl.where(proc_c, m_new, m_i)  # the running max tile t+1 is judged against (library's)
            gap = tl.where(head_ok, m_tile_n - m_after, float("-inf"))
            proc_n = (tl.max(gap, 0) >= log2_lam) & has_nx
            v_lim = tl.where(proc_n, lim_n, 0)  # a skipped tile's V load is masked off: no bytes read
            v_ok = (nx * BLOCK_N + offs_n < v_lim)[:, None]
            # "ahead": Triton turns this into an async copy and waits for it (async_wait num=1) before this
            # iteration's P·V (sm_90 TTGIR, --sm90-report --dump-ttgir). "ahead_reg": a no-op select on the result
            # keeps it a plain register load (no async copy in the TTGIR); whether ptxas then lets the P·V of tile
            # t run before the select waits for the data is what the GPU run shows. (volatile=True, or the select
            # placed in front of the next P·V, still gave an async copy.)
            v_n = tl.load(ptrs_n + stride_ckv, mask=v_ok, other=0.0)
            if V_LOAD == "ahead_reg":
                v_n = tl.where(v_ok, v_n, 0.0)
            if proc_c:
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(qk_c * qk_scale - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v_c.dtype), v_c, acc, input_precision=DOT_PRECISION)
                m_i = m_new
            else:
                n_skip += 1
            qk_c = qk_n
            m_tile_c = m_tile_n
            proc_c = proc_n
            v_c = v_n
    else:
        if CARRY:
            page_n = _pages(bt_row, t_lo, kv_len, offs_n, BLOCK_N, PAGE_SIZE)
        for t in range(t_lo, t_hi):
            kv_idx = t * BLOCK_N + offs_n
            kv_ok = kv_idx < kv_len
            if CARRY:  # this tile's entries came from the previous iteration; fetch the next tile's now
                page = page_n
                page_n = _pages(bt_row, t + 1, tl.where(t + 1 < t_hi, kv_len, 0), offs_n, BLOCK_N, PAGE_SIZE)
            else:
                page = tl.load(bt_row + kv_idx // PAGE_SIZE, mask=kv_ok, other=0)
            k_ptrs = _kv_ptrs(k_base, page, t, offs_n, offs_d, stride_cb, stride_cp, BLOCK_N, PAGE_SIZE)
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
            if V_LOAD == "top":
                v = tl.load(k_ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            qk = tl.where(kv_ok[None, :], qk, float("-inf"))
            m_tile = tl.max(qk, 1) * qk_scale
            process = True
            if IS_SKIP:
                gap = tl.where(head_ok, m_tile - m_i, float("-inf"))
                process = (tl.max(gap, 0) >= log2_lam) | (t == 0)  # tile 0 is never skipped
            if process:
                if V_LOAD == "branch":
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

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
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


# ----------------------------------------------------------------------------------------------- variants
def _options(cfg) -> dict:
    """(num_warps, num_stages[, maxnreg]) -> launch / compile options."""
    opts = {"num_warps": cfg[0], "num_stages": cfg[1]}
    if len(cfg) > 2:
        opts["maxnreg"] = cfg[2]
    return opts


def _cfg_name(cfg) -> str:
    return f"w{cfg[0]}s{cfg[1]}" + (f"r{cfg[2]}" if len(cfg) > 2 else "")


_LIB_CFGS = [(4, 2), (4, 3), (8, 2), (8, 3)]  # the library's autotune set
_DEEP_CFGS = _LIB_CFGS + [(4, 4)]  # carried entries can use a deeper K prefetch


def variants() -> dict:
    """name -> (kernel constexprs, (num_warps, num_stages[, maxnreg]) configs swept, kind "dense" | "skip")."""
    return {
        "dense_copy": (dict(IS_SKIP=False, CARRY=False, V_LOAD="branch"), _LIB_CFGS, "dense"),
        "dense_carried": (dict(IS_SKIP=False, CARRY=True, V_LOAD="branch"), _DEEP_CFGS, "dense"),
        # r128: 4 programs / SM at 4 warps like the dense build (sm_90: 143-193 registers uncapped; no spills at s2,
        # 12 bytes at s3); session 3 measured skip_copy's r128 in the library (not kept).
        "skip_copy": (dict(IS_SKIP=True, CARRY=False, V_LOAD="branch"), _LIB_CFGS + [(4, 3, 128)], "skip"),
        "skip_carried": (dict(IS_SKIP=True, CARRY=True, V_LOAD="branch"), _DEEP_CFGS + [(4, 2, 128), (4, 3, 128)],
                         "skip"),
        "skip_carried_vtop": (dict(IS_SKIP=True, CARRY=True, V_LOAD="top"), _LIB_CFGS, "skip"),
        "skip_ahead": (dict(IS_SKIP=True, CARRY=False, V_LOAD="ahead"), _LIB_CFGS, "skip"),
        "skip_carried_ahead": (dict(IS_SKIP=True, CARRY=True, V_LOAD="ahead"), _DEEP_CFGS + [(4, 2, 168)], "skip"),
        # (232-255 registers at 4 warps from s3 on: only s2 and 8 warps are worth timing)
        "skip_carried_ahead_reg": (dict(IS_SKIP=True, CARRY=True, V_LOAD="ahead_reg"), [(4, 2), (8, 2), (8, 3)],
                                   "skip"),
    }


class Case:
    """Decode queries (one token per sequence) over a shuffled-page cache of synthetic sinks + locality data."""

    def __init__(self, kv_lens, heads, kv_heads, head_dim, dtype, device, block_n, page=16):
        data = [synthetic_kv_q(n, torch.tensor([n - 1], device=device), heads, kv_heads, head_dim, dtype, device,
                               seed=i) for i, n in enumerate(kv_lens)]
        self.cache, tables = paged_cache(kv_lens, kv_heads, head_dim, page, dtype, device,
                                         fill=lambda i, _: data[i][:2], seed=page)
        # Width padded to a multiple of 16 so the small check and the timed cases share one specialisation.
        self.tables = torch.nn.functional.pad(tables, (0, -tables.shape[1] % 16))
        self.q = torch.cat([d[2] for d in data])
        data.clear()
        self.kv_lens = list(kv_lens)
        self.lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
        self.max_len = max(kv_lens)
        self.scale = head_dim ** -0.5
        self.device, self.block_n = device, block_n
        self.out = torch.empty_like(self.q)
        b, hkv = len(kv_lens), kv_heads
        sms = num_sms(device)
        self.split = {kind: decode_split_tiles(self.max_len, b, hkv, sms, block_n, skip=kind == "skip")
                      for kind in ("dense", "skip")}
        self.bytes = sum(kv_lens) * kv_heads * head_dim * 2 * self.cache.element_size()  # K and V, dense

    def log_lam(self, factor):
        """Natural log λ per sequence, λ = factor / kv_len (factor None: off, -inf)."""
        lens = torch.tensor(self.kv_lens, dtype=torch.float64)
        if factor is None:
            return torch.full((len(lens),), -math.inf, device=self.device)
        return torch.log(factor / lens).to(torch.float32).to(self.device)

    def library(self, log_lam=None, stats=None):
        split = self.split["dense" if log_lam is None else "skip"]
        return paged_decode(self.q, self.cache, self.lens, self.tables, self.max_len, self.scale, log_lam, stats,
                            split_tiles=split, block_n=self.block_n, out=self.out)

    def variant(self, consts, cfg, log_lam=None, stats=None):
        """The variant kernel + the library's merge, on the same split grid as the library build it copies."""
        q, c, out = self.q, self.cache, self.out
        b, h, d = q.shape
        hkv = c.shape[3]
        split = self.split["skip" if consts["IS_SKIP"] else "dense"]
        num_splits = cdiv(cdiv(self.max_len, self.block_n), split)
        single = num_splits == 1
        o_part = torch.empty(b, h, 1 if single else num_splits, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b, h, 1 if single else num_splits, dtype=torch.float32, device=q.device)
        lam = (log_lam * LOG2_E).contiguous() if consts["IS_SKIP"] else self.lens
        stats_arg = stats if stats is not None else torch.zeros(2, dtype=torch.int32, device=q.device)
        _variant_kernel[(hkv, b, num_splits)](
            q, c, out, o_part, lse_part, self.lens, self.tables, lam, stats_arg,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            c.stride(0), c.stride(1), c.stride(2), c.stride(3), self.tables.stride(0),
            lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
            self.scale * LOG2_E, split,
            GROUP=h // hkv, BLOCK_H=max(16, next_pow2(h // hkv)), HEAD_DIM=d, PAGE_SIZE=c.shape[2],
            BLOCK_N=self.block_n, COLLECT_STATS=stats is not None, SINGLE_SPLIT=single,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **_options(cfg), **consts,
        )
        if not single:
            _merge_kernel[(b, h)](
                o_part, lse_part, out, self.lens,
                lse_part.stride(0), lse_part.stride(1), lse_part.stride(2), out.stride(0), out.stride(1), split,
                HEAD_DIM=d, BLOCK_N=self.block_n, BLOCK_S=min(32, next_pow2(num_splits)),
            )
        return out

    def counts(self, run, factor):
        """(visited, skipped) tiles per sequence of run(log_lam, stats)."""
        stats = torch.zeros(len(self.kv_lens), 2, dtype=torch.int32, device=self.device)
        run(self.log_lam(factor), stats)
        return stats.cpu()



# ----------------------------------------------------------------------------------------------- checks
def check_small(args, device, dtype, table) -> dict:
    """Every variant vs the library build it copies, at λ off and ≈50%, on odd-length sequences with several
    splits each: outputs within TOL, and (skip builds) the skipped-tile counts equal exactly."""
    case = Case(args.check_kv, args.heads, args.kv_heads, args.head_dim, dtype, device, args.block_n)
    factor, _ = _find_factor(lambda f: sparsity(case.counts(case.library, f)), 0.5, case.max_len, args.search_steps)
    tol = TOL[dtype]
    res = {"kv_lens": args.check_kv, "split_tiles": case.split, "factor": factor, "tolerance": tol, "variants": {}}
    for name, (consts, cfgs, kind) in table.items():
        row = res["variants"][name] = {"ok": True}
        for key, f in (("off", None),) if kind == "dense" else (("off", None), ("skip", factor)):
            lam = None if kind == "dense" else case.log_lam(f)
            ref = case.library(lam).clone()
            ref_counts = case.counts(lambda lam_, st: case.library(None if kind == "dense" else lam_, st), f)
            try:
                out = case.variant(consts, cfgs[0], case.log_lam(f)).clone()
                counts = case.counts(lambda lam_, st, c=consts, w=cfgs[0]: case.variant(c, w, lam_, st), f)
            except _BUILD_ERRORS as e:  # a variant that does not build is a result, not a crash
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                break
            err = float((out.double() - ref.double()).abs().max())
            same = bool(torch.equal(counts, ref_counts))
            row.update({f"{key}_max_err": err, f"{key}_counts": counts.tolist(),
                        f"{key}_ref_counts": ref_counts.tolist(), f"{key}_same_counts": same})
            row["ok"] = row["ok"] and err <= tol and same
    return res


# ----------------------------------------------------------------------------------------------- timing
def time_case(n, b, args, device, dtype, table, bench, small) -> dict:
    case = Case([n] * b, args.heads, args.kv_heads, args.head_dim, dtype, device, args.block_n)
    us = lambda fn: 1e3 * bench(fn)  # noqa: E731
    res = {"kv_len": n, "batch": b, "bytes": case.bytes, "split_tiles": case.split}
    res["library_dense_us"] = us(lambda: case.library())
    dense_ref = case.library().clone()
    factor, _ = _find_factor(lambda f: sparsity(case.counts(case.library, f)), 0.5, n, args.search_steps)
    lib = {}
    for key, f in (("off", None), ("0.50", factor)):
        lam = case.log_lam(f)
        lib[key] = {"factor": f, "sparsity": sparsity(case.counts(case.library, f)),
                    "_ref": case.library(lam).clone(), "us": us(lambda lam=lam: case.library(lam))}
    res["library_skip"] = {k: {kk: vv for kk, vv in v.items() if kk != "_ref"} for k, v in lib.items()}
    print(_lib_line(res), flush=True)
    if args.split_sweep:
        res["split_sweep"] = split_sweep(case, factor, args.split_sweep, us)
    rows = []
    for name, (consts, cfgs, kind) in table.items():
        if not small["variants"].get(name, {}).get("ok"):
            rows.append({"variant": name, "skipped": "small-size check failed"})
            continue
        rows.append(_time_variant(name, consts, cfgs, kind, case, lib, dense_ref, args, us))
        print(_var_line(rows[-1], res), flush=True)
    res["variants"] = rows
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def split_sweep(case, factor, scales, us) -> list[dict]:
    """The library builds at other split lengths (tiles per program): the number of programs decides how the
    last wave fills the GPU, and a skip program's running max sees more tiles in a longer split. Each row: the
    split length, the skip build's achieved sparsity at the ≈50% factor and its time, and the dense build's time."""
    rows = []
    lam = case.log_lam(factor)
    for scale in scales:
        split = max(1, round(case.split["skip"] * scale))

        def run(log_lam=None, stats=None, split=split):
            return paged_decode(case.q, case.cache, case.lens, case.tables, case.max_len, case.scale, log_lam, stats,
                                split_tiles=split, block_n=case.block_n, out=case.out)

        stats = torch.zeros(len(case.kv_lens), 2, dtype=torch.int32, device=case.device)
        run(lam, stats)
        row = {"scale": scale, "split_tiles": split, "sparsity": sparsity(stats.cpu()),
               "skip_us": us(lambda: run(lam)), "dense_us": us(lambda: run())}
        rows.append(row)
        print(f"  split x{scale:<5} {split:5d} tiles  skip {row['skip_us']:8.1f} us at {row['sparsity']:.1%}"
              f"  dense {row['dense_us']:8.1f} us", flush=True)
    return rows


def _time_variant(name, consts, cfgs, kind, case, lib, dense_ref, args, us) -> dict:
    """Every config at λ off and ≈50% (dense copies: λ off only, vs the library's dense build)."""
    row = {"variant": name, "kind": kind, **{k.lower(): v for k, v in consts.items()}, "configs": []}
    if kind == "dense":
        factors, refs = {"off": None}, {"off": dense_ref}
    else:
        factors, refs = {k: v["factor"] for k, v in lib.items()}, {k: v["_ref"] for k, v in lib.items()}
    achieved = {}
    for c in cfgs:
        cfg = {"config": _cfg_name(c), **_options(c)}

        def run(lam, st=None, c=c):
            return case.variant(consts, c, lam, st)

        try:
            run(case.log_lam(None))
            if not achieved:  # the stats build is one more compile: once per variant
                achieved = {k: sparsity(case.counts(run, f)) for k, f in factors.items()}
        except _BUILD_ERRORS as e:
            cfg["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["configs"].append(cfg)
            continue
        for key, f in factors.items():
            lam = case.log_lam(f)
            err = float((run(lam).float() - refs[key].float()).abs().max())
            cfg[key] = {"factor": f, "sparsity": achieved[key], "max_err_vs_library": err,
                        "us": us(lambda lam=lam, run=run: run(lam))}
        row["configs"].append(cfg)
    timed = [c for c in row["configs"] if "error" not in c]
    row["ok"] = bool(timed) and all(p["max_err_vs_library"] <= TOL[case.q.dtype] for c in timed
                                    for p in c.values() if isinstance(p, dict))
    if timed:
        at = "off" if kind == "dense" else "0.50"
        row["best"] = min(timed, key=lambda c: c[at]["us"])
        if kind == "skip":
            row["same_sparsity"] = all(abs(achieved[k] - lib[k]["sparsity"]) < 1e-12 for k in lib)
    return row


# ----------------------------------------------------------------------------------------------- sm_90 build
def sm90_report(table, dump_dir=None) -> dict:
    """Compile every variant × config (bf16, D=128, group 4, page 16) for sm_90 on this machine: ptxas registers /
    spills, shared memory, and from the TTGIR the pipelined (async) copies and the async_wait depths."""
    from skip_prefill_variants import _ptxas_usage
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    sig = {n: "*bf16" for n in ("Q", "CACHE", "O")}
    sig.update(O_PART="*fp32", LSE_PART="*fp32", SEQ_LENS="*i32", BLOCK_TABLES="*i32", LOG2_LAMBDA="*fp32",
               STATS="*i32")
    for n in ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ckv", "stride_cp",
              "stride_ch", "stride_bt", "stride_pt", "stride_ph", "stride_ps", "split_tiles"):
        sig[n] = "i32"
    sig["qk_scale"] = "fp32"
    names = _variant_kernel.arg_names  # what the JIT specialises at the benchmark's shapes: 16-divisible
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in ("split_tiles", "qk_scale")}
    rep = {}
    for name, (consts, cfgs, _) in table.items():
        for cf in cfgs:
            c = dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, PAGE_SIZE=16, BLOCK_N=DECODE_BLOCK_N, COLLECT_STATS=False,
                     SINGLE_SPLIT=False, DOT_PRECISION="tf32", **consts)
            full = {**sig, **{k: "constexpr" for k in c}}
            key = f"{name} {_cfg_name(cf)}"
            try:
                k = triton.compile(ASTSource(_variant_kernel, full, c, attrs), target=GPUTarget("cuda", 90, 32),
                                   options=_options(cf))
            except _BUILD_ERRORS as e:
                rep[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            ttgir = k.asm["ttgir"]
            if dump_dir:
                with open(os.path.join(dump_dir, f"{name}_{_cfg_name(cf)}.ttgir"), "w") as fh:
                    fh.write(ttgir)
            rep[key] = _ptxas_usage(ptxas, k.asm["ptx"], k.metadata.name) | {
                "shared_bytes": k.metadata.shared,
                "async_copies": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
                "async_wait_num": sorted({int(x) for x in re.findall(r"async_wait .*?\{num = (\d+)", ttgir)}),
                "plain_loads": len(re.findall(r"\btt\.load\b", ttgir)),
                "loops": len(re.findall(r"\bscf\.for\b", ttgir)),
            }
            print(f"  {key:<26}: {rep[key]}", flush=True)
    return rep


# ----------------------------------------------------------------------------------------------- report
def _lib_line(res) -> str:
    s = res["library_skip"]
    return (f"{res['kv_len']} b{res['batch']}: library dense {res['library_dense_us']:.1f} us; library skip "
            + ", ".join(f"{k} {v['us']:.1f} us ({v['sparsity']:.1%})" for k, v in s.items()))


_CELL = 42  # characters of one (µs, TB/s, sparsity, × dense, × library) cell


def _cells(points, res, is_dense) -> str:
    out = ""
    dense, lib = res["library_dense_us"], res["library_skip"]
    for k in ("off", "0.50"):
        if k not in points:
            out += " " * _CELL
            continue
        pt = points[k]
        base = dense if is_dense else lib[k]["us"]
        tbps = res["bytes"] / pt["us"] * 1e-6
        out += f" {pt['us']:>9.1f} {tbps:>5.2f} {pt['sparsity']:>7.1%} {dense / pt['us']:>7.3f}x {base / pt['us']:>7.3f}x"
    return out


def _var_line(r, res) -> str:
    if "best" not in r:
        why = r.get("skipped") or [c.get("error") for c in r.get("configs", [])]
        return f"  {r['variant']:<20} not timed: {why}"
    b = r["best"]
    flag = "" if r["ok"] and r.get("same_sparsity", True) else "  [CHECK FAILED]"
    cfg = b["config"]
    return f"  {r['variant']:<20}{cfg:<6}" + _cells(b, res, r["kind"] == "dense") + flag


def table_text(result) -> str:
    """Per case: µs, TB/s (dense bytes / time), sparsity, × library dense, × library skip (dense rows: × library
    dense) at λ off and ≈50%; then every config of every variant at ≈50% (dense: off)."""
    head = f"{'us':>10} {'TB/s':>5} {'spars':>7} {'xdense':>8} {'xlib':>8}"
    lines = []
    for res in result["cases"]:
        lib = res["library_skip"]
        lines.append(f"kv {res['kv_len']} batch {res['batch']}  split_tiles {res['split_tiles']}  "
                     f"factor {lib['0.50']['factor']:.4g}")
        lines.append(f"  {'':<26}{'λ off':^{_CELL}}{'≈50%':^{_CELL}}")
        lines.append(f"  {'kernel':<20}{'cfg':<6}{head}{head}")
        dense_pt = {"off": {"us": res["library_dense_us"], "sparsity": 0.0}}
        lines.append(f"  {'library dense':<20}{'auto':<6}" + _cells(dense_pt, res, True))
        lines.append(f"  {'library skip':<20}{'auto':<6}" + _cells(lib, res, False))
        for r in res["variants"]:
            lines.append(_var_line(r, res))
        lines.append("  sweep (µs at ≈50%, dense copies at λ off): " + "; ".join(
            f"{r['variant']} " + " ".join(
                f"{c['config']}="
                + (f"{c['0.50' if r['kind'] == 'skip' else 'off']['us']:.0f}" if "error" not in c else "err")
                for c in r["configs"]) for r in res["variants"] if "configs" in r))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None, help="kv_len:batch pairs (default 8192:64 32768:16 131072:1)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="--cpu-smoke dtype")
    ap.add_argument("--sm90-report", action="store_true", help="CPU: compile for sm_90, print ptxas regs/spills, exit")
    ap.add_argument("--dump-ttgir", default=None, metavar="DIR", help="--sm90-report: also write each TTGIR here")
    ap.add_argument("--split-sweep", nargs="+", type=float, default=None, metavar="SCALE",
                    help="also time the library builds at these multiples of the skip split length (e.g. 0.5 0.75 1.5 2)")
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
        if args.dump_ttgir:
            os.makedirs(args.dump_ttgir, exist_ok=True)
        rep = sm90_report(table, args.dump_ttgir)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rep, fh, indent=1)
            print(f"wrote {args.out}")
        return 0
    cases = CASES
    if args.cases:
        try:
            cases = tuple((int(a), int(b)) for a, b in (c.split(":") for c in args.cases))
        except ValueError as e:
            raise SystemExit(f"--cases: expected kv_len:batch pairs such as 8192:64, got {args.cases}") from e
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim, args.block_n = 8, 2, 64, 16
        args.check_kv, args.search_steps = [301, 77, 150], 6
        cases = ((300, 2),)
        table = {k: (c, cfgs[:1], kind) for k, (c, cfgs, kind) in table.items()}  # the interpreter ignores configs
        dtype = getattr(torch, args.dtype)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or with --cpu-smoke")
        args.heads, args.kv_heads, args.head_dim, args.block_n = 32, 8, 128, DECODE_BLOCK_N
        args.check_kv, args.search_steps = [1001, 77, 4099], 12
        dtype = torch.bfloat16
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    gpu, out_path = result_path("skip_decode_variants", device, args.cpu_smoke, args.out)
    result = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "timing": "CUDA-graph replay median (attention_kernels.graph_timer)",
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": str(dtype).replace("torch.", ""), "block_n": args.block_n, "page_size": 16}}
    t0 = time.time()
    result["check_small"] = check_small(args, device, dtype, table)
    print("small check:", json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.endswith("counts")}
                                      for k, v in result["check_small"]["variants"].items()}), flush=True)
    bench = graph_timer(device)
    result["cases"] = [time_case(n, b, args, device, dtype, table, bench, result["check_small"]) for n, b in cases]
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
