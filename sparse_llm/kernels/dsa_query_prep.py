"""Indexer-query preparation for an fp8 indexer cache in one launch (Triton).

dsa_cache.prepare_indexer_query rotates q by the normalised Hadamard matrix, quantises it to e4m3 per (row,
head) with scale = max(amax, FP8_MIN_AMAX) / 448 and folds that scale into the head weight: about eight torch
kernels, several microseconds of a ~100 µs decode step once CUDA graphs remove the launch gaps. Here one
program per (row, head block) does [BLOCK_H, D] x [D, D] on the tensor cores, rounds the rotation to q's dtype
(as the torch matmul returns it), then the amax, the scale, the fp8 cast and the weight product.
The oracle is prepare_indexer_query itself; the two differ only where the fp32 accumulation order moves a
value across an fp8 rounding boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.backends.dsa_cache import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX, hadamard


@triton.jit
def _round_to_e4m3(y):
    """Round-to-nearest-even onto the e4m3 grid (3 mantissa bits; subnormal spacing 2^-9) in fp32, so the
    cast that follows is exact. The hardware cast rounds the same way; the Triton interpreter's cast drops
    the carry when rounding up to the next power of two (127.9 -> 64), which this sidesteps."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |t| < 2^22 to an integer, ties to even
    return ((y / step + magic) - magic) * step


@triton.jit
def _query_prep_kernel(
    Q, HAD, W, Q8, W8, stride_qr, stride_qh, stride_wr, stride_8r, stride_8h, stride_w8r, fp8_max, min_amax,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_d = tl.arange(0, D)
    q = tl.load(Q + r * stride_qr + offs_h[:, None] * stride_qh + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    had = tl.load(HAD + offs_d[:, None] * D + offs_d[None, :])
    x = tl.dot(q, had, input_precision=DOT_PRECISION).to(Q.dtype.element_ty).to(tl.float32)
    # IEEE divisions (Triton's `/` is approximate on fp32), as torch divides
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), 1), min_amax), fp8_max)
    q8 = _round_to_e4m3(tl.div_rn(x, scale[:, None])).to(Q8.dtype.element_ty)
    tl.store(Q8 + r * stride_8r + offs_h[:, None] * stride_8h + offs_d[None, :], q8, mask=h_mask[:, None])
    w = tl.load(W + r * stride_wr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(W8 + r * stride_w8r + offs_h, w * scale, mask=h_mask)


def prepare_indexer_query_fp8(q: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, H, D] (float), weights [R, H] -> (fp8 e4m3 [R, H, D], float32 [R, H]): what
    dsa_cache.prepare_indexer_query returns for an fp8 cache."""
    R, H, D = q.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"prepare_indexer_query_fp8: index_head_dim={D} must be a power of two >= 16")
    if weights.shape != (R, H):
        raise ValueError(f"prepare_indexer_query_fp8: weights must be [{R}, {H}] like q's rows and heads, "
                         f"got {tuple(weights.shape)}")
    if not q.dtype.is_floating_point or q.dtype == FP8_DTYPE:
        raise ValueError(f"prepare_indexer_query_fp8: q must be float32/bfloat16/float16, got {q.dtype}")
    q8 = torch.empty(R, H, D, dtype=FP8_DTYPE, device=q.device)
    w8 = torch.empty(R, H, dtype=torch.float32, device=q.device)
    if R == 0:
        return q8, w8
    q = q if q.stride(-1) == 1 else q.contiguous()
    had = hadamard(D, q.dtype, q.device)
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    _query_prep_kernel[(R, triton.cdiv(H, block_h))](
        q, had, weights, q8, w8, q.stride(0), q.stride(1), weights.stride(0), q8.stride(0), q8.stride(1),
        w8.stride(0), FP8_MAX, FP8_MIN_AMAX,
        H=H, D=D, BLOCK_H=block_h, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return q8, w8
