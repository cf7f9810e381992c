"""Write this step's K/V into the paged cache through the slot mapping (vLLM's reshape_and_cache).

cache_kv: [num_blocks, 2, block_size, Hkv, D] (FlashInfer's NHD layout); slot = block * block_size +
offset; slot < 0 means "do not write" (e.g. padding tokens). Torch reference: `base.write_kv`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import next_pow2


@triton.jit
def _kv_write_kernel(
    K, V, CACHE, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_cp, stride_ch,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # grid = (num_tokens,): one program copies one token's [Hkv, D] key and value rows.
    tok = tl.program_id(0)
    slot = tl.load(SLOTS + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    src = offs_h[:, None] * stride_kh + offs_d[None, :]
    dst = CACHE + blk * stride_cb + off * stride_cp + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(K + tok.to(tl.int64) * stride_kt + src, mask=mask)
    tl.store(dst, k.to(CACHE.dtype.element_ty), mask=mask)
    v = tl.load(V + tok.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(dst + stride_ckv, v.to(CACHE.dtype.element_ty), mask=mask)


def kv_write(cache_kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache_kv[slot // bs, 0/1, slot % bs] = k/v[token] for every token whose slot is >= 0."""
    num_tokens, hkv, d = k.shape
    if cache_kv.dim() != 5 or cache_kv.shape[1] != 2 or tuple(cache_kv.shape[3:]) != (hkv, d):
        raise ValueError(
            f"cache_kv shape {tuple(cache_kv.shape)} does not match [num_blocks, 2, block_size, {hkv}, {d}]"
        )
    if v.shape != k.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} must agree "
            f"on num_tokens={num_tokens}"
        )
    if d != next_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of two for the Triton KV write")
    if k.stride(2) != 1 or v.stride(2) != 1 or cache_kv.stride(4) != 1:
        raise ValueError("k, v and cache_kv must be contiguous in head_dim")
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        k, v, cache_kv, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache_kv.stride(0), cache_kv.stride(1), cache_kv.stride(2), cache_kv.stride(3),
        NUM_KV_HEADS=hkv, BLOCK_H=next_pow2(hkv), HEAD_DIM=d, PAGE_SIZE=cache_kv.shape[2],
    )
