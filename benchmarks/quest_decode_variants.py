"""Experiment: Quest per-query-head decode ≥ 5× dense at 128K batch 16 (issue #9). Not a library change: the
variants are kernel copies inside this file with constexpr knobs, each checked before it is timed.

The step the backend runs (`backends.page_select.page_sparse_step(per_query_head=True)`) is scores -> top-k ->
attention. H100, 128K, b16, 2K budget, page 16 (benchmarks/results/quest_decode_h100.json): 608.3 µs = select
420.8 (scores + top-k) + attention 204.6; best dense 2752.6 µs, so 5× needs <= 550 µs. Floors at b16: the
min/max metadata is 16 × 8192 pages × 8 Hkv × 128 × 2 × 2 B = 268 MB (~90 µs at 3 TB/s); per-query-head K/V is
16 × 32 heads × 2048 tokens × 128 × 2 × 2 B = 537 MB (~180 µs) unless a group's heads share pages.

Variants
  scores: raw bounds S [N, H, P] fp32 from the paged min/max cache (the library's kernel 1, `_launch_scores`,
  already reads every min/max entry once per GQA group: idea (a) is in place; since session 6 the per-query-head
  launch skips the softmax partials (`partials=False`), and runs one tile shape):
    lib_scores   the library kernel as the library launches it
    dot          copy without the partials; BLOCK_P x num_warps x num_stages swept, and programs per
                 (decode, KV head): "lib" (~1024 programs in all), "x4" (~4096) or "all" (one chunk each)
    fma          no tensor cores: per query head a broadcast multiply-add and a row sum (no padding to 16 rows)
  top-k (pages [N, H, k] from S; ties to the lower page; -1 pads rows with fewer than k ranked pages):
    lib_sort     the library's per-chunk bitonic sorts of int64 keys + merge rounds (`_group_reduce_kernel` RAW,
                 `_top_keys_kernel`): the "two-stage" top-k (per-chunk top-k, then merge), best first
    torch_f32    torch.topk on the masked fp32 scores (ties NOT to the lower page: timed for reference only)
    torch_i64    torch.topk on the library's int64 keys (ordered score bits | page): exact
    bisect       one program per row holds the row in registers: the k-th largest score by 32 bisection rounds
                 on the order-preserving int32 image of the fp32 bits (count >= mid), then every page above it
                 and the lowest pages equal to it, compacted in page order by a prefix sum (no sort at all)
    bisect_sorted  bisect, then the k selected sorted best first (the library's output order)
  attention (one page list per query head, the current page added by the kernel):
    lib_attn     `page_sparse_decode` (grid sequence-fastest: a group's 4 programs are 16 launch slots apart)
    heads_adjacent  copy with the list axis fastest: the 4 query heads of one KV head are adjacent programs
                 (L2 reuse of the pages they share; random inputs share ~10% of them)
  steps: lib_step (the backend's step as the library now runs it), sort_path (session 4's: library scores,
  lib_sort, lib_attn), lib_scores_bisect_sorted (library scores + bisect_sorted: the library change), and the
  fastest checked scores config + bisect(_sorted) + each attention.

Checks first (small odd shapes, several sequences, page 16 and 8): scores vs the float64 bound; every top-k
variant vs a stable-sort reference on the same S (exact page sets; tie-heavy data whose bounds are exact in
bf16/fp32, and random data); every composed step vs `sparse.quest.quest_selection` semantics on the float64
bound (exact on the tie-heavy data) and vs float64 attention over its pages. Only variants that pass are timed
(torch_f32 is timed and flagged: it fails the tie check by design).

    . benchmarks/gpu_env.sh && python benchmarks/quest_decode_variants.py      # H100, ~2-3 min
    python benchmarks/quest_decode_variants.py --cpu-smoke [--dtype float16]  # CPU interpreter, tiny shapes
JSON: benchmarks/results/quest_decode_variants_<gpu>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the Triton import: kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_decode import BLOCK, dense_sdpa_us, graph_us, make_cache, minmax_views  # noqa: E402

from sparse_llm.backends.page_select import page_sparse_step  # noqa: E402
from sparse_llm.kernels.decode import paged_decode  # noqa: E402
from sparse_llm.kernels.geometry import cdiv, decode_split_tiles, next_pow2, num_sms  # noqa: E402
from sparse_llm.kernels.page_scores import (  # noqa: E402
    FINAL_MID_FACTOR,
    _compute_dtype,
    _group_reduce_kernel,
    _launch_scores,
    _page_keys,
    _programs_per_row,
    _ranked_pages,
    _reduce_args,
    _top_keys_kernel,
    select_top_pages,
)
from sparse_llm.kernels.page_sparse_decode import (  # noqa: E402
    LOG2_E,
    _merge_kernel,
    page_sparse_decode,
    page_sparse_decode_reference,
)
from sparse_llm.sparse.quest import page_scores, quest_selection  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- scores
@triton.jit(do_not_specialize=["max_pages", "page_size"])  # one build for the check and the timed shapes
def _scores_variant_kernel(
    Q, MM, BT, LENS, S,
    stride_qn, stride_qh, stride_mb, stride_mp, stride_mk, stride_mh, stride_bt, stride_sn, stride_sh,
    max_pages, page_size,
    GROUP: tl.constexpr, PPB: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    HKV: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr, ALL_KV: tl.constexpr,
):
    """The library's `_scores_kernel` (scale 1, raw bounds) without the softmax partials. grid = (N, Hkv or 1,
    programs per row); program z scores chunks z, z + grid[2], ... of BLOCK_P pages up to the last ranked one.
    FMA: CUDA-core multiply-add per query head instead of two tensor-core dots padded to 16 rows.
    ALL_KV (grid (N, 1, ...)): one program scores a chunk for every KV head in turn, so consecutive loads cover a
    page's whole min/max row (Hkv x D contiguous: 2 KB runs at Hkv 8, D 128, bf16) instead of 256 B pieces."""
    n = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    n_ranked = _ranked_pages(LENS, n, page_size)
    live = tl.cdiv(n_ranked, BLOCK_P)
    q_row = Q + n.to(tl.int64) * stride_qn
    s_row = S + n.to(tl.int64) * stride_sn
    if not ALL_KV:  # the group's queries once, as the library does
        q_pos, q_neg = _group_q(q_row, tl.program_id(1), stride_qh, GROUP, ROWS, HEAD_DIM, COMPUTE)
    for chunk in range(tl.program_id(2), live, tl.num_programs(2)):
        pages = chunk * BLOCK_P + offs_p
        other = pages < n_ranked
        blk = tl.load(BT + n.to(tl.int64) * stride_bt + pages // PPB, mask=other, other=0).to(tl.int64)
        if ALL_KV:
            for kvh in range(HKV):
                q_pos, q_neg = _group_q(q_row, kvh, stride_qh, GROUP, ROWS, HEAD_DIM, COMPUTE)  # L1/L2 hits
                _score_chunk(q_pos, q_neg, q_row, MM, s_row, blk, pages, other, kvh, stride_qh, stride_mb, stride_mp,
                             stride_mk, stride_mh, stride_sh, max_pages, GROUP, PPB, ROWS, HEAD_DIM, COMPUTE,
                             DOT_PRECISION, FMA)
        else:
            _score_chunk(q_pos, q_neg, q_row, MM, s_row, blk, pages, other, tl.program_id(1), stride_qh, stride_mb,
                         stride_mp, stride_mk, stride_mh, stride_sh, max_pages, GROUP, PPB, ROWS, HEAD_DIM, COMPUTE,
                         DOT_PRECISION, FMA)


@triton.jit
def _group_q(q_row, kvh, stride_qh, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
             COMPUTE: tl.constexpr):
    """(max(q, 0), min(q, 0)) of KV head kvh's query heads, [ROWS, D] with rows past GROUP zero."""
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_row + (kvh * GROUP + rows)[:, None] * stride_qh + offs_d[None, :], mask=(rows < GROUP)[:, None],
                other=0.0).to(tl.float32)
    return tl.maximum(q, 0.0).to(COMPUTE), tl.minimum(q, 0.0).to(COMPUTE)


