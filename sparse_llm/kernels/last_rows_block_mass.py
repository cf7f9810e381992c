"""The last query rows' softmax mass per key block, without their [rows, Sk] probability matrix in memory.

XAttention's `vertical_gamma` needs, per head, how much of the last n (<= block_size) query rows' attention
falls in each key block. The torch path (sparse/last_queries.py) materialises the n x Sk probabilities in
float32 for every head: at 128K that is 2 GB of traffic and ~11 ms on an H100. Here one program per (key
block, batch x head) computes that block's scores for the n rows and stores each row's block max and
exp-sum (log2 domain); two small torch passes over [B, H, nkb, n] then give every row's log-sum-exp and the
block masses. GQA native: query head h reads KV head h // group.

Torch reference: `sparse.last_queries.last_query_profiles` + `block_pool` (tests compare both).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _block_row_stats_kernel(
    Q, K, M, L,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kh, stride_ks,
    stride_mb, stride_mh, stride_mk,
    num_heads, group, n_rows, kv_len, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    # grid = (key blocks, B * heads)
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    rows = tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    keys = kb * BLOCK_KV + tl.arange(0, BLOCK_KV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr + dims[None, :],
                mask=(rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM), other=0.0)
    k = tl.load(K + b * stride_kb + (h // group) * stride_kh + keys[:, None] * stride_ks + dims[None, :],
                mask=(keys[:, None] < kv_len) & (dims[None, :] < HEAD_DIM), other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    qpos = kv_len - n_rows + rows
    s = tl.where((keys[None, :] <= qpos[:, None]) & (rows[:, None] < n_rows), s, float("-inf"))
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row with no causal key here: exp2(-inf) = 0, l = 0
    l_sum = tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    out = b * stride_mb + h * stride_mh + kb * stride_mk + rows
    tl.store(M + out, m)
    tl.store(L + out, l_sum)


def last_rows_block_mass_triton(q: torch.Tensor, k: torch.Tensor, scale: float, n: int, block_size: int) -> torch.Tensor:
    """q [B, H, Sq, D] (the last Sq of Sk positions), k [B, Hkv, Sk, D] -> [B, H, nkb] float32: the mean over the
    last n query rows of their causal softmax mass on each key block of block_size keys."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    n = min(n, sq)
    if n > 128 or block_size not in (16, 32, 64, 128):
        raise ValueError(f"last_rows_block_mass: need n <= 128 and block_size in 16/32/64/128, got n={n}, block_size={block_size}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("last_rows_block_mass: q and k need a contiguous last (head_dim) axis")
    nkb = -(-sk // block_size)
    block_q = max(16, triton.next_power_of_2(n))
    last = q[:, :, sq - n:]
    m = torch.empty(b, h, nkb, block_q, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    _block_row_stats_kernel[(nkb, b * h)](
        last, k, m, l_sum,
        last.stride(0), last.stride(1), last.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        h, h // hkv, n, sk, scale * math.log2(math.e),
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_KV=block_size,
        num_warps=4 if block_size * block_q <= 64 * 128 else 8,
    )
    t = (m + torch.log2(l_sum))[..., :n]  # log2 of each row's exp-sum in each block; -inf where none
    lse = torch.logsumexp(t * math.log(2.0), dim=2, keepdim=True) / math.log(2.0)  # [B, H, 1, n]
    return torch.exp2(t - lse).sum(-1) / n
