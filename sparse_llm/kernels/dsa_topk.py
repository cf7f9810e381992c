"""Exact, deterministic row-wise top-k positions by radix select (Triton): DSA's token selection.

For each row r: the positions of the k largest of logits[r, :n_valid[r]]; among values equal to the k-th
largest, the lowest positions win. Output: the positions above the k-th value in increasing order, then the
tied ones in increasing order; rows with n_valid <= k return 0..n_valid-1 then -1.
(The torch oracle, sparse_llm.backends.dsa_torch.topk_positions_ref, applies the same tie rule.)

Floats are mapped to integer keys with the same order (negatives' bits flipped, non-negatives shifted above
them), and the k-th largest key is found one byte at a time, most significant first:
  hist pass L (L = 0..3), grid (rows, chunks): each chunk re-derives the bytes fixed so far from the
      histograms of passes < L, then histograms byte L of its keys whose higher bytes match (tl.histogram,
      then 256 atomic adds into hist[r, L]). From hist[r, L] the threshold byte is the largest b with
      #(keys in bins >= b) >= need; need drops by the count in the bins above b.
  count pass: each chunk stores how many of its keys are > threshold and == threshold.
  write pass: each chunk adds up the counts of the chunks before it (a prefix sum over <= a few hundred
      integers) and writes its selected positions at those offsets: deterministic, no atomics.
Six passes over the row, each parallel over chunks, no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.tuning import interpreting

NUM_BINS = 256
LEVELS = 4
HIST_WORDS = LEVELS * NUM_BINS  # per row: 4 histograms, then (above, tie) counts per chunk


@triton.jit
def _ordered_key(x):
    """float32 -> int64 in [0, 2^32) with the same order as the floats."""
    i = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(i < 0, -i - 1, i + 2147483648)


@triton.jit
def _threshold_prefix(ws_row, k, LEVEL: tl.constexpr):
    """The bytes of the k-th largest key fixed by passes < LEVEL, and how many keys with exactly that prefix
    must still be taken."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.int64)
    need = k
    for j in tl.static_range(LEVEL):
        hist = tl.load(ws_row + j * 256 + bins)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        b = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
        need = need - tl.sum(tl.where(bins > b, hist, 0), 0)
        prefix = prefix * 256 + b
    return prefix, need


@triton.jit
def _load_keys(LOGITS, r, stride_lr, offs, n_valid):
    mask = offs < n_valid
    return _ordered_key(tl.load(LOGITS + r * stride_lr + offs, mask=mask, other=0.0)), mask


@triton.jit
def _radix_hist_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, k, LEVEL: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    n_valid = tl.load(ROW_LEN + r)
    if (n_valid > k) & (start < n_valid):
        ws_row = WS + r * stride_ws
        prefix, need = _threshold_prefix(ws_row, k, LEVEL)
        key, mask = _load_keys(LOGITS, r, stride_lr, start + tl.arange(0, CHUNK), n_valid)
        shift: tl.constexpr = 24 - 8 * LEVEL
        if LEVEL > 0:
            mask = mask & ((key >> (shift + 8)) == prefix)
        hist = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=mask)
        tl.atomic_add(ws_row + LEVEL * 256 + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit
def _count_kernel(LOGITS, ROW_LEN, WS, stride_lr, stride_ws, k, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_valid = tl.load(ROW_LEN + r)
    if (n_valid > k) & (c * CHUNK < n_valid):
        ws_row = WS + r * stride_ws
        threshold, need = _threshold_prefix(ws_row, k, 4)
        key, mask = _load_keys(LOGITS, r, stride_lr, c * CHUNK + tl.arange(0, CHUNK), n_valid)
        tl.store(ws_row + 1024 + 2 * c, tl.sum((mask & (key > threshold)).to(tl.int32), 0))
        tl.store(ws_row + 1025 + 2 * c, tl.sum((mask & (key == threshold)).to(tl.int32), 0))


@triton.jit
def _write_kernel(LOGITS, ROW_LEN, WS, OUT, stride_lr, stride_ws, stride_or, k, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_valid = tl.load(ROW_LEN + r)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    if n_valid <= k:  # every valid position, in order, then -1
        tl.store(OUT + r * stride_or + offs, tl.where(offs < n_valid, offs, -1), mask=offs < k)
    elif c * CHUNK < n_valid:
        ws_row = WS + r * stride_ws
        threshold, need = _threshold_prefix(ws_row, k, 4)
        earlier = tl.arange(0, BLOCK_C) < c
        base_above = tl.sum(tl.load(ws_row + 1024 + 2 * tl.arange(0, BLOCK_C), mask=earlier, other=0), 0)
        base_tie = tl.sum(tl.load(ws_row + 1025 + 2 * tl.arange(0, BLOCK_C), mask=earlier, other=0), 0)
        key, mask = _load_keys(LOGITS, r, stride_lr, offs, n_valid)
        above = (mask & (key > threshold)).to(tl.int32)
        tl.store(OUT + r * stride_or + base_above + tl.cumsum(above, 0) - 1, offs, mask=above != 0)
        tie = (mask & (key == threshold)).to(tl.int32)
        rank = base_tie + tl.cumsum(tie, 0) - 1
        tl.store(OUT + r * stride_or + (k - need) + rank, offs, mask=(tie != 0) & (rank < need))


def topk_positions(logits: torch.Tensor, n_valid: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """logits float32 [R, N] (only [:, :n_valid] read), n_valid int32 [R] (<= N) -> int32 [R, k], -1 padded."""
    if logits.dtype != torch.float32:
        raise ValueError(f"topk_positions needs float32 logits, got {logits.dtype}")
    if k < 1:
        raise ValueError(f"topk_positions: k must be >= 1, got {k}")
    R, N = logits.shape
    out = torch.empty(R, k, dtype=torch.int32, device=logits.device)
    if R == 0:
        return out
    if chunk is None:  # the largest chunk that still gives ~2 programs per SM (H100: 132), within [512, 4096]
        chunk = 256 if interpreting() else 4096
        while chunk > 512 and R * triton.cdiv(N, chunk) < 264:
            chunk //= 2
    num_chunks = triton.cdiv(max(N, k), chunk)
    workspace = torch.zeros(R, HIST_WORDS + 2 * num_chunks, dtype=torch.int32, device=logits.device)
    grid = (R, num_chunks)
    strides = (logits.stride(0), workspace.stride(0))
    for level in range(LEVELS):
        _radix_hist_kernel[grid](logits, n_valid, workspace, *strides, k, LEVEL=level, CHUNK=chunk, num_warps=4)
    _count_kernel[grid](logits, n_valid, workspace, *strides, k, CHUNK=chunk, num_warps=4)
    _write_kernel[grid](logits, n_valid, workspace, out, *strides, out.stride(0), k, CHUNK=chunk,
                        BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), num_warps=4)
    return out
