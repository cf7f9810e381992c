"""Per-step bookkeeping of a page-sparse decode, one launch each instead of dozens of tiny torch ops.

In a graph-captured decode step of a small batch every kernel costs ~2 µs however little it does; in torch the
current page's min/max refresh is ~30 ops and the page counting ~15, more than the sparse attention itself.

1. `refresh_current_page_minmax`: after the new K is written, recompute the channel-wise (min, max) of K over
   the valid tokens of each decode sequence's current page into the paged min/max cache
   ([num_blocks, 2, block_size // page_size, Hkv, D], RocketKV's KT cache). Rows with slot < 0 (padding rows
   of a replayed decode graph) write nothing. Torch reference: `TorchRocketBackend._update_current_page`.
2. `count_decode_pages`: per decode row, (total pages, pages not attended) summed over KV heads, into the
   per-sequence counters and a device-side layer total. Torch reference: the counts of `TorchRocketBackend`.
Both are exact (min/max and integer sums) and never sync with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import next_pow2

_KT_STORAGE = {torch.float8_e5m2: torch.uint8, torch.bfloat16: torch.int16}  # RocketKV's KT dtypes


@triton.jit
def _rne_bits(x, IS_E5M2: tl.constexpr):
    """Bits of float32 x rounded to nearest-even to float8_e5m2 (uint8) or bfloat16 (int16), as torch's
    `.to(dtype)` rounds (c10's fp8e5m2_from_fp32_value / round_to_nearest_even). Done on the bits because the
    Triton interpreter's float downcast drops the carry of a rounded-up mantissa (1.875 -> 1.0 in e5m2)."""
    bits = x.to(tl.uint32, bitcast=True)
    if IS_E5M2:
        sign = bits & 0x80000000
        a = bits ^ sign
        normal = (a - (112 << 23) + 0xFFFFF + ((a >> 21) & 1)) >> 21  # rebias 127 -> 15, round half to even
        denorm = ((a.to(tl.float32, bitcast=True) + 128.0).to(tl.uint32, bitcast=True) - (134 << 23))
        out = tl.where(a < (113 << 23), denorm, normal)  # below 2^-14: subnormal e5m2
        out = tl.where(a >= (143 << 23), tl.where(a > 0x7F800000, 0x7F, 0x7C), out)  # overflow -> inf, NaN
        return ((out & 0xFF) | (sign >> 24)).to(tl.uint8)
    else:
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def _refresh_kernel(
    KV, KT, BT, LENS, SLOTS,
    stride_kvb, stride_kvs, stride_kvh, stride_ktb, stride_ktm, stride_ktp, stride_kth, stride_bt,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr, IS_E5M2: tl.constexpr,
):
    # grid = (num_decodes,): one program rebuilds one sequence's current page for all KV heads.
    # KT is the min/max cache viewed as its storage integers (uint8 for float8_e5m2, int16 for bfloat16).
    n = tl.program_id(0)
    slot = tl.load(SLOTS + n)
    if slot < 0:
        return
    kv_len = tl.load(LENS + n)
    first = (kv_len - 1) // PAGE_SIZE * PAGE_SIZE  # first cache position of the current page
    blk = tl.load(BT + n.to(tl.int64) * stride_bt + first // BLOCK_SIZE).to(tl.int64)
    off = first % BLOCK_SIZE  # a page never straddles blocks (page_size divides block_size)
    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_ok = (heads < NUM_KV_HEADS)[:, None]
    src = KV + blk * stride_kvb + heads[:, None] * stride_kvh + offs_d[None, :]
    lo = tl.full([BLOCK_H, HEAD_DIM], float("inf"), tl.float32)
    hi = tl.full([BLOCK_H, HEAD_DIM], float("-inf"), tl.float32)
    for t in tl.static_range(PAGE_SIZE):
        ok = h_ok & (first + t < kv_len)
        k = tl.load(src + (off + t) * stride_kvs, mask=ok, other=0.0).to(tl.float32)
        lo = tl.where(ok, tl.minimum(lo, k), lo)
        hi = tl.where(ok, tl.maximum(hi, k), hi)
    dst = KT + blk * stride_ktb + (off // PAGE_SIZE) * stride_ktp + heads[:, None] * stride_kth + offs_d[None, :]
    tl.store(dst, _rne_bits(lo, IS_E5M2), mask=h_ok)
    tl.store(dst + stride_ktm, _rne_bits(hi, IS_E5M2), mask=h_ok)


def refresh_current_page_minmax(
    cache_kv: torch.Tensor, kt: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    slots: torch.Tensor, page_size: int,
) -> None:
    """kt[page of cache position seq_lens - 1] = (min, max) of K over the page's first seq_lens-derived valid tokens,
    for every row with slots >= 0. cache_kv [num_blocks, 2, bs, Hkv, D]; kt [num_blocks, 2, bs // page_size, Hkv, D];
    block_tables int32 [B, *]; seq_lens int32 [B] (including the token just written); slots int64 [B]."""
    nb, two, bs, hkv, d = cache_kv.shape
    b = seq_lens.shape[0]
    if two != 2 or kt.shape != (kt.shape[0], 2, bs // page_size, hkv, d) or bs % page_size:
        raise ValueError(f"kt {tuple(kt.shape)} does not match cache_kv {tuple(cache_kv.shape)} with page_size={page_size}")
    if d != next_pow2(d) or cache_kv.stride(-1) != 1 or kt.stride(-1) != 1:
        raise ValueError(f"head_dim={d} must be a power of two, contiguous in cache_kv and kt")
    if slots.shape != (b,) or block_tables.shape[0] < b:
        raise ValueError(f"slots {tuple(slots.shape)} / block_tables {tuple(block_tables.shape)} vs {b} decode rows")
    if kt.dtype not in _KT_STORAGE:
        raise ValueError(f"min/max cache dtype {kt.dtype}: allowed {sorted(map(str, _KT_STORAGE))}")
    if b == 0:
        return
    _refresh_kernel[(b,)](
        cache_kv, kt.view(_KT_STORAGE[kt.dtype]), block_tables, seq_lens, slots,
        cache_kv.stride(0), cache_kv.stride(2), cache_kv.stride(3),
        kt.stride(0), kt.stride(1), kt.stride(2), kt.stride(3), block_tables.stride(0),
        NUM_KV_HEADS=hkv, BLOCK_H=next_pow2(hkv), HEAD_DIM=d, BLOCK_SIZE=bs, PAGE_SIZE=page_size,
        IS_E5M2=kt.dtype == torch.float8_e5m2,
    )


@triton.jit
def _count_kernel(
    PAGES, LENS, SLOTS, DENSE, SEQ_STATS, TOTALS,
    stride_pn, stride_ss, page_size,
    NUM_KV_HEADS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_SEQ_STATS: tl.constexpr,
):
    # grid = (num_decodes,): pages are [N, Hkv, K] contiguous in (Hkv, K); -1 = unused slot.
    n = tl.program_id(0)
    if tl.load(SLOTS + n) < 0:
        return
    offs = tl.arange(0, BLOCK)
    listed = tl.load(PAGES + n.to(tl.int64) * stride_pn + offs, mask=offs < NUM_KV_HEADS * K, other=-1)
    kv_len = tl.load(LENS + n).to(tl.int64)
    total = (kv_len + page_size - 1) // page_size * NUM_KV_HEADS
    attended = tl.sum((listed >= 0).to(tl.int64), 0) + NUM_KV_HEADS  # plus each head's current page
    if HAS_DENSE:
        if tl.load(DENSE + n) != 0:
            attended = total
    if HAS_SEQ_STATS:
        tl.atomic_add(SEQ_STATS + n.to(tl.int64) * stride_ss, total)
        tl.atomic_add(SEQ_STATS + n.to(tl.int64) * stride_ss + 1, total - attended)
    tl.atomic_add(TOTALS, total)
    tl.atomic_add(TOTALS + 1, total - attended)


def count_decode_pages(
    pages: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor, page_size: int, totals: torch.Tensor,
    seq_stats: torch.Tensor | None = None, dense: torch.Tensor | None = None,
) -> None:
    """totals[0] += Σ total pages, totals[1] += Σ pages not attended, over rows with slots >= 0; the same per row
    into seq_stats [B, 2] when given. pages int32 [B, Hkv, K] (listed pages, -1 = unused; the current page is
    attended too); dense bool/int8 [B] marks rows that attended every page. totals and seq_stats are int64."""
    b, hkv, k = pages.shape
    if totals.dtype != torch.int64 or totals.shape != (2,):
        raise ValueError(f"totals must be int64 [2], got {totals.dtype} {tuple(totals.shape)}")
    if seq_stats is not None and (seq_stats.dtype != torch.int64 or seq_stats.shape != (b, 2) or seq_stats.stride(1) != 1):
        raise ValueError(f"seq_stats must be int64 [{b}, 2], got {seq_stats.dtype} {tuple(seq_stats.shape)}")
    if k and (pages.stride(2) != 1 or pages.stride(1) != k) or seq_lens.shape != (b,) or slots.shape != (b,):
        raise ValueError(f"pages {tuple(pages.shape)} must be contiguous per row; seq_lens/slots must be [{b}]")
    if b == 0:
        return
    _count_kernel[(b,)](
        pages, seq_lens, slots, dense if dense is not None else slots, seq_stats if seq_stats is not None else totals,
        totals, pages.stride(0), seq_stats.stride(0) if seq_stats is not None else 0, page_size,
        NUM_KV_HEADS=hkv, K=k, BLOCK=max(2, next_pow2(max(1, hkv * k))), HAS_DENSE=dense is not None,
        HAS_SEQ_STATS=seq_stats is not None,
    )