@triton.jit
def _score_chunk(q_pos, q_neg, q_row, MM, s_row, blk, pages, other, kvh, stride_qh, stride_mb, stride_mp, stride_mk,
                 stride_mh, stride_sh, max_pages, GROUP: tl.constexpr, PPB: tl.constexpr, ROWS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr):
    """S rows of KV head kvh's query heads for one chunk of pages (blk: their blocks; other: ranked)."""
    offs_d = tl.arange(0, HEAD_DIM)
    base = MM + blk * stride_mb + (pages % PPB) * stride_mp + kvh * stride_mh
    lo = tl.load(base[:, None] + offs_d[None, :], mask=other[:, None], other=0.0)
    hi = tl.load(base[:, None] + stride_mk + offs_d[None, :], mask=other[:, None], other=0.0)
    if FMA:
        lo32 = lo.to(tl.float32)
        hi32 = hi.to(tl.float32)
        for g in tl.static_range(GROUP):
            qg = tl.load(q_row + (kvh * GROUP + g) * stride_qh + offs_d).to(tl.float32)
            s = tl.sum(hi32 * tl.maximum(qg, 0.0)[None, :] + lo32 * tl.minimum(qg, 0.0)[None, :], 1)
            s = tl.where(other, s, float("-inf"))
            tl.store(s_row + (kvh * GROUP + g) * stride_sh + pages, s, mask=pages < max_pages)
    else:
        rows = tl.arange(0, ROWS)
        row_ok = rows < GROUP
        s = tl.dot(q_pos, tl.trans(hi.to(COMPUTE)), input_precision=DOT_PRECISION)
        s = tl.dot(q_neg, tl.trans(lo.to(COMPUTE)), s, input_precision=DOT_PRECISION)
        s = tl.where(other[None, :], s, float("-inf"))  # [ROWS, BLOCK_P]
        tl.store(s_row + (kvh * GROUP + rows)[:, None] * stride_sh + pages[None, :], s,
                 mask=row_ok[:, None] & (pages < max_pages)[None, :])


PPR_CAPS = {"lib": 1024, "x4": 4096, "all": None}  # programs in all before programs loop over chunks


