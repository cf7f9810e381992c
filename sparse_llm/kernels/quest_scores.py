"""Quest page scores straight from the paged min/max cache, in one pass (decode's critical path).

score[n, h, p] = sum_d max(q_d min_d, q_d max_d) = max(q, 0) · max_p + min(q, 0) · min_p
for every page p of decode n, read through the block table (page p lives in block table[p // ppb],
slot p % ppb). One program per (decode, KV head, chunk of BLOCK_P pages) scores the whole GQA group
with two small tensor-core dots in the cache dtype (the group's rows padded to 16). Pages past the sequence get -inf and the page
holding the current token +inf, so a plain top-k picks the selection.
Torch reference: `sparse.quest.page_scores` on the gathered min/max plus the same masking.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import next_pow2
from sparse_llm.kernels.tuning import interpreting


@triton.jit
def _quest_scores_kernel(
    Q, MM, BT, LENS, OUT,
    stride_qn, stride_qh,
    stride_mb, stride_ms, stride_mk, stride_mh,
    stride_bt, stride_on, stride_oh,
    max_pages, page_size, head_dim,
    GROUP: tl.constexpr, PPB: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    pages = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_len = tl.load(LENS + n)
    n_pages = (kv_len + page_size - 1) // page_size
    in_seq = pages < n_pages
    q = tl.load(Q + n.to(tl.int64) * stride_qn + (kvh * GROUP + rows)[:, None] * stride_qh + offs_d[None, :],
                mask=(rows < GROUP)[:, None] & d_ok[None, :], other=0.0)
    blk = tl.load(BT + n.to(tl.int64) * stride_bt + pages // PPB, mask=in_seq, other=0).to(tl.int64)
    base = MM + blk * stride_mb + (pages % PPB) * stride_ms + kvh * stride_mh
    ok = in_seq[:, None] & d_ok[None, :]
    lo = tl.load(base[:, None] + offs_d[None, :], mask=ok, other=0.0)  # [BLOCK_P, D], cache dtype
    hi = tl.load(base[:, None] + stride_mk + offs_d[None, :], mask=ok, other=0.0)
    zero = tl.zeros_like(q)
    # Tensor-core dots in the cache dtype with fp32 accumulation (fp32 inputs: exact fp32).
    s = tl.dot(tl.maximum(q, zero).to(hi.dtype), tl.trans(hi), input_precision=DOT_PRECISION)
    s += tl.dot(tl.minimum(q, zero).to(lo.dtype), tl.trans(lo), input_precision=DOT_PRECISION)  # [ROWS, BLOCK_P]
    s = tl.where(in_seq[None, :], s, float("-inf"))
    s = tl.where((pages == n_pages - 1)[None, :], float("inf"), s)
    out = OUT + n.to(tl.int64) * stride_on + (kvh * GROUP + rows)[:, None] * stride_oh + pages[None, :]
    tl.store(out, s, mask=(rows < GROUP)[:, None] & (pages < max_pages)[None, :])


def quest_scores_paged(
    q: torch.Tensor,
    minmax: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    max_pages: int,
) -> torch.Tensor:
    """q [N, H, D]; minmax [num_blocks, pages_per_block, 2, Hkv, D]; block_tables int32 [N, blocks];
    seq_lens int32 [N] -> float32 scores [N, H, max_pages] (-inf past the end, +inf on the current page)."""
    n, h, d = q.shape
    ppb, hkv = minmax.shape[1], minmax.shape[3]
    if h % hkv:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={hkv}")
    if q.stride(-1) != 1 or minmax.stride(-1) != 1:
        raise ValueError("q and minmax must be contiguous in head_dim")
    out = torch.empty(n, h, max_pages, dtype=torch.float32, device=q.device)
    if n == 0 or max_pages == 0:
        return out
    g = h // hkv
    block_p = 16 if interpreting() else 128
    grid = (n, hkv, triton.cdiv(max_pages, block_p))
    _quest_scores_kernel[grid](
        q, minmax, block_tables, seq_lens, out,
        q.stride(0), q.stride(1),
        minmax.stride(0), minmax.stride(1), minmax.stride(2), minmax.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        max_pages, page_size, d,
        GROUP=g, PPB=ppb, ROWS=max(16, next_pow2(g)), BLOCK_P=block_p, BLOCK_D=max(16, next_pow2(d)),
        DOT_PRECISION="ieee" if minmax.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out
