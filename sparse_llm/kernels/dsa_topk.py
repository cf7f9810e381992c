"""Exact, deterministic row-wise top-k positions by radix select (Triton): DSA's token selection.

For each row r: the positions of the k largest of logits[r, :n_valid[r]]; among values equal to the k-th
largest, the lowest positions win. Output: the positions above the k-th value in increasing order, then the
tied ones in increasing order; rows with n_valid <= k return 0..n_valid-1 then -1.
(The torch oracle, sparse_llm.backends.dsa_torch.topk_positions_ref, applies the same tie rule.)

Floats are mapped to integer keys with the same order (negatives' bits flipped, non-negatives shifted above
them), and the k-th largest key is found one digit of RADIX_BITS (4 or 8) bits at a time, most significant
first:
  hist pass L (L = 0 .. 32/RADIX_BITS - 1), grid (rows, chunks): each chunk re-derives the digits fixed so far
      from the histograms of passes < L, then histograms digit L of its keys whose higher digits match
      (tl.histogram, then 2^RADIX_BITS atomic adds into hist[r, L]). From hist[r, L] the threshold digit is the
      largest b with #(keys in bins >= b) >= need; need drops by the count in the bins above b.
  count pass: each chunk stores how many of its keys are > threshold and == threshold.
  write pass: each chunk adds up the counts of the chunks before it (a prefix sum over <= a few hundred
      integers) and writes its selected positions at those offsets: deterministic, no atomics.
tl.histogram's lowering (warp ballots per bin bit, then popcounts of the bins a lane owns, padded to >= 32
bins) spends ~96 warp operations per 32 keys at 256 bins and ~23 at 16, so 4-bit digits (8 passes) do about
half the histogram arithmetic of 8-bit digits (4 passes) for twice the (L2-resident) reads and launches; the
sweep in benchmarks/dsa_tune.py picks. Later passes skip chunks with no key left on the prefix. With `block_tables` the write pass also emits each
selected token's physical cache slot, which spares the attention kernel its block-table lookup.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.tuning import interpreting

RADIX_BITS_ALLOWED = (4, 8)


def workspace_layout(radix_bits: int) -> tuple[int, int]:
    """(levels, histogram words per row) for digits of radix_bits bits."""
    levels = 32 // radix_bits
    return levels, levels * (1 << radix_bits)


@triton.jit
def _ordered_key(x):
    """float32 -> int64 in [0, 2^32) with the same order as the floats; -0.0 reads as +0.0 (the oracle's sort
    treats them as equal, so they tie and the lower position wins)."""
    x = tl.where(x == 0.0, 0.0, x)
    i = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(i < 0, -i - 1, i + 2147483648)


@triton.jit
def _threshold_prefix(ws_row, k, LEVEL: tl.constexpr, BITS: tl.constexpr):
    """The digits of the k-th largest key fixed by passes < LEVEL, and how many keys with exactly that prefix
    must still be taken."""
    BINS: tl.constexpr = 1 << BITS
    bins = tl.arange(0, BINS)
    prefix = tl.zeros((), dtype=tl.int64)
    need = k
    for j in tl.static_range(LEVEL):
        hist = tl.load(ws_row + j * BINS + bins)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        b = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
        need = need - tl.sum(tl.where(bins > b, hist, 0), 0)
        prefix = prefix * BINS + b
    return prefix, need


@triton.jit
def _load_keys(LOGITS, r, stride_lr, offs, n_valid):
    mask = offs < n_valid
    return _ordered_key(tl.load(LOGITS + r * stride_lr + offs, mask=mask, other=0.0)), mask


@triton.jit
def _radix_hist_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, k, LEVEL: tl.constexpr, BITS: tl.constexpr,
                       CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    n_valid = tl.load(ROW_LEN + r)
    if (n_valid > k) & (start < n_valid):
        BINS: tl.constexpr = 1 << BITS
        ws_row = WS + r * stride_ws
        prefix, need = _threshold_prefix(ws_row, k, LEVEL, BITS)
        key, mask = _load_keys(LOGITS, r, stride_lr, start + tl.arange(0, CHUNK), n_valid)
        shift: tl.constexpr = 32 - BITS * (LEVEL + 1)
        if LEVEL > 0:
            mask = mask & ((key >> (shift + BITS)) == prefix)
        # Past the first digits few keys of a chunk still match the prefix: skip empty chunks and empty bins.
        if tl.sum(mask.to(tl.int32), 0) > 0:
            hist = tl.histogram(((key >> shift) & (BINS - 1)).to(tl.int32), BINS, mask=mask)
            tl.atomic_add(ws_row + LEVEL * BINS + tl.arange(0, BINS), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _count_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, k, LEVELS: tl.constexpr, BITS: tl.constexpr,
                  CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_valid = tl.load(ROW_LEN + r)
    if (n_valid > k) & (c * CHUNK < n_valid):
        HIST: tl.constexpr = LEVELS << BITS
        ws_row = WS + r * stride_ws
        threshold, need = _threshold_prefix(ws_row, k, LEVELS, BITS)
        key, mask = _load_keys(LOGITS, r, stride_lr, c * CHUNK + tl.arange(0, CHUNK), n_valid)
        tl.store(ws_row + HIST + 2 * c, tl.sum((mask & (key > threshold)).to(tl.int32), 0))
        tl.store(ws_row + HIST + 1 + 2 * c, tl.sum((mask & (key == threshold)).to(tl.int32), 0))


@triton.jit
def _store_selected(OUT, SLOTS, BLOCK_TABLES, seq, stride_bt, at, offs, keep, PAGE: tl.constexpr,
                    WITH_SLOTS: tl.constexpr):
    tl.store(OUT + at, offs, mask=keep)
    if WITH_SLOTS:
        block = tl.load(BLOCK_TABLES + seq * stride_bt + offs // PAGE, mask=keep, other=0)
        tl.store(SLOTS + at, block * PAGE + offs % PAGE, mask=keep)


@triton.jit
def _write_kernel(LOGITS, ROW_LEN, WS, OUT, SLOTS, BLOCK_TABLES, ROW_SEQ, stride_lr, stride_ws, stride_or, stride_sr,
                  stride_bt, k, LEVELS: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                  PAGE: tl.constexpr, WITH_SLOTS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_valid = tl.load(ROW_LEN + r)
    seq = r
    if WITH_SLOTS:
        seq = tl.load(ROW_SEQ + r).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    if n_valid <= k:  # every valid position, in order, then -1
        valid = offs < n_valid
        tl.store(OUT + r * stride_or + offs, tl.where(valid, offs, -1), mask=offs < k)
        if WITH_SLOTS:
            block = tl.load(BLOCK_TABLES + seq * stride_bt + offs // PAGE, mask=valid, other=0)
            tl.store(SLOTS + r * stride_sr + offs, tl.where(valid, block * PAGE + offs % PAGE, -1), mask=offs < k)
    elif c * CHUNK < n_valid:
        HIST: tl.constexpr = LEVELS << BITS
        ws_row = WS + r * stride_ws
        threshold, need = _threshold_prefix(ws_row, k, LEVELS, BITS)
        earlier = tl.arange(0, BLOCK_C) < c
        base_above = tl.sum(tl.load(ws_row + HIST + 2 * tl.arange(0, BLOCK_C), mask=earlier, other=0), 0)
        base_tie = tl.sum(tl.load(ws_row + HIST + 1 + 2 * tl.arange(0, BLOCK_C), mask=earlier, other=0), 0)
        key, mask = _load_keys(LOGITS, r, stride_lr, offs, n_valid)
        above = (mask & (key > threshold)).to(tl.int32)
        at = base_above + tl.cumsum(above, 0) - 1
        _store_selected(OUT + r * stride_or, SLOTS + r * stride_sr, BLOCK_TABLES, seq, stride_bt, at, offs,
                        above != 0, PAGE, WITH_SLOTS)
        tie = (mask & (key == threshold)).to(tl.int32)
        rank = base_tie + tl.cumsum(tie, 0) - 1
        _store_selected(OUT + r * stride_or, SLOTS + r * stride_sr, BLOCK_TABLES, seq, stride_bt, (k - need) + rank,
                        offs, (tie != 0) & (rank < need), PAGE, WITH_SLOTS)


def default_chunk(rows: int, n: int) -> int:
    """The largest chunk that still gives ~2 programs per SM (H100: 132), within [512, 4096]."""
    if interpreting():
        return 256
    chunk = 4096
    while chunk > 512 and rows * triton.cdiv(n, chunk) < 264:
        chunk //= 2
    return chunk


def topk_positions(
    logits: torch.Tensor,
    n_valid: torch.Tensor,
    k: int,
    chunk: int | None = None,
    radix_bits: int = 8,
    num_warps: int = 4,
    block_tables: torch.Tensor | None = None,
    row_seq: torch.Tensor | None = None,
    page: int | None = None,
):
    """logits float32 [R, N] (only [:, :n_valid] read), n_valid int32 [R] (<= N) -> int32 [R, k], -1 padded.

    With block_tables (int32 [num_seqs, max_blocks]), row_seq (int32 [R]) and page, returns (positions, slots):
    slots[r, i] = block_tables[row_seq[r], p // page] * page + p % page for p = positions[r, i] (-1 where p is).
    """
    if logits.dtype != torch.float32:
        raise ValueError(f"topk_positions needs float32 logits, got {logits.dtype}")
    if k < 1:
        raise ValueError(f"topk_positions: k must be >= 1, got {k}")
    if radix_bits not in RADIX_BITS_ALLOWED:
        raise ValueError(f"topk_positions: radix_bits={radix_bits} is not allowed; allowed: {RADIX_BITS_ALLOWED}")
    if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"topk_positions: chunk={chunk} must be a power of two >= 16")
    with_slots = block_tables is not None
    if with_slots != (row_seq is not None) or with_slots != (page is not None):
        raise ValueError("topk_positions: block_tables, row_seq and page go together (all or none); got "
                         f"block_tables {'given' if with_slots else 'None'}, row_seq "
                         f"{'given' if row_seq is not None else 'None'}, page {page}")
    R, N = logits.shape
    out = torch.empty(R, k, dtype=torch.int32, device=logits.device)
    slots = torch.empty_like(out) if with_slots else out
    if R == 0:
        return (out, slots) if with_slots else out
    chunk = chunk or default_chunk(R, N)
    levels, hist_words = workspace_layout(radix_bits)
    num_chunks = triton.cdiv(max(N, k), chunk)
    workspace = torch.zeros(R, hist_words + 2 * num_chunks, dtype=torch.int32, device=logits.device)
    grid = (R, num_chunks)
    strides = (logits.stride(0), workspace.stride(0))
    for level in range(levels):
        _radix_hist_kernel[grid](logits, n_valid, workspace, *strides, k, LEVEL=level, BITS=radix_bits, CHUNK=chunk,
                                 num_warps=num_warps)
    _count_kernel[grid](logits, n_valid, workspace, *strides, k, LEVELS=levels, BITS=radix_bits, CHUNK=chunk,
                        num_warps=num_warps)
    tables = block_tables if with_slots else n_valid  # any tensor without slots: the kernel never reads it
    seqs = row_seq if with_slots else n_valid
    _write_kernel[grid](logits, n_valid, workspace, out, slots, tables, seqs, *strides, out.stride(0), slots.stride(0),
                        tables.stride(0), k, LEVELS=levels, BITS=radix_bits, CHUNK=chunk,
                        BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), PAGE=page or 1, WITH_SLOTS=with_slots,
                        num_warps=num_warps)
    return (out, slots) if with_slots else out