def scores_variant(q, lo, hi, tables, lens, page_size, max_pages, cfg, out):
    """Raw bounds into out [N, H, max_pages] (entries past a row's ranked pages unspecified, as in the library).
    cfg = (kind "dot" | "fma" | "allkv" (dot, ALL_KV), BLOCK_P, num_warps, num_stages, programs-per-row mode)."""
    kind, block_p, warps, stages, ppr = cfg
    n, h, d = q.shape
    nb, ppb, hkv, _ = lo.shape
    chunks = triton.cdiv(max_pages, block_p)
    cap = PPR_CAPS[ppr]
    rows = n if kind == "allkv" else n * hkv
    per_row = chunks if cap is None else max(1, min(chunks, triton.cdiv(cap, rows)))
    compute, precision = _compute_dtype(lo)
    opts = {} if INTERPRET else {"num_warps": warps, "num_stages": stages}
    _scores_variant_kernel[(n, 1 if kind == "allkv" else hkv, per_row)](
        q, lo, tables, lens, out,
        q.stride(0), q.stride(1), lo.stride(0), lo.stride(1), (hi.data_ptr() - lo.data_ptr()) // lo.element_size(),
        lo.stride(2), tables.stride(0), out.stride(0), out.stride(1), max_pages, page_size,
        GROUP=h // hkv, PPB=ppb, ROWS=max(16, next_pow2(h // hkv)), BLOCK_P=block_p, HEAD_DIM=d, HKV=hkv,
        COMPUTE=compute, DOT_PRECISION=precision, FMA=kind == "fma", ALL_KV=kind == "allkv", **opts,
    )
    return out


def scores_configs(smoke: bool) -> list[tuple]:
    if smoke:
        return [("dot", 32, 4, 1, "lib"), ("dot", 16, 4, 1, "all"), ("fma", 16, 4, 1, "x4"), ("allkv", 16, 4, 1, "lib")]
    cfgs = [("dot", bp, w, s, ppr) for bp in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
            for ppr in ("lib", "x4", "all")]
    cfgs += [("allkv", bp, w, s, ppr) for bp in (32, 64) for w in (4, 8) for s in (2, 3) for ppr in ("lib", "all")]
    cfgs += [("fma", bp, w, 1, ppr) for bp in (32, 64) for w in (4, 8) for ppr in ("lib", "all")]  # not pipelined
    return cfgs


def first_of_kinds(args) -> list[tuple]:
    """One config per kind (the GPU check's page-8 case: PPB 2 builds of every config would double compile time)."""
    seen = {}
    for c in scores_configs(args.cpu_smoke):
        seen.setdefault(c[0], c)
    return list(seen.values())


def cfg_name(cfg) -> str:
    kind, bp, w, s, ppr = cfg
    return f"{kind}_p{bp}_w{w}_s{s}_{ppr}"


# ----------------------------------------------------------------------------------------------- top-k
@triton.jit
def _bisect_topk_kernel(
    S, LENS, PAGES, stride_sn, stride_sh, stride_pn, stride_ph, page_size, k,
    BLOCK: tl.constexpr, KP: tl.constexpr, SORTED: tl.constexpr,
):
    """grid = (N, lists). The row's top-k ranked pages without sorting: o = the int32 image of the fp32 bits
    that orders like the floats (negative floats' magnitude bits flipped; unranked pages -2^31, below every
    real score); T = the k-th largest o by bisection (count(o >= mid) >= k keeps mid); then the pages with
    o > T and the lowest pages with o == T (ties go to the lower page), stored in page order at their prefix-sum
    slots; -1 in slots past min(k, ranked pages). SORTED: then reorder the k slots best first."""
    n = tl.program_id(0)
    lst = tl.program_id(1)
    n_ranked = _ranked_pages(LENS, n, page_size)
    offs = tl.arange(0, BLOCK)
    ranked = offs < n_ranked
    s_row = S + n.to(tl.int64) * stride_sn + lst * stride_sh
    s = tl.load(s_row + offs, mask=ranked, other=0.0)
    bits = s.to(tl.int32, bitcast=True)
    o = tl.where(bits >= 0, bits, bits ^ 2147483647)
    o = tl.where(ranked, o, -2147483648)
    k_eff = tl.minimum(n_ranked, k)
    lo = tl.zeros([], tl.int64) - 2147483647  # count(o >= lo) >= k_eff holds throughout
    hi = tl.zeros([], tl.int64) + 2147483647
    for _ in range(32):  # the interval [-2^31 + 1, 2^31 - 1] halves 32 times down to one value
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((o >= mid.to(tl.int32)).to(tl.int32), 0)
        take = c >= k_eff
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    t = lo.to(tl.int32)
    above = o > t
    need = k_eff - tl.sum(above.to(tl.int32), 0)
    tie = o == t
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
    slot = tl.cumsum(sel.to(tl.int32), 0) - 1
    p_row = PAGES + n.to(tl.int64) * stride_pn + lst * stride_ph
    tl.store(p_row + slot, offs, mask=sel)
    ko = tl.arange(0, KP)
    tl.store(p_row + ko, tl.full([KP], -1, tl.int32), mask=(ko >= k_eff) & (ko < k))
    if SORTED:
        tl.debug_barrier()  # the slots written above by other threads of this program
        filled = ko < k_eff
        pg = tl.load(p_row + ko, mask=filled, other=0)
        keys = _page_keys(tl.load(s_row + pg, mask=filled, other=0.0), pg, filled)
        keys = tl.sort(keys, 0, descending=True)
        page = tl.where(keys > 0, 2147483647 - (keys & 2147483647), -1).to(tl.int32)
        tl.debug_barrier()
        tl.store(p_row + ko, page, mask=ko < k)


