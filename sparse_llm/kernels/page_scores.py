"""Group-reduced page scores from a paged key min/max cache, and the top pages per KV head (Triton).

Decode's critical path for RocketKV and Quest (GQA mode). For decode n, KV head h, page p (page p of
the sequence lives in block table[p // PPB], page slot p % PPB of the min/max cache):
    s[n, g, p] = scale * Σ_d max(q_gd lo_pd, q_gd hi_pd) = scale * (max(q_g, 0) · hi_p + min(q_g, 0) · lo_p)
for the group's query heads g (RocketKV zeroes q outside its top-r channels first: a zero channel adds 0),
over the "other" pages p < n_pages - 1 (the current page is always attended, so it is not ranked);
    score[n, h, p] = Σ_g softmax_p(s[n, g, :])[p]      (RocketKV's softmax + group reduce)
and the selection is the top-k pages of score per (n, h) (ties go to the lower page), plus the current page,
which the sparse decode kernel adds itself. Quest per query head (`select_top_pages(..., per_query_head=True)`)
runs the same kernels with every query head as its own group of one, ranking by its raw bound s (unscaled,
no softmax: `RAW`), so each query head gets its own top-k list.

Kernels (programs per (decode, KV head), each handling chunks of BLOCK_P pages, the whole GQA group at once,
so every min/max entry is read once per group):
  1. `_scores_kernel`: s for the chunk (two tensor-core dots, group rows padded to 16) and the chunk's
     per-head softmax partials (max, Σ exp).
  2. `_group_reduce_kernel`: merges the partials of all chunks into each head's (max, Σ exp), then computes
     the group-reduced score of its chunk and either stores it or sorts the chunk (tl.sort on int64 keys
     score bits | page) and keeps its best candidates.
  3. `_top_keys_kernel`: the best k of the candidates per (decode, KV head) in one or two sorting rounds.
Quest per query head replaces 2 and 3 by `_bisect_top_pages_kernel` (rows of up to BISECT_MAX_PAGES pages):
one program per (decode, query head) finds the k-th best bound by bisection on its bits, with no sort of the
row (H sorted rows cost ~4x the KV-head mode's Hkv; benchmarks/quest_decode_variants.py), then collects the pages
in a second pass over the row in pieces (benchmarks/quest_topk_variants.py: 143 -> 98 us at 128K b16).
Torch reference: `backends.rocket_select.group_page_scores` / `select_pages`; per query head
`sparse.quest.quest_selection`.

Cost tracks the real cache, not `max_pages`: a decode CUDA graph sizes `max_pages` from its max_model_len-wide
block tables, while a compacted sequence may hold far fewer pages. The grids stay shape-only (graph-safe, no
host sync), but each program loops over its chunks only up to the sequence's last ranked page (read from
seq_lens on the device): chunks past it read no KT entry, run no dot and no sort; the reduce merges only the
live chunks' partials and writes neutral results (0 scores / 0 keys) for the rest; candidate blocks of 0 keys
are passed on unsorted and the final sort covers only the width holding every nonzero key. The grids are
capped near PROGRAMS_PER_LAUNCH programs (programs loop over chunks), so idle programs cost few launch slots.
Results are bitwise those of tight tables (tests/test_page_scores_live_pages.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import next_pow2
from sparse_llm.kernels.page_force import force_pages_
from sparse_llm.kernels.tuning import interpreting

# Programs per launch along the page axis before programs loop over several chunks (`_programs_per_row`):
# ~8 per SM of an H100; small in the interpreter so that tests run the looping path.
PROGRAMS_PER_LAUNCH = 16 if interpreting() else 1024
# The final top-k sorts KC, FINAL_MID_FACTOR * KC or all candidates, the smallest holding every nonzero key.
FINAL_MID_FACTOR = 8
# Quest per query head: rows of up to this many pages take the bisection top-k (the row is held in registers;
# its 32 rounds scan the whole next_pow2(max_pages)-wide row, live pages or not); wider rows the sort path.
BISECT_MAX_PAGES = 16384
# Row entries per piece of the bisection's slot pass (`_bisect_top_pages_kernel`; benchmarks/quest_topk_variants.py
# times 1024 / 2048 / 4096).
BISECT_TAIL = 32 if interpreting() else 2048
# Launch shape of `_scores_kernel` (benchmarks/quest_select_sweep.py times the alternatives): up to this many
# programs per launch, one chunk each (more programs than PROGRAMS_PER_LAUNCH: 214 vs 221 us at 128K b16, page 8).
SCORE_PROGRAMS_PER_LAUNCH = 16 if interpreting() else 16384
SCORE_WARPS = 4
SCORE_STAGES: int | None = None  # None: Triton's default software pipelining depth


@triton.jit
def _scores_kernel(
    Q, MM, BT, LENS, S, M_PART, L_PART,
    stride_qn, stride_qh,
    stride_mb, stride_mp, stride_mk, stride_mh,
    stride_bt, stride_sn, stride_sh, stride_pn, stride_ph,
    max_pages, page_size, scale, spread,
    GROUP: tl.constexpr, PPB: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, PARTIALS: tl.constexpr,
):
    # grid = (num_decodes, num_kv_heads, programs per row); program z scores chunks z, z + grid[2], ... of
    # BLOCK_P pages, stopping at the sequence's last chunk with a ranked page (`live` chunks): chunks past it
    # cost nothing, and neither their S entries nor their partials are written (the reduce never reads them).
    # PARTIALS: also the chunk's softmax partials, which only the group-reduced (softmax) scores read.
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_P)
    row_ok = rows < GROUP
    n_ranked = _ranked_pages(LENS, n, page_size)
    live = tl.cdiv(n_ranked, BLOCK_P)
    q = tl.load(Q + n.to(tl.int64) * stride_qn + (kvh * GROUP + rows)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    # ½(q ± spread |q|): max(q, 0) and min(q, 0) exactly at spread 1 (Quest's bound); < 1 discounts the
    # in-page spread (score q·centre + spread Σ|q_d| half-range; QuestConfig.spread_weight).
    q_abs = tl.abs(q) * spread
    q_pos = (0.5 * (q + q_abs)).to(COMPUTE)
    q_neg = (0.5 * (q - q_abs)).to(COMPUTE)
    s_row = S + n.to(tl.int64) * stride_sn + (kvh * GROUP + rows)[:, None] * stride_sh
    part = n.to(tl.int64) * stride_pn + (kvh * GROUP + rows) * stride_ph
    for chunk in range(tl.program_id(2), live, tl.num_programs(2)):
        pages = chunk * BLOCK_P + offs_p
        other = pages < n_ranked  # ranked pages: filled pages before the current one
        blk = tl.load(BT + n.to(tl.int64) * stride_bt + pages // PPB, mask=other, other=0).to(tl.int64)
        base = MM + blk * stride_mb + (pages % PPB) * stride_mp + kvh * stride_mh
        lo = tl.load(base[:, None] + offs_d[None, :], mask=other[:, None], other=0.0).to(COMPUTE)  # [BLOCK_P, D]
        hi = tl.load(base[:, None] + stride_mk + offs_d[None, :], mask=other[:, None], other=0.0).to(COMPUTE)
        s = tl.dot(q_pos, tl.trans(hi), input_precision=DOT_PRECISION)
        s = tl.dot(q_neg, tl.trans(lo), s, input_precision=DOT_PRECISION)  # [ROWS, BLOCK_P]
        s = tl.where(other[None, :], s * scale, float("-inf"))
        tl.store(s_row + pages[None, :], s, mask=row_ok[:, None] & (pages < max_pages)[None, :])
        if PARTIALS:  # softmax partials of this chunk
            m = tl.max(s, 1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.exp(s - m_safe[:, None]), 1)
            tl.store(M_PART + part + chunk, m, mask=row_ok)
            tl.store(L_PART + part + chunk, l, mask=row_ok)


@triton.jit
def _ranked_pages(LENS, n, page_size):
    """Pages ranked for decode n: its filled pages before the current one (0 for a 0- or 1-page sequence)."""
    kv_len = tl.load(LENS + n)
    return tl.maximum((kv_len + page_size - 1) // page_size - 1, 0)


@triton.jit
def _group_reduce_kernel(
    S, M_PART, L_PART, LENS, OUT, CAND,
    stride_sn, stride_sh, stride_pn, stride_ph, stride_on, stride_oh, stride_cr,
    max_pages, num_chunks, page_size,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    SCORE_BLOCK: tl.constexpr, KC: tl.constexpr, WRITE_SCORES: tl.constexpr, RAW: tl.constexpr,
):
    # grid = (num_decodes, num_kv_heads, programs per row); program z handles chunks z, z + grid[2], ... of
    # BLOCK_P pages up to num_chunks; score = Σ_g exp(s_g - M_g) / Z_g.
    # WRITE_SCORES: store the scores; else store the chunk's top-KC sort keys (see _page_keys) as candidates.
    # RAW (GROUP 1, Quest per query head): the score is the head's own s, no softmax (same order, no underflow ties).
    # Only the live score chunks' partials and ranked S entries are read; a chunk with no ranked page stores
    # its neutral result (0 scores / 0 keys) without reading or sorting anything.
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    n_ranked = _ranked_pages(LENS, n, page_size)
    live = tl.cdiv(n_ranked, SCORE_BLOCK)  # score chunks holding a ranked page
    part = M_PART + n.to(tl.int64) * stride_pn + heads * stride_ph
    lpart = L_PART + n.to(tl.int64) * stride_pn + heads * stride_ph
    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    z_run = tl.zeros([ROWS], tl.float32)
    if not RAW:  # RAW ranks raw bounds, so it reads no softmax partials (M_PART / L_PART are then unused)
        for c0 in range(0, live, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cs < live)[None, :]
            m = tl.load(part[:, None] + cs[None, :], mask=ok, other=float("-inf"))
            l = tl.load(lpart[:, None] + cs[None, :], mask=ok, other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z_run = z_run * tl.exp(m_run - m_safe) + tl.sum(l * tl.exp(m - m_safe[:, None]), 1)
            m_run = m_new
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    inv_z = tl.where(z_run > 0, 1.0 / z_run, 0.0)
    offs = tl.arange(0, BLOCK_P)
    row = (n * tl.num_programs(1) + kvh).to(tl.int64)
    for chunk in range(tl.program_id(2), num_chunks, tl.num_programs(2)):
        pages = chunk * BLOCK_P + offs
        p_ok = pages < max_pages
        if chunk * BLOCK_P < n_ranked:
            ranked = pages < n_ranked
            s = tl.load(S + n.to(tl.int64) * stride_sn + heads[:, None] * stride_sh + pages[None, :],
                        mask=row_ok[:, None] & ranked[None, :], other=float("-inf"))
            if RAW:
                score = tl.max(s, 0)  # the one real row (padding rows are -inf)
            else:
                score = tl.sum(tl.exp(s - m_safe[:, None]) * inv_z[:, None], 0)
            if WRITE_SCORES:
                tl.store(OUT + n.to(tl.int64) * stride_on + kvh * stride_oh + pages, score, mask=p_ok)
            else:
                keys = tl.sort(_page_keys(score, pages, ranked), 0, descending=True)
                tl.store(CAND + row * stride_cr + chunk * KC + offs, keys, mask=offs < KC)
        else:
            if WRITE_SCORES:
                tl.store(OUT + n.to(tl.int64) * stride_on + kvh * stride_oh + pages, tl.zeros([BLOCK_P], tl.float32),
                         mask=p_ok)
            else:
                tl.store(CAND + row * stride_cr + chunk * KC + offs, tl.zeros([BLOCK_P], tl.int64), mask=offs < KC)


@triton.jit
def _page_keys(score, pages, ranked):
    """int64 sort keys, larger = better: ((ordered score bits + 2^31) << 31) | (2^31 - 1 - page), 0 for unranked
    pages. The ordered bits (negative floats' magnitude bits flipped) order like the floats, signs included
    (Quest's raw bounds can be negative), and the key stays positive; equal scores rank the lower page first."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 2147483647).to(tl.int64) + 2147483648  # in [0, 2^32)
    return tl.where(ranked, (ordered << 31) | (2147483647 - pages.to(tl.int64)), 0)


@triton.jit
def _top_keys_kernel(
    KEYS, OUT, PAGES, stride_kr, stride_or, stride_pr, num_keys, k,
    BLOCK: tl.constexpr, KC: tl.constexpr, MID: tl.constexpr, FINAL: tl.constexpr,
):
    # grid = (rows, cdiv(num_keys, BLOCK)): the top KC keys of each BLOCK of a row's candidates (bitonic sort);
    # FINAL (one block per row): decode the first k into page ids (-1 for unranked padding).
    # Candidates of chunks past a sequence's last ranked page are 0 keys: a block of zeros is passed on without
    # a sort, and FINAL sorts only the smallest width (KC, MID or BLOCK) that holds every nonzero key.
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    first = tl.arange(0, BLOCK)
    offs = blk * BLOCK + first
    keys = tl.load(KEYS + row * stride_kr + offs, mask=offs < num_keys, other=0)
    if FINAL:
        filled = tl.max(tl.where(keys > 0, first + 1, 0), 0)  # keys from here on are all 0
        if filled <= KC:
            _emit_top_pages(KEYS + row * stride_kr, PAGES + row * stride_pr, num_keys, k, KC)
        elif filled <= MID:
            _emit_top_pages(KEYS + row * stride_kr, PAGES + row * stride_pr, num_keys, k, MID)
        else:
            _emit_top_pages(KEYS + row * stride_kr, PAGES + row * stride_pr, num_keys, k, BLOCK)
    else:
        if tl.max(keys, 0) > 0:
            keys = tl.sort(keys, 0, descending=True)
        tl.store(OUT + row * stride_or + blk * KC + first, keys, mask=first < KC)


@triton.jit
def _emit_top_pages(KEYS_ROW, PAGES_ROW, num_keys, k, WIDTH: tl.constexpr):
    """Sort a row's first WIDTH candidate keys (0 past num_keys) and store the first k as page ids
    (-1 for a 0 key: fewer than k ranked pages)."""
    offs = tl.arange(0, WIDTH)
    keys = tl.sort(tl.load(KEYS_ROW + offs, mask=offs < num_keys, other=0), 0, descending=True)
    page = tl.where(keys > 0, 2147483647 - (keys & 2147483647), -1).to(tl.int32)
    tl.store(PAGES_ROW + offs, page, mask=offs < k)


@triton.jit
def _bisect_top_pages_kernel(
    S, LENS, PAGES, stride_sn, stride_sh, stride_pn, stride_ph, page_size, k,
    BLOCK: tl.constexpr, KP: tl.constexpr, TAIL: tl.constexpr,
):
    # grid = (num_decodes, num_lists). The row's top-k ranked pages, best first, without sorting the row:
    # o = an int32 image of the fp32 bits that orders like the floats (negative floats' magnitude bits flipped;
    # unranked pages -2^31, below every real score); T = the k-th largest o by bisection (count(o >= mid) >= k
    # keeps mid), stopping as soon as count(o >= lo) == k (no entry equal to lo can then be cut); the pages with
    # o > T and the lowest pages with o == T (ties go to the lower page) are stored at their prefix-sum slots; then
    # the k slots are sorted best first (int64 keys, `_page_keys`); -1 past min(k, ranked pages).
    # The slot pass re-reads the row in TAIL-wide pieces (L2-resident) instead of scanning the register-held row:
    # whole-row prefix sums need about twice the registers of the bisection alone (sm_90, 16384 pages: 255 + spills
    # vs 128 at 8 warps, 128 vs 56 at 16), which halves the programs an SM holds.
    n = tl.program_id(0)
    lst = tl.program_id(1)
    n_ranked = _ranked_pages(LENS, n, page_size)
    offs = tl.arange(0, BLOCK)
    s_row = S + n.to(tl.int64) * stride_sn + lst * stride_sh
    o = _ordered_image(s_row, offs, n_ranked)
    k_eff = tl.minimum(n_ranked, k)
    lo = tl.zeros([], tl.int64) - 2147483647  # count(o >= lo) >= k_eff holds throughout
    hi = tl.zeros([], tl.int64) + 2147483647
    c_lo = n_ranked  # count(o >= lo): every ranked entry's image is >= -2^31 + 1
    while (lo < hi) & (c_lo != k_eff):  # at most 32 rounds: [-2^31 + 1, 2^31 - 1] halves down to one value
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((o >= mid.to(tl.int32)).to(tl.int32), 0)
        take = c >= k_eff
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
        c_lo = tl.where(take, c, c_lo)
    t = lo.to(tl.int32)
    # c_lo = count(o >= t) exceeds k only when ties straddle the k-th slot: only then do the pieces rank their ties
    # (a whole-row count and a second prefix sum per piece).
    straddle = c_lo > k_eff
    ties_wanted = k_eff
    if straddle:
        ties_wanted = k_eff - tl.sum((o > t).to(tl.int32), 0)
    p_row = PAGES + n.to(tl.int64) * stride_pn + lst * stride_ph
    filled = tl.zeros([], tl.int32)
    ties_seen = tl.zeros([], tl.int32)
    for c0 in range(0, BLOCK, TAIL):
        offs_c = c0 + tl.arange(0, TAIL)
        oc = _ordered_image(s_row, offs_c, n_ranked)
        if straddle:
            tie = oc == t
            sel = (oc > t) | (tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) <= ties_wanted))
            ties_seen += tl.sum(tie.to(tl.int32), 0)
        else:
            sel = oc >= t
        tl.store(p_row + filled + tl.cumsum(sel.to(tl.int32), 0) - 1, offs_c, mask=sel)
        filled += tl.sum(sel.to(tl.int32), 0)
    tl.debug_barrier()  # the slots were written by other threads of this program
    slots = tl.arange(0, KP)
    valid = slots < k_eff
    pg = tl.load(p_row + slots, mask=valid, other=0)
    keys = tl.sort(_page_keys(tl.load(s_row + pg, mask=valid, other=0.0), pg, valid), 0, descending=True)
    tl.debug_barrier()
    tl.store(p_row + slots, tl.where(keys > 0, 2147483647 - (keys & 2147483647), -1).to(tl.int32), mask=slots < k)


