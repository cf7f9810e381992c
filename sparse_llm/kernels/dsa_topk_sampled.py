"""Exact row-wise top-k positions by sample -> threshold -> compaction -> exact select (Triton).

Same contract and tie rule as kernels/dsa_topk.py (and the oracle sparse_llm.backends.dsa_torch.topk_positions_ref):
the positions above the k-th largest of logits[r, :n_valid[r]] in increasing order, then the positions equal
to it, lowest first, up to k in all; rows with n_valid <= k return 0..n_valid-1 then -1. Optionally also the
physical cache slots through block_tables (as dsa_topk.topk_positions does).

Why: the radix kernel runs four 256-bin histogram passes over the whole row; here only one cheap pass
compares the row against a threshold, and the exact work is done on about 2k candidates. Four launches,
a fixed grid, no host synchronisation, no atomics (CUDA-graph capturable, deterministic):
  1. sample (grid rows): SAMPLE keys, one at a hashed position inside each of SAMPLE equal strata of the row
     (stratified, so a pattern periodic in the position, e.g. per cache page, cannot alias with the stride);
     t = the j-th largest of them, j = ceil(2k * SAMPLE / n), so about 2k keys of the row are expected >= t.
  2. count (grid rows x chunks): how many keys of each chunk are >= t.
  3. compact (grid rows x chunks): each chunk writes its keys >= t, with their positions, at the offset given
     by the counts of the chunks before it: the candidates end up in increasing position order.
  4. select (grid rows): if k <= #candidates <= CAPACITY, the exact k-th largest key T among the candidates
     (bisection between their smallest and largest key: at most 32 counts over one register block, about 24
     for candidates of one or two binary exponents), then the positions with key > T
     in order, then the first k - #(key > T) positions with key == T. Otherwise the sample was unlucky (or
     ties at t overflow the buffer): the same bisection and ordered write run over the whole row in this
     program (about 34 passes over the row by one SM: slow, but exact, and only for that row).
Rows with k < n_valid <= CAPACITY skip steps 1-3 and select straight from the row.

Exactness: every key >= t is a candidate, and the candidates keep their row order. If #candidates >= k, the
k-th largest key T of the row is >= t, so every key > T and every key == T is a candidate, the k-th largest
candidate is T, and the candidates with key > T (all of the row's) and the lowest-positioned ones equal to T
are exactly the contract's answer, in its order. Otherwise the fallback scans the row itself. The sample only
changes how fast the answer is found, never the answer.

Keys: floats map to int32 of the same order as signed integers (32-bit keys halve the registers of the select
program's 4k-entry block against dsa_topk's int64 ones), with -0.0 read as +0.0, because the oracle's sort treats
them as equal. NaN logits get no particular place (as in dsa_topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.dsa_topk import _store_selected, default_chunk
from sparse_llm.kernels.tuning import interpreting


INT32_MIN = tl.constexpr(-2147483648)  # the key of entries to ignore (only a NaN bit pattern maps there too)


@triton.jit
def _key(x):
    """float32 -> int32 with the floats' order as signed integers (negatives' magnitude bits flipped);
    -0.0 and +0.0 give the same key, 0."""
    x = tl.where(x == 0.0, 0.0, x)
    i = x.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 2147483647)


@triton.jit
def _kth_largest(key, k):
    """The k-th largest of key (int32; entries to ignore = INT32_MIN; at least k others): the largest T with
    #(key >= T) >= k, by bisection keeping #(key >= lo) >= k > #(key >= hi) from [min, max + 1]. At most 32
    counts, fewer when the keys span a narrow range (candidates above a threshold do). mid > lo >= INT32_MIN,
    so ignored entries never count."""
    lo = tl.min(tl.where(key != INT32_MIN, key, 2147483647), 0).to(tl.int64)
    hi = tl.max(key, 0).to(tl.int64) + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _row_keys(LOGITS_ROW, offs, n):
    mask = offs < n
    return tl.where(mask, _key(tl.load(LOGITS_ROW + offs, mask=mask, other=0.0)), INT32_MIN), mask


@triton.jit
def _sample_position(i, n, SAMPLE: tl.constexpr):
    """A position in stratum i, [i n / SAMPLE, (i + 1) n / SAMPLE), from a multiplicative hash of i."""
    return (i * n + ((i * 2654435761) & 4294967295) % n) // SAMPLE


def sample_positions(n: int, sample: int) -> torch.Tensor:
    """The positions the sample kernel reads in a row of n > capacity keys (for tests)."""
    i = torch.arange(sample, dtype=torch.int64)
    return (i * n + ((i * 2654435761) & 4294967295) % n) // sample


@triton.jit
def _sample_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, k, SAMPLE: tl.constexpr, CAPACITY: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = tl.load(ROW_LEN + r).to(tl.int64)
    if n > CAPACITY:
        i = tl.arange(0, SAMPLE).to(tl.int64)
        key = _key(tl.load(LOGITS + r * stride_lr + _sample_position(i, n, SAMPLE)))
        # about 2k keys of the row expected >= t; j <= SAMPLE because n > CAPACITY >= 2k
        j = (2 * k * SAMPLE + n - 1) // n
        tl.store(WS + r * stride_ws, _kth_largest(key, j).to(tl.int64))


@triton.jit
def _count_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, CAPACITY: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = tl.load(ROW_LEN + r)
    if (n > CAPACITY) & (c * CHUNK < n):
        t = tl.load(WS + r * stride_ws).to(tl.int32)
        key, mask = _row_keys(LOGITS + r * stride_lr, c * CHUNK + tl.arange(0, CHUNK), n)
        tl.store(WS + r * stride_ws + 1 + c, tl.sum((mask & (key >= t)).to(tl.int32), 0).to(tl.int64))


@triton.jit
def _compact_kernel(LOGITS, ROW_LEN, WS, CAND_VAL, CAND_POS, stride_lr, stride_ws, stride_cr,
                    CAPACITY: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = tl.load(ROW_LEN + r)
    if (n > CAPACITY) & (c * CHUNK < n):
        ws_row = WS + r * stride_ws
        t = tl.load(ws_row).to(tl.int32)
        chunks = tl.arange(0, BLOCK_C)
        base = tl.sum(tl.load(ws_row + 1 + chunks, mask=chunks < c, other=0), 0)
        if base < CAPACITY:  # past the buffer: the select kernel falls back for this row anyway
            offs = c * CHUNK + tl.arange(0, CHUNK)
            mask = offs < n
            x = tl.load(LOGITS + r * stride_lr + offs, mask=mask, other=0.0)
            keep = mask & (_key(x) >= t)
            at = base.to(tl.int32) + tl.cumsum(keep.to(tl.int32), 0) - 1
            keep = keep & (at < CAPACITY)
            tl.store(CAND_VAL + r * stride_cr + at, x, mask=keep)
            tl.store(CAND_POS + r * stride_cr + at, offs, mask=keep)


@triton.jit
def _select_kernel(LOGITS, ROW_LEN, WS, CAND_VAL, CAND_POS, OUT, SLOTS, BLOCK_TABLES, ROW_SEQ,
                   stride_lr, stride_ws, stride_cr, stride_or, stride_sr, stride_bt, k,
                   CAPACITY: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   TILE: tl.constexpr, PAGE: tl.constexpr, WITH_SLOTS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = tl.load(ROW_LEN + r)
    seq = r
    if WITH_SLOTS:
        seq = tl.load(ROW_SEQ + r).to(tl.int64)
    out_row = OUT + r * stride_or
    slot_row = SLOTS + r * stride_sr
    logit_row = LOGITS + r * stride_lr
    if n <= k:  # every valid position, in order, then -1
        for start in range(0, k, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            valid = offs < n
            tl.store(out_row + offs, tl.where(valid, offs, -1), mask=offs < k)
            if WITH_SLOTS:
                block = tl.load(BLOCK_TABLES + seq * stride_bt + offs // PAGE, mask=valid, other=0)
                tl.store(slot_row + offs, tl.where(valid, block * PAGE + offs % PAGE, -1), mask=offs < k)
    else:
        chunks = tl.arange(0, BLOCK_C)
        total = tl.sum(tl.load(WS + r * stride_ws + 1 + chunks, mask=(n > CAPACITY) & (chunks * CHUNK < n), other=0), 0)
        if n <= CAPACITY:  # the row itself is the candidate list
            total = n.to(tl.int64)
        if (total >= k) & (total <= CAPACITY):
            i = tl.arange(0, CAPACITY)
            valid = i < total
            if n <= CAPACITY:
                pos = i
                x = tl.load(logit_row + i, mask=valid, other=0.0)
            else:
                x = tl.load(CAND_VAL + r * stride_cr + i, mask=valid, other=0.0)
                pos = tl.load(CAND_POS + r * stride_cr + i, mask=valid, other=0)
            key = tl.where(valid, _key(x), INT32_MIN)
            kth = _kth_largest(key, k)
            above = (key > kth).to(tl.int32)
            n_above = tl.sum(above, 0)
            _store_selected(out_row, slot_row, BLOCK_TABLES, seq, stride_bt, tl.cumsum(above, 0) - 1, pos,
                            above != 0, PAGE, WITH_SLOTS)
            tie = (valid & (key == kth)).to(tl.int32)
            rank = tl.cumsum(tie, 0) - 1
            _store_selected(out_row, slot_row, BLOCK_TABLES, seq, stride_bt, n_above + rank, pos,
                            (tie != 0) & (rank < k - n_above), PAGE, WITH_SLOTS)
        else:  # the sample missed: exact selection over the whole row, in this program
            j = tl.arange(0, TILE)
            lo = tl.full((), INT32_MIN, dtype=tl.int64)  # every valid key is >= lo: n >= k of them
            hi = tl.full((), 2147483648, dtype=tl.int64)  # none is >= hi
            while hi - lo > 1:  # 32 rounds of a count over the row; mid > INT32_MIN, so masked keys never count
                mid = (lo + (hi - lo) // 2).to(tl.int32)
                count = tl.zeros((), dtype=tl.int32)
                for start in range(0, n, TILE):
                    key, mask = _row_keys(logit_row, start + j, n)
                    count += tl.sum((key >= mid).to(tl.int32), 0)
                enough = count >= k
                lo = tl.where(enough, mid.to(tl.int64), lo)
                hi = tl.where(enough, hi, mid.to(tl.int64))
            kth = lo.to(tl.int32)
            n_above = tl.zeros((), dtype=tl.int32)
            for start in range(0, n, TILE):
                key, mask = _row_keys(logit_row, start + j, n)
                n_above += tl.sum((key > kth).to(tl.int32), 0)
            done_above = tl.zeros((), dtype=tl.int32)
            done_tie = tl.zeros((), dtype=tl.int32)
            for start in range(0, n, TILE):
                key, mask = _row_keys(logit_row, start + j, n)
                above = (key > kth).to(tl.int32)
                _store_selected(out_row, slot_row, BLOCK_TABLES, seq, stride_bt, done_above + tl.cumsum(above, 0) - 1,
                                start + j, above != 0, PAGE, WITH_SLOTS)
                tie = (mask & (key == kth)).to(tl.int32)
                rank = done_tie + tl.cumsum(tie, 0) - 1
                _store_selected(out_row, slot_row, BLOCK_TABLES, seq, stride_bt, n_above + rank, start + j,
                                (tie != 0) & (rank < k - n_above), PAGE, WITH_SLOTS)
                done_above += tl.sum(above, 0)
                done_tie += tl.sum(tie, 0)


def default_capacity(k: int) -> int:
    """Candidate buffer per row: a power of two >= 4k, so ~2k expected candidates overflow it only on ties."""
    return max(16, triton.next_power_of_2(4 * k))


def default_sample(capacity: int) -> int:
    """Keys sampled per row (on the GPU 4096: the 2k-th largest key's rank is then known to about 8%)."""
    return min(capacity, 256 if interpreting() else 4096)


def topk_positions_sampled(
    logits: torch.Tensor,
    n_valid: torch.Tensor,
    k: int,
    chunk: int | None = None,
    sample: int | None = None,
    capacity: int | None = None,
    num_warps: int = 4,
    select_warps: int = 8,
    block_tables: torch.Tensor | None = None,
    row_seq: torch.Tensor | None = None,
    page: int | None = None,
    return_candidates: bool = False,
):
    """logits float32 [R, N] (only [:, :n_valid] read), n_valid int32 [R] (<= N) -> int32 [R, k], -1 padded.

    With block_tables (int32 [num_seqs, max_blocks]), row_seq (int32 [R]) and page, returns (positions, slots)
    as dsa_topk.topk_positions does. `return_candidates=True` appends the per-row candidate count (int64 [R]:
    how many keys passed the sampled threshold; only meaningful for rows with n_valid > capacity) so tests can
    tell the fast path (k <= count <= capacity) from the fallback.
    """
    if logits.dtype != torch.float32:
        raise ValueError(f"topk_positions_sampled needs float32 logits, got {logits.dtype}")
    if k < 1:
        raise ValueError(f"topk_positions_sampled: k must be >= 1, got {k}")
    for name, value, low in (("chunk", chunk, 16), ("sample", sample, 16), ("capacity", capacity, 16)):
        if value is not None and (value < low or value & (value - 1)):
            raise ValueError(f"topk_positions_sampled: {name}={value} must be a power of two >= {low}")
    capacity = capacity or default_capacity(k)
    if capacity < 2 * k:
        raise ValueError(f"topk_positions_sampled: capacity={capacity} must be >= 2k = {2 * k}")
    sample = sample or default_sample(capacity)
    with_slots = block_tables is not None
    if with_slots != (row_seq is not None) or with_slots != (page is not None):
        raise ValueError("topk_positions_sampled: block_tables, row_seq and page go together (all or none); got "
                         f"block_tables {'given' if with_slots else 'None'}, row_seq "
                         f"{'given' if row_seq is not None else 'None'}, page {page}")
    R, N = logits.shape
    dev = logits.device
    out = torch.empty(R, k, dtype=torch.int32, device=dev)
    slots = torch.empty_like(out) if with_slots else out
    chunk = chunk or default_chunk(R, N)
    num_chunks = triton.cdiv(max(N, 1), chunk)
    # [threshold, count of chunk 0, 1, ...]: every word read is written first, so no memset launch
    workspace = torch.empty(R, 1 + num_chunks, dtype=torch.int64, device=dev)
    # candidate buffers (8 bytes x capacity per row) only when some row can be longer than the buffer
    cand_len = capacity if N > capacity else 1
    cand_val = torch.empty(R, cand_len, dtype=torch.float32, device=dev)
    cand_pos = torch.empty(R, cand_len, dtype=torch.int32, device=dev)
    if R > 0:
        block_c = max(2, triton.next_power_of_2(num_chunks))
        strides = (logits.stride(0), workspace.stride(0))
        _sample_kernel[(R,)](logits, n_valid, workspace, *strides, k, SAMPLE=sample, CAPACITY=capacity,
                             num_warps=select_warps)
        grid = (R, num_chunks)
        _count_kernel[grid](logits, n_valid, workspace, *strides, CAPACITY=capacity, CHUNK=chunk, num_warps=num_warps)
        _compact_kernel[grid](logits, n_valid, workspace, cand_val, cand_pos, *strides, cand_val.stride(0),
                              CAPACITY=capacity, CHUNK=chunk, BLOCK_C=block_c, num_warps=num_warps)
        tables = block_tables if with_slots else n_valid  # any tensor without slots: the kernel never reads it
        seqs = row_seq if with_slots else n_valid
        _select_kernel[(R,)](logits, n_valid, workspace, cand_val, cand_pos, out, slots, tables, seqs, *strides,
                             cand_val.stride(0), out.stride(0), slots.stride(0), tables.stride(0), k,
                             CAPACITY=capacity, CHUNK=chunk, BLOCK_C=block_c, BLOCK_K=min(1024, triton.next_power_of_2(k)),
                             TILE=min(capacity, 2048),
                             PAGE=page or 1, WITH_SLOTS=with_slots, num_warps=select_warps)
    result = (out, slots) if with_slots else (out,)
    if return_candidates:
        counts = torch.where(n_valid.to(torch.int64) > capacity,
                             workspace[:, 1:].masked_fill(torch.arange(num_chunks, device=dev)[None] * chunk
                                                          >= n_valid[:, None], 0).sum(1), -1)
        result = result + (counts,)
    return result if len(result) > 1 else result[0]