def topk_bisect(s, lens, page_size, max_pages, k, out, warps=8, sorted_=False):
    n, lists = s.shape[:2]
    opts = {} if INTERPRET else {"num_warps": warps}
    _bisect_topk_kernel[(n, lists)](
        s, lens, out, s.stride(0), s.stride(1), out.stride(0), out.stride(1), page_size, k,
        BLOCK=max(2, next_pow2(max_pages)), KP=max(2, next_pow2(k)), SORTED=sorted_, **opts,
    )
    return out


def topk_lib_sort(s, lens, page_size, max_pages, k, out, dummy_parts):
    """The tail of `select_top_pages(per_query_head=True)` on given scores S (its RAW reduce reads no softmax
    partials: the given tensors only hold their place)."""
    n, lists = s.shape[:2]
    m_part, l_part = dummy_parts
    interp = INTERPRET
    kc = next_pow2(k)
    block_r = max(64 if interp else 1024, 2 * kc)
    block_t = max(16 if interp else 4096, 2 * kc)
    meta = _reduce_args(s, lists)
    chunks = triton.cdiv(max_pages, block_r)
    n_cand = chunks * kc
    cand = torch.empty(n * lists, n_cand, dtype=torch.int64, device=s.device)
    _group_reduce_kernel[(n, lists, _programs_per_row(chunks, n * lists))](
        s, m_part, l_part, lens, s, cand,
        s.stride(0), s.stride(1), m_part.stride(0), m_part.stride(1), 0, 0, cand.stride(0),
        max_pages, chunks, page_size, BLOCK_P=block_r, KC=kc, WRITE_SCORES=False, RAW=True, num_warps=8, **meta,
    )
    flat = out.view(n * lists, k)
    while True:
        blocks = triton.cdiv(n_cand, block_t)
        final = blocks == 1
        nxt = cand if final else torch.empty(n * lists, blocks * kc, dtype=torch.int64, device=s.device)
        block = block_t if not final else max(2, next_pow2(n_cand))
        _top_keys_kernel[(n * lists, blocks)](
            cand, nxt, flat, cand.stride(0), nxt.stride(0), flat.stride(0), n_cand, k,
            BLOCK=block, KC=kc, MID=min(block, FINAL_MID_FACTOR * kc), FINAL=final, num_warps=8,
        )
        if final:
            return out
        cand, n_cand = nxt, blocks * kc


def _ranked_mask(lens, page_size, max_pages, device):
    n_ranked = ((lens.long() + page_size - 1) // page_size - 1).clamp(min=0)
    return torch.arange(max_pages, device=device)[None, None, :] < n_ranked[:, None, None], n_ranked


def topk_torch_f32(s, lens, page_size, max_pages, k, out):
    """torch.topk on masked fp32 scores; -1 where a row has fewer than k ranked pages. Ties: torch's order."""
    ranked, _ = _ranked_mask(lens, page_size, max_pages, s.device)
    idx = torch.topk(s.masked_fill(~ranked, float("-inf")), k, -1, sorted=False).indices
    valid = torch.gather(ranked.expand_as(s), -1, idx)  # unsorted: padding is where an unranked page was picked
    out.copy_(torch.where(valid, idx, -1).to(torch.int32))
    return out


def topk_torch_i64(s, lens, page_size, max_pages, k, out):
    """torch.topk on the library's int64 sort keys ((ordered score bits + 2^31) << 31 | (2^31 - 1 - page),
    0 for unranked pages): exact, ties to the lower page."""
    ranked, _ = _ranked_mask(lens, page_size, max_pages, s.device)
    bits = s.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 2147483647).long() + 2147483648
    pages = torch.arange(max_pages, device=s.device)
    keys = torch.where(ranked, (ordered << 31) | (2147483647 - pages), 0)
    top = torch.topk(keys, k, -1, sorted=False).values
    out.copy_(torch.where(top > 0, 2147483647 - (top & 2147483647), -1).to(torch.int32))
    return out


TOPK = ("lib_sort", "torch_f32", "torch_i64", "bisect", "bisect_sorted")


def run_topk(name, s, lens, page_size, max_pages, k, out, dummy_parts, warps=8):
    if name == "lib_sort":
        return topk_lib_sort(s, lens, page_size, max_pages, k, out, dummy_parts)
    if name == "torch_f32":
        return topk_torch_f32(s, lens, page_size, max_pages, k, out)
    if name == "torch_i64":
        return topk_torch_i64(s, lens, page_size, max_pages, k, out)
    return topk_bisect(s, lens, page_size, max_pages, k, out, warps, sorted_=name == "bisect_sorted")


def bisect_warps(smoke: bool) -> tuple:
    """8 warps: 32 row entries per thread at 8192 pages (110-150 registers on sm_90); 16: 16 (74-110); 4 warps
    (64 per thread, ~165 registers) is left out."""
    return (4,) if smoke else (8, 16)