@triton.jit
def _ordered_image(s_row, offs, n_ranked):
    """int32 image of the row's fp32 scores at offs that orders like the floats; -2^31 for unranked pages."""
    ranked = offs < n_ranked
    bits = tl.load(s_row + offs, mask=ranked, other=0.0).to(tl.int32, bitcast=True)
    img = tl.maximum(tl.where(bits >= 0, bits, bits ^ 2147483647), -2147483647)  # -NaN stays above the unranked
    return tl.where(ranked, img, -2147483648)


def _bisect_warps(block: int) -> int:
    """Warps of `_bisect_top_pages_kernel`: about 16 row entries per thread up to 8192 pages (16 warps); 8 warps at
    16384 pages (H100, 128K b16, page 8, 2048-entry pieces: 128 registers, two programs per SM, 98 us vs 107-111 at
    16 warps with or without a 64-register cap; benchmarks/quest_topk_variants.py)."""
    return 8 if block >= 16384 else max(4, min(16, block // 512))


def _compute_dtype(minmax: torch.Tensor):
    """(tl dtype, input precision) of the scoring dots: exact fp32 in the interpreter and for fp32 caches;
    fp16 for fp16 / float8_e5m2 caches (e5m2 values are fp16 values); bf16 for bf16 caches."""
    if interpreting() or minmax.dtype == torch.float32:
        return tl.float32, "ieee"
    if minmax.dtype in (torch.float16, torch.float8_e5m2):
        return tl.float16, "ieee"
    if minmax.dtype == torch.bfloat16:
        return tl.bfloat16, "ieee"
    raise ValueError(f"min/max cache dtype {minmax.dtype}: allowed float32, float16, bfloat16, float8_e5m2")


def _score_block() -> int:
    """Pages per `_scores_kernel` chunk."""
    return 32 if interpreting() else 128


def _programs_per_row(chunks: int, rows: int, per_launch: int | None = None) -> int:
    """Programs per (decode, KV head) along the page axis: one per chunk up to ~per_launch (default
    PROGRAMS_PER_LAUNCH) programs in all, then each loops over several chunks. Shape-only (graph-safe); caps the
    programs a wide decode-graph table launches, since programs past a sequence's last page still cost a launch
    slot each."""
    cap = PROGRAMS_PER_LAUNCH if per_launch is None else per_launch
    return max(1, min(chunks, triton.cdiv(cap, max(rows, 1))))


def _launch_scores(q, lo, hi, block_tables, seq_lens, page_size, max_pages, scale, spread=1.0, partials=True):
    """Kernel 1: per-head scaled bounds S [N, H, max_pages] and (partials) their per-chunk softmax partials
    (else the partials are None: raw per-query-head ranking has no softmax)."""
    n, h, d = q.shape
    nb, ppb, hkv, d2 = lo.shape
    if d2 != d or hi.shape != lo.shape or lo.stride() != hi.stride():
        raise ValueError(f"min/max views {tuple(lo.shape)} / {tuple(hi.shape)} do not match q {tuple(q.shape)}")
    if h % hkv:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={hkv}")
    if q.stride(-1) != 1 or lo.stride(-1) != 1:
        raise ValueError("q and the min/max cache must be contiguous in head_dim")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim={d}: the page scoring kernel needs a power of two in [16, 256]")
    g = h // hkv
    block_p = _score_block()
    chunks = triton.cdiv(max_pages, block_p)
    s = torch.empty(n, h, max_pages, dtype=torch.float32, device=q.device)
    m_part = torch.empty(n, h, chunks if partials else 0, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    compute, precision = _compute_dtype(lo)
    _scores_kernel[(n, hkv, _programs_per_row(chunks, n * hkv, SCORE_PROGRAMS_PER_LAUNCH))](
        q, lo, block_tables, seq_lens, s, m_part, l_part,
        q.stride(0), q.stride(1),
        lo.stride(0), lo.stride(1), (hi.data_ptr() - lo.data_ptr()) // lo.element_size(), lo.stride(2),
        block_tables.stride(0), s.stride(0), s.stride(1), m_part.stride(0), m_part.stride(1),
        max_pages, page_size, scale, float(spread),
        GROUP=g, PPB=ppb, ROWS=max(16, next_pow2(g)), BLOCK_P=block_p, HEAD_DIM=d, COMPUTE=compute,
        DOT_PRECISION=precision, PARTIALS=partials, num_warps=SCORE_WARPS,
        **({} if SCORE_STAGES is None else {"num_stages": SCORE_STAGES}),
    )
    return (s, m_part, l_part) if partials else (s, None, None)


def _reduce_args(s, hkv):
    g = s.shape[1] // hkv
    chunks = triton.cdiv(s.shape[2], _score_block())  # the partials' chunks
    return dict(GROUP=g, ROWS=max(2, next_pow2(g)), BLOCK_C=min(64, max(2, next_pow2(chunks))),
                SCORE_BLOCK=_score_block())


def group_page_scores(
    q: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    max_pages: int,
    scale: float,
) -> torch.Tensor:
    """float32 [N, Hkv, max_pages] group-reduced scores of the ranked pages (0 elsewhere).

    q [N, H, D] (channels outside the selection already zeroed); lo / hi: views [num_blocks, PPB, Hkv, D]
    of the min / max halves of the paged min/max cache (any layout with unit stride in D, and hi at a fixed
    offset from lo); block_tables int32 [N, *]; seq_lens int32 [N]; max_pages >= every sequence's page count.
    """
    n, hkv = q.shape[0], lo.shape[2]
    out = torch.zeros(n, hkv, max_pages, dtype=torch.float32, device=q.device)
    if n == 0 or max_pages == 0:
        return out
    s, m_part, l_part = _launch_scores(q, lo, hi, block_tables, seq_lens, page_size, max_pages, scale)
    meta = _reduce_args(s, hkv)
    block_p = _score_block()
    chunks = triton.cdiv(max_pages, block_p)
    _group_reduce_kernel[(n, hkv, _programs_per_row(chunks, n * hkv))](
        s, m_part, l_part, seq_lens, out, out,
        s.stride(0), s.stride(1), m_part.stride(0), m_part.stride(1), out.stride(0), out.stride(1), 0,
        max_pages, chunks, page_size, BLOCK_P=block_p, KC=1, WRITE_SCORES=True, RAW=False, num_warps=4, **meta,
    )
    return out


def select_top_pages(
    q: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    max_pages: int,
    scale: float,
    k: int,
    per_query_head: bool = False,
    sink_pages: int = 0,
    recent_pages: int = 1,
    spread_weight: float = 1.0,
) -> torch.Tensor:
    """int32 [N, Hkv, k]: the top-k ranked pages of `group_page_scores` per (decode, KV head), best first; ties
    go to the lower page; -1 pads rows with fewer than k ranked pages.

    per_query_head (Quest's paper mode): int32 [N, H, k], each query head's top-k ranked pages by its own raw
    bound Σ_d max(q_d lo_d, q_d hi_d) (`sparse.quest.page_scores`; `scale` is not applied: scaling could round
    distinct bounds into ties). The same kernels with every query head as its own group of one.

    sink_pages / recent_pages (Quest): those ranked pages are forced in, listed first (kernels/page_force.py);
    spread_weight (Quest): scores q·centre + w Σ|q_d| half-range (`sparse.quest.page_scores`; 1 = the bound).

    Top-k without a full pass per row: each reduce program sorts its BLOCK_R pages' keys and keeps the best KC
    (next power of two >= k) as candidates; `_top_keys_kernel` rounds then keep the best KC of every BLOCK_T
    candidates until one block remains, and decode the first k. The shapes fix the rounds: no host sync.
    per_query_head rows of up to BISECT_MAX_PAGES pages take `_bisect_top_pages_kernel` instead (same pages,
    same order; no sort of the row).
    """
    n, h, hkv = q.shape[0], q.shape[1], lo.shape[2]
    if k < 1 or k > 4096:
        raise ValueError(f"select_top_pages: k={k} pages must be in [1, 4096]")
    lists = h if per_query_head else hkv  # page lists per decode, and "groups" of the reduce
    pages = torch.empty(n, lists, k, dtype=torch.int32, device=q.device)
    if n == 0:
        return pages
    kc = next_pow2(k)
    block_r = max(64 if interpreting() else 1024, 2 * kc)
    block_t = max(16 if interpreting() else 4096, 2 * kc)
    s, m_part, l_part = _launch_scores(q, lo, hi, block_tables, seq_lens, page_size, max_pages,
                                       1.0 if per_query_head else scale, spread_weight, partials=not per_query_head)
    if sink_pages or recent_pages > 1:  # Quest's forced pages: +inf scores, listed first (kernels/page_force.py)
        force_pages_(s, seq_lens, page_size, sink_pages, recent_pages)
    if per_query_head and next_pow2(max_pages) <= BISECT_MAX_PAGES:
        block = max(2, next_pow2(max_pages))
        _bisect_top_pages_kernel[(n, lists)](
            s, seq_lens, pages, s.stride(0), s.stride(1), pages.stride(0), pages.stride(1), page_size, k,
            BLOCK=block, KP=max(2, next_pow2(k)), TAIL=min(block, BISECT_TAIL), num_warps=_bisect_warps(block),
        )
        return pages
    meta = _reduce_args(s, lists)
    if per_query_head:  # RAW: the reduce reads no partials, so S itself is passed for the unused pointers
        m_part = l_part = s
    chunks = triton.cdiv(max_pages, block_r)
    n_cand = chunks * kc
    cand = torch.empty(n * lists, n_cand, dtype=torch.int64, device=q.device)
    _group_reduce_kernel[(n, lists, _programs_per_row(chunks, n * lists))](
        s, m_part, l_part, seq_lens, s, cand,
        s.stride(0), s.stride(1), m_part.stride(0), m_part.stride(1), 0, 0, cand.stride(0),
        max_pages, chunks, page_size, BLOCK_P=block_r, KC=kc, WRITE_SCORES=False, RAW=per_query_head, num_warps=8,
        **meta,
    )
    flat = pages.view(n * lists, k)
    while True:
        blocks = triton.cdiv(n_cand, block_t)
        final = blocks == 1
        out = cand if final else torch.empty(n * lists, blocks * kc, dtype=torch.int64, device=q.device)
        block = block_t if not final else max(2, next_pow2(n_cand))
        _top_keys_kernel[(n * lists, blocks)](
            cand, out, flat, cand.stride(0), out.stride(0), flat.stride(0), n_cand, k,
            BLOCK=block, KC=kc, MID=min(block, FINAL_MID_FACTOR * kc), FINAL=final, num_warps=8,
        )
        if final:
            return pages
        cand, n_cand = out, blocks * kc
