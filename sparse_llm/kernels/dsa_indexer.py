"""DSA lightning-indexer logits over the paged indexer-key cache (Triton).

For each query row r (a token of sequence row_seq[r] that may look at keys [0, n_valid[r])):
    I[r, s] = scale[s] * sum_h w[r, h] * relu(q[r, h, :] . k[s, :])       for s < n_valid[r]
where k is the cached key: fp8 e4m3 with a float32 per-token scale (then q is fp8 too, its per-head scales
folded into w, and the dot runs fp8 x fp8 -> fp32 as in DeepSeek-V3.2's fp8_index), or unquantised
(scale = 1). The per-token scale is positive, so it factors out of the ReLU and the head sum.
Entries s >= n_valid[r] are left unwritten: the top-k kernel never reads them.

Grid: (rows, spans); a program loads its row's queries once ([H, D]) and walks TILES tiles of BLOCK_N keys,
each a [H, D] x [D, BLOCK_N] dot (or [BLOCK_N, D] x [D, H] with KEYS_AS_M), ReLU, then a weighted reduction
over heads.
The torch oracle is sparse_llm.backends.dsa_torch.indexer_logits_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.tuning import interpreting


@triton.jit
def _indexer_logits_kernel(
    Q, W, K_CACHE, K_SCALE, BLOCK_TABLES, ROW_SEQ, ROW_LEN, OUT,
    stride_qr, stride_qh, stride_wr, stride_kb, stride_kt, stride_sb, stride_bt, stride_or,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, HAS_SCALE: tl.constexpr,
    KEYS_AS_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    span_start = tl.program_id(1) * (BLOCK_N * TILES)
    n_valid = tl.load(ROW_LEN + r)
    if span_start < n_valid:
        seq = tl.load(ROW_SEQ + r).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(Q + r * stride_qr + offs_h[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_h[:, None] < H) & d_mask[None, :], other=0.0)
        w = tl.load(W + r * stride_wr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        for t in range(TILES):
            offs_n = span_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_valid
            block = tl.load(BLOCK_TABLES + seq * stride_bt + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            offset = offs_n % PAGE
            k = tl.load(K_CACHE + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if KEYS_AS_M:  # keys on the MMA's M side: the head sum stays within a warp's registers
                s = tl.dot(k.to(q.dtype), tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
                logits = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)
            else:  # heads on M: the head sum crosses the warps of the warpgroup
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
                logits = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
            if HAS_SCALE:
                logits = logits * tl.load(K_SCALE + block * stride_sb + offset, mask=n_mask, other=0.0)
            tl.store(OUT + r * stride_or + offs_n, logits, mask=n_mask)


def indexer_logits(
    q: torch.Tensor,  # [R, H, D]: fp8 e4m3 with an fp8 cache (dsa_cache.prepare_indexer_query), else float
    weights: torch.Tensor,  # float32 [R, H] (q's scales folded in when q is fp8)
    k_cache: torch.Tensor,  # [num_blocks, page, D], fp8 e4m3 or float
    k_scale: torch.Tensor | None,  # float32 [num_blocks, page] for fp8, else None
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    row_seq: torch.Tensor,  # int32 [R]
    n_valid: torch.Tensor,  # int32 [R]: keys [0, n_valid) are scored
    max_len: int,  # >= max(n_valid): the logits' width
    block_n: int | None = None,
    tiles: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    keys_as_m: bool = False,
) -> torch.Tensor:  # float32 [R, max_len]
    """`keys_as_m` computes k . q^T ([BLOCK_N, heads]) instead of q . k^T, so the weighted ReLU sum over heads
    reduces along the MMA's N axis (in registers) rather than across warps."""
    R, H, D = q.shape
    fp8 = torch.float8_e4m3fn
    if (k_cache.dtype == fp8) != (k_scale is not None) or (q.dtype == fp8) != (k_cache.dtype == fp8):
        raise ValueError(
            f"indexer_logits: an fp8 key cache needs fp8 queries and k_scale, a float one neither; got "
            f"q {q.dtype}, k_cache {k_cache.dtype}, k_scale {'given' if k_scale is not None else 'None'}"
        )
    out = torch.empty(R, max(max_len, 1), dtype=torch.float32, device=q.device)
    if R == 0 or max_len == 0:
        return out
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"indexer_logits: block_n={block_n} must be a power of two >= 16")
    for name, value in (("tiles", tiles), ("num_stages", num_stages), ("num_warps", num_warps)):
        if value is not None and value < 1:
            raise ValueError(f"indexer_logits: {name}={value} must be >= 1")
    # From a sweep on an H100 (session 1): 128-key tiles, 2 per program, 4 warps, 2 stages.
    block_n = block_n or (16 if interpreting() else 128)
    tiles = tiles or (1 if interpreting() else 2)
    num_stages = num_stages or (1 if interpreting() else 2)
    block_h = max(16, triton.next_power_of_2(H))
    block_d = max(16, triton.next_power_of_2(D))
    scale = k_scale if k_scale is not None else weights  # any tensor: the kernel reads it only when HAS_SCALE
    grid = (R, triton.cdiv(max_len, block_n * tiles))
    _indexer_logits_kernel[grid](
        q, weights, k_cache, scale, block_tables, row_seq, n_valid, out,
        q.stride(0), q.stride(1), weights.stride(0), k_cache.stride(0), k_cache.stride(1),
        scale.stride(0), block_tables.stride(0), out.stride(0),
        H=H, D=D, BLOCK_H=block_h, BLOCK_D=block_d, PAGE=k_cache.shape[1], BLOCK_N=block_n, TILES=tiles,
        HAS_SCALE=k_scale is not None, KEYS_AS_M=keys_as_m, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