# ----------------------------------------------------------------------------------------------- attention
@triton.jit
def _attn_variant_kernel(
    Q, CACHE, PAGES, BT, LENS, O, O_PART, LSE_PART,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_ckv, stride_cp, stride_ch,
    stride_pn, stride_ph, stride_bt,
    stride_xn, stride_xh, stride_xs,
    num_listed, split_tiles, qk_scale,
    GROUP: tl.constexpr, LISTS_PER_KV: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LIST_FASTEST: tl.constexpr,
):
    """The library's `_page_decode_kernel`; LIST_FASTEST: grid (lists, N, splits), so the lists of one KV head
    (its query heads, per-query-head mode) are adjacent programs."""
    if LIST_FASTEST:
        kvh = tl.program_id(0)
        n = tl.program_id(1)
    else:
        n = tl.program_id(0)
        kvh = tl.program_id(1)
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
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
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


def attn_heads_adjacent(q, cache_kv, pages, tables, lens, page_size, scale, out, block_n=64):
    """`page_sparse_decode` (same split rule, same merge) with the list axis first in the grid."""
    b, h, d = q.shape
    bs, hkv = cache_kv.shape[2], cache_kv.shape[3]
    num_lists, num_listed = pages.shape[1], pages.shape[2]
    n_tiles = cdiv(num_listed + 1, block_n // page_size)
    split_tiles = decode_split_tiles(n_tiles * block_n, b, num_lists, num_sms(q.device), block_n)
    num_splits = cdiv(n_tiles, split_tiles)
    single = num_splits == 1
    o_part = torch.empty(b, h, 1 if single else num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, 1 if single else num_splits, dtype=torch.float32, device=q.device)
    group = h // num_lists
    opts = {"num_warps": 4} if INTERPRET else {"num_warps": 4, "num_stages": 2}
    _attn_variant_kernel[(num_lists, b, num_splits)](
        q, cache_kv, pages, tables, lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache_kv.stride(0), cache_kv.stride(1), cache_kv.stride(2), cache_kv.stride(3),
        pages.stride(0), pages.stride(1), tables.stride(0),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        num_listed, split_tiles, scale * LOG2_E,
        GROUP=group, LISTS_PER_KV=num_lists // hkv, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=d, BLOCK_SIZE=bs,
        PAGE_SIZE=page_size, BLOCK_N=block_n, SINGLE_SPLIT=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", LIST_FASTEST=True, **opts,
    )
    if not single:
        _merge_kernel[(b, h)](
            o_part, lse_part, out, lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
            out.stride(0), out.stride(1), num_splits, HEAD_DIM=d, BLOCK_S=max(2, next_pow2(num_splits)),
        )
    return out


ATTN = ("lib_attn", "heads_adjacent")


def run_attn(name, q, cache, pages, tables, lens, page_size, scale, out):
    if name == "lib_attn":
        return page_sparse_decode(q, cache, pages, tables, lens, page_size, scale, out=out)
    return attn_heads_adjacent(q, cache, pages, tables, lens, page_size, scale, out)


# ----------------------------------------------------------------------------------------------- inputs
class Case:
    """b sequences (lens) in a shuffled paged cache (16-token blocks), bf16 (GPU) min/max, one decode query each.
    tie_heavy: keys in {-1, -.5, 0, .5, 1}, queries in {-1, 0, 1}: every bound is exact in bf16 and fp32 (sums
    of multiples of 1/2) and most pages tie, so the page sets must match the float64 reference exactly."""

    def __init__(self, lens, heads, kv_heads, head_dim, page_size, k, dtype, device, tie_heavy=False, seed=0):
        b, n = len(lens), max(lens)
        self.cache, self.tables = make_cache(b, n, kv_heads, head_dim, dtype, device, seed=seed)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        if tie_heavy:
            self.cache.copy_(torch.randint(-2, 3, self.cache.shape, device=device, generator=g).to(dtype) / 2)
            self.q = torch.randint(-1, 2, (b, heads, head_dim), device=device, generator=g).to(dtype)
        else:
            self.q = torch.randn(b, heads, head_dim, device=device, generator=g).to(dtype)
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.page_size, self.max_pages = page_size, -(-n // page_size)
        self.k = min(k, self.max_pages - 1)
        self.scale = head_dim ** -0.5
        self.lo, self.hi = minmax_views(self.cache, page_size, self.cache.dtype)
        self.out = torch.empty_like(self.q)
        self.s = torch.empty(b, heads, self.max_pages, dtype=torch.float32, device=device)
        self.pages = torch.empty(b, heads, self.k, dtype=torch.int32, device=device)
        chunks = triton.cdiv(self.max_pages, 32 if INTERPRET else 128)
        self.dummy_parts = (torch.zeros(b, heads, chunks, device=device), torch.zeros(b, heads, chunks, device=device))

    def bound64(self) -> torch.Tensor:
        """float64 [N, H, P]: Σ_d max(q_d lo_d, q_d hi_d) (`sparse.quest.page_scores`) on the cached min/max."""
        ppb = BLOCK // self.page_size
        p = torch.arange(self.max_pages, device=self.q.device)
        blk = self.tables.long()[:, p // ppb]
        return page_scores(self.q.double(), self.lo[blk, p % ppb].double(), self.hi[blk, p % ppb].double())

    def lib_scores(self):
        return _launch_scores(self.q, self.lo, self.hi, self.tables, self.lens, self.page_size, self.max_pages, 1.0,
                              partials=False)[0]  # as select_top_pages(per_query_head=True) launches it

    def lib_step(self):
        return page_sparse_step(self.q, self.cache, self.lo, self.hi, self.tables, self.lens, self.page_size,
                                self.max_pages, self.q.shape[2], self.k, self.scale, out=self.out,
                                per_query_head=True)

    def lib_select(self):
        return select_top_pages(self.q, self.lo, self.hi, self.tables, self.lens, self.page_size, self.max_pages,
                                self.scale, self.k, True)

    def scores(self, cfg):
        if cfg == "lib":
            return self.lib_scores()
        return scores_variant(self.q, self.lo, self.hi, self.tables, self.lens, self.page_size, self.max_pages, cfg,
                              self.s)

    def topk(self, name, s, warps=8):
        return run_topk(name, s, self.lens, self.page_size, self.max_pages, self.k, self.pages, self.dummy_parts,
                        warps)

    def attn(self, name, pages):
        return run_attn(name, self.q, self.cache, pages, self.tables, self.lens, self.page_size, self.scale, self.out)

    def step(self, cfg, topk_name, warps, attn_name):
        s = self.scores(cfg)
        return self.attn(attn_name, self.topk(topk_name, s, warps)), self.pages


def reference_mask(scores, lens, page_size, k) -> torch.Tensor:
    """bool [N, L, P]: per row the min(k, ranked) best ranked pages of `scores`, ties to the lower page (a stable
    descending sort): `sparse.quest.quest_selection`'s pages without the current one, its ties made explicit."""
    n, lists, p = scores.shape
    ranked, n_ranked = _ranked_mask(lens, page_size, p, scores.device)
    masked = scores.double().masked_fill(~ranked, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    take = torch.arange(p, device=scores.device)[None, None, :] < n_ranked.clamp(max=k)[:, None, None]
    return torch.zeros(n, lists, p, dtype=torch.bool, device=scores.device).scatter_(-1, order, take.expand_as(order))


def pages_mask(pages, max_pages) -> tuple[torch.Tensor, bool]:
    """(bool [N, L, P] of the listed pages, well_formed: no duplicates, -1 only after the listed pages or in
    place of them; counted by the caller against the reference's size)."""
    n, lists, k = pages.shape
    listed = pages >= 0
    got = torch.zeros(n, lists, max_pages + 1, dtype=torch.bool, device=pages.device)
    got.scatter_(-1, torch.where(listed, pages, max_pages).long(), True)
    distinct = bool((got[..., :max_pages].sum(-1) == listed.sum(-1)).all())
    return got[..., :max_pages], distinct and bool((pages < max_pages).all())


def same_pages(pages, want) -> bool:
    got, ok = pages_mask(pages, want.shape[-1])
    return ok and bool(torch.equal(got, want))


# ----------------------------------------------------------------------------------------------- checks
def check(args, device, dtype) -> dict:
    """Every variant on small odd shapes (page 16 and 8, random and tie-heavy data) before any timing."""
    res = {"ok": True, "cases": []}
    verdict = {"scores": {}, "topk": {}, "attn": {}, "steps": {}}
    tol_out = 1e-4 if dtype == torch.float32 else 2e-2
    for page_size in (16, 8):
        for tie_heavy in (False, True):
            case = Case(args.check_lens, args.heads, args.kv_heads, args.head_dim, page_size, args.check_k, dtype,
                        device, tie_heavy, seed=page_size + tie_heavy)
            ranked, _ = _ranked_mask(case.lens, page_size, case.max_pages, device)
            rows = ranked.expand(-1, args.heads, -1)
            bound = case.bound64()
            span = float(bound[rows].abs().max()) if rows.any() else 1.0
            row = {"page_size": page_size, "tie_heavy": tie_heavy, "k": case.k, "max_pages": case.max_pages}
            # scores: vs the float64 bound (exactly, on the tie-heavy data)
            lib_s = case.lib_scores()
            lib_err = float((lib_s.double() - bound)[rows].abs().max())
            row["lib_scores_err"] = lib_err
            for cfg in scores_configs(args.cpu_smoke) if page_size == 16 or args.cpu_smoke else first_of_kinds(args):
                case.s.fill_(float("nan"))  # a program that skips its rows must not pass on stale values
                s = case.scores(cfg).clone()
                err = float((s.double() - bound)[rows].abs().max())
                ok = err == 0.0 if tie_heavy else err <= 1e-4 * span  # fp32 sums in another order
                verdict["scores"][cfg_name(cfg)] = verdict["scores"].get(cfg_name(cfg), True) and ok
                row.setdefault("scores_err", {})[cfg_name(cfg)] = err
            # top-k on the library's S: exact page sets vs the stable-sort reference of the same values
            want = reference_mask(lib_s.masked_fill(~rows, 0.0), case.lens, page_size, case.k)
            for name in TOPK:
                warps = bisect_warps(args.cpu_smoke)[:1 if page_size != 16 else None]  # page 8: fewer builds
                for w in warps if name.startswith("bisect") else (8,):
                    key = name if not name.startswith("bisect") else f"{name}_w{w}"
                    case.pages.fill_(12345)
                    pages = case.topk(name, lib_s, w).clone()
                    ok = same_pages(pages, want)
                    if name in ("lib_sort", "bisect_sorted"):  # best first, as the library promises
                        sc = torch.gather(lib_s, -1, pages.clamp(min=0).long()).masked_fill(pages < 0, float("-inf"))
                        ok = ok and bool((sc[..., :-1] >= sc[..., 1:]).all())
                    row.setdefault("topk_same_pages", {})[key] = ok
                    verdict["topk"][key] = verdict["topk"].get(key, True) and ok
            # attention on the library's pages vs float64
            lib_pages = case.lib_select()
            ref = page_sparse_decode_reference(case.q, case.cache, lib_pages, case.tables, case.lens, page_size,
                                               case.scale)
            for name in ATTN:
                err = float((case.attn(name, lib_pages).double() - ref).abs().max())
                row.setdefault("attn_err", {})[name] = err
                verdict["attn"][name] = verdict["attn"].get(name, True) and err <= tol_out
            # composed steps: pages vs quest_selection semantics on the float64 bound, output vs float64
            want64 = reference_mask(bound.masked_fill(~rows, 0.0), case.lens, page_size, case.k)
            for key, (cfg, topk_name, w, attn_name) in step_table(args.cpu_smoke).items():
                out, pages = case.step(cfg, topk_name, w, attn_name)
                out = out.clone()
                same = same_pages(pages, want64)
                err = float((out.double() - page_sparse_decode_reference(
                    case.q, case.cache, pages, case.tables, case.lens, page_size, case.scale)).abs().max())
                # random data: fp32 sums of other order than float64 may flip near-ties; say how many pages
                agree = float((pages_mask(pages, case.max_pages)[0] & want64).sum() / want64.sum().clamp(min=1))
                ok = err <= tol_out and (same if tie_heavy else agree >= 0.99)
                row.setdefault("steps", {})[key] = {"same_pages_as_reference": same, "pages_shared": agree,
                                                    "max_abs_err_vs_float64": err, "ok": ok}
                verdict["steps"][key] = verdict["steps"].get(key, True) and ok
            if not tie_heavy:  # and the library's own pages vs quest_selection itself (current page included)
                n_pages = (case.lens.long() + page_size - 1) // page_size
                sel = quest_selection(bound, n_pages, case.k + 1, page_size)
                qs = torch.zeros(len(args.check_lens), args.heads, case.max_pages + case.k + 1, dtype=torch.bool,
                                 device=device).scatter_(-1, sel.block_indices.view(len(args.check_lens), args.heads,
                                                                                    -1).long(), True)
                qs = qs[..., :case.max_pages] & rows
                row["lib_pages_equal_quest_selection"] = same_pages(lib_pages, qs)
            res["cases"].append(row)
    res["verdict"] = verdict
    res["ok"] = all(all(v.values()) for part, v in verdict.items() if part != "topk") and all(
        ok for key, ok in verdict["topk"].items() if not key.startswith("torch_f32"))
    return res


def step_table(smoke: bool, best_cfg=None, best_warps=8) -> dict:
    """Composed steps checked (and timed, with the case's fastest scores config and bisect warps)."""
    cfg = best_cfg or (("dot", 32, 4, 1, "lib") if smoke else ("dot", 128, 4, 3, "lib"))
    return {
        # session 4's library step: the library scores kernel, the per-chunk sorts, the library attention
        "sort_path": ("lib", "lib_sort", 8, "lib_attn"),
        # the library scores kernel + bisect (what `select_top_pages(per_query_head=True)` runs with this change)
        "lib_scores_bisect_sorted": ("lib", "bisect_sorted", best_warps, "lib_attn"),
        "new_bisect": (cfg, "bisect", best_warps, "lib_attn"),
        "new_bisect_sorted": (cfg, "bisect_sorted", best_warps, "lib_attn"),
        "new_bisect_heads_adjacent": (cfg, "bisect", best_warps, "heads_adjacent"),
    }


# ----------------------------------------------------------------------------------------------- timing
def time_case(n, b, args, device, dtype, verdict) -> dict:
    case = Case([n] * b, args.heads, args.kv_heads, args.head_dim, args.page, args.budget // args.page - 1, dtype,
                device, seed=3)
    us = lambda fn: graph_us(fn, device, args.rep_ms)  # noqa: E731
    res = {"kv_len": n, "batch": b, "ranked_pages_k": case.k, "max_pages": case.max_pages,
           "minmax_bytes": b * case.max_pages * args.kv_heads * args.head_dim * 2 * case.lo.element_size(),
           "kv_bytes_per_query_head_lists": b * args.heads * (case.k + 1) * args.page * args.head_dim * 2
           * case.cache.element_size()}
    res["dense_ours_us"] = us(lambda: paged_decode(case.q, case.cache, case.lens, case.tables, n, case.scale,
                                                   out=case.out))
    res["dense_sdpa_us"] = dense_sdpa_us(case.q, case.cache, case.tables, n, case.scale, device, args.rep_ms)[0] \
        if device.type == "cuda" else float("nan")
    dense = min(res["dense_ours_us"], res["dense_sdpa_us"]) if device.type == "cuda" else res["dense_ours_us"]
    res["best_dense_us"] = dense
    lib = {"step_us": us(case.lib_step), "select_us": us(case.lib_select), "scores_us": us(case.lib_scores)}
    lib_pages = case.lib_select().clone()
    lib["attn_us"] = us(lambda: case.attn("lib_attn", lib_pages))
    lib["speedup_vs_best_dense"] = dense / lib["step_us"]
    res["lib"] = lib
    print(f"{n} b{b}: dense best {dense:.1f} us; lib step {lib['step_us']:.1f} = select {lib['select_us']:.1f} "
          f"(scores {lib['scores_us']:.1f}) + attention {lib['attn_us']:.1f} ({lib['speedup_vs_best_dense']:.2f}x)",
          flush=True)
    scores = {}
    for cfg in scores_configs(args.cpu_smoke):
        name = cfg_name(cfg)
        if not verdict["scores"].get(name):
            scores[name] = {"skipped": "check failed"}
            continue
        scores[name] = {"us": us(lambda cfg=cfg: case.scores(cfg))}
    res["scores"] = scores
    timed = {k: v["us"] for k, v in scores.items() if "us" in v}
    best_name = min(timed, key=timed.get)
    best_cfg = next(c for c in scores_configs(args.cpu_smoke) if cfg_name(c) == best_name)
    res["best_scores"] = {"config": best_name, "us": timed[best_name]}
    print(f"  scores: lib {lib['scores_us']:.1f} us; best {best_name} {timed[best_name]:.1f} us; " + ", ".join(
        f"{k} {v:.0f}" for k, v in sorted(timed.items(), key=lambda kv: kv[1])[:8]), flush=True)
    s = case.lib_scores().clone()
    want = reference_mask(s.masked_fill(~_ranked_mask(case.lens, args.page, case.max_pages, device)[0], 0.0),
                          case.lens, args.page, case.k)
    topk = {}
    for name in TOPK:
        for w in bisect_warps(args.cpu_smoke) if name.startswith("bisect") else (8,):
            key = name if not name.startswith("bisect") else f"{name}_w{w}"
            ok = verdict["topk"].get(key, False)
            if not ok and not key.startswith("torch_f32"):
                topk[key] = {"skipped": "check failed"}
                continue
            t = us(lambda name=name, w=w: case.topk(name, s, w))
            topk[key] = {"us": t, "same_pages_at_this_shape": same_pages(case.topk(name, s, w), want),
                         "tie_exact": ok}
    res["topk"] = topk
    bis = {k: v["us"] for k, v in topk.items() if k.startswith("bisect_w") and "us" in v}
    best_w = int(min(bis, key=bis.get).split("_w")[1]) if bis else 8
    print("  top-k: " + ", ".join(f"{k} {v['us']:.1f}" for k, v in topk.items() if "us" in v), flush=True)
    attn = {name: {"us": us(lambda name=name: case.attn(name, lib_pages))} for name in ATTN
            if verdict["attn"].get(name)}
    res["attn"] = attn
    print("  attention: " + ", ".join(f"{k} {v['us']:.1f}" for k, v in attn.items()), flush=True)
    steps = {}
    for key, (cfg, topk_name, w, attn_name) in step_table(args.cpu_smoke, best_cfg, best_w).items():
        if not verdict["steps"].get(key):
            steps[key] = {"skipped": "check failed"}
            continue
        t = us(lambda a=(cfg, topk_name, w, attn_name): case.step(*a))
        _, pages = case.step(cfg, topk_name, w, attn_name)
        steps[key] = {"scores": cfg if cfg == "lib" else cfg_name(cfg), "topk": f"{topk_name}_w{w}", "attn": attn_name,
                      "step_us": t,
                      "speedup_vs_best_dense": dense / t,
                      "same_pages_as_lib_step": same_pages(pages, pages_mask(lib_pages, case.max_pages)[0])}
        print(f"  step {key}: {t:.1f} us ({dense / t:.2f}x best dense; lib {lib['step_us']:.1f} us)", flush=True)
    res["steps"] = steps
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="--cpu-smoke dtype")
    ap.add_argument("--cases", nargs="+", default=["131072:16", "131072:1", "32768:16"], help="kv_len:batch")
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench rep time per measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.budget, args.page = 2048, 16
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim = 8, 2, 64
        args.check_lens, args.check_k = [301, 77, 17, 1], 5
        cases = [(300, 2)]
        args.budget = 96
        dtype = getattr(torch, args.dtype)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or with --cpu-smoke")
        args.heads, args.kv_heads, args.head_dim = 32, 8, 128
        args.check_lens, args.check_k = [4099, 1001, 77, 1], 127
        try:
            cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
        except ValueError as e:
            raise SystemExit(f"--cases: expected kv_len:batch pairs such as 131072:16, got {args.cases}") from e
        dtype = torch.bfloat16
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    gpu = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(device)
    slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    out_path = args.out or os.path.join("benchmarks", "results", f"quest_decode_variants_{slug}.json")
    result = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "timing": "CUDA-graph replay median (triton.testing.do_bench)",
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": str(dtype).replace("torch.", ""), "kv_block": BLOCK, "page_size": args.page,
                        "token_budget": args.budget}}
    t0 = time.time()
    result["check"] = check(args, device, dtype)
    print("check:", json.dumps({"ok": result["check"]["ok"], **result["check"]["verdict"]}), flush=True)
    result["cases"] = []
    if result["check"]["ok"]:
        for n, b in cases:
            result["cases"].append(time_case(n, b, args, device, dtype, result["check"]["verdict"]))
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out_path} ({result['seconds']} s)")
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
