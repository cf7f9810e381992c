"""FlexPrefill (Lai et al., ICLR 2025): per head, choose between a query-aware block pattern and a
vertical-slash pattern, each sized to cover a fraction gamma of the attention.

From the last block of queries (n = block_size rows, causal softmax over all keys):
- vertical[j] = mean_i A[i, j], slash[d] = mean_i A[i, p_i - d];
- counts: blocks needed to cover gamma of the token-level vertical (resp. slash) mass,
  cover // block_size + 1, clamped to [min_budget, max_budget] blocks;
- the switch: est = softmax(mean(last queries) · block-mean keys * scale) over key blocks is compared
  with the pooled vertical; sqrt(JS(est, vertical)) < tau means the pooled estimate is faithful, so
  the head is query-aware: its vertical/slash counts drop to min_budget and it adds the blocks of a
  pooled attention map softmax(block-mean q · block-mean k * scale) (causal, per query block),
  taken in descending order while their cumulative sum stays <= gamma * number of query blocks.
Vertical blocks v give (m, v) for every m >= v; slash block-distances s give (m, m - s); the sink
block and the diagonal (distance 0) are always kept. Sequences of at most max(2 blocks, min_budget)
tokens stay dense, as in the reference.

Departures from the reference code, on purpose: the cover count divides by block_size (the reference
divides by a hard-coded 128), tau defaults to 0.1 (a default of 0 silently disables the query-aware
branch), and the softmax scale is the layer's.
"""
from __future__ import annotations

import math

import torch

from sparse_llm.sparse.last_queries import (
    block_mean_keys,
    block_pool,
    diagonal_block_mask,
    last_query_profiles,
    ranks_below,
)


def cover_count(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Entries of x [..., N] (descending) whose cumulative sum stays <= gamma, plus one."""
    c = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    return (c <= gamma).sum(-1) + 1


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence of distributions along the last axis (0 log 0 = 0)."""
    m = (p + q) / 2
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return js.clamp(min=0).sqrt()


def global_cover_mask(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """scores [..., N] -> keep the entries taken in descending order while the cumulative sum stays
    <= budget; entry 0 is always kept (the reference pads its index list with 0)."""
    vals, order = torch.sort(scores, dim=-1, descending=True)
    take = torch.cumsum(vals, dim=-1) <= budget
    mask = torch.zeros_like(take).scatter_(-1, order, take)
    mask[..., 0] = True
    return mask


def pooled_query_blocks(q: torch.Tensor, kv_len: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Mean query of each block-aligned query block over its actual queries: [B, H, nqb, D], first block."""
    sq = q.shape[2]
    q0 = kv_len - sq
    qb0 = q0 // block_size
    left = q0 - qb0 * block_size
    nqb = (kv_len - 1) // block_size - qb0 + 1
    padded = torch.nn.functional.pad(q, (0, 0, left, nqb * block_size - left - sq))
    sums = padded.view(*q.shape[:2], nqb, block_size, q.shape[-1]).sum(-2)
    pos = qb0 * block_size + torch.arange(nqb * block_size, device=q.device).view(nqb, block_size)
    counts = ((pos >= q0) & (pos < kv_len)).sum(-1).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype), qb0


def flexprefill_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: int | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Block mask [B, H, nqb, nkb] for q [B, H, Sq, D] (the last Sq positions) over k [B, Hkv, Sk, D],
    the first query block, and which heads went query-aware [B, H]."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    dev = q.device
    nkb = -(-sk // block_size)
    qb0 = (sk - sq) // block_size
    nqb = (sk - 1) // block_size - qb0 + 1
    m_abs = qb0 + torch.arange(nqb, device=dev)
    causal = torch.arange(nkb, device=dev)[None, :] <= m_abs[:, None]  # [nqb, nkb]
    if sk <= max(2 * block_size, math.ceil(min_budget / block_size) * block_size):
        return causal.expand(b, h, nqb, nkb).clone(), qb0, torch.zeros(b, h, dtype=torch.bool, device=dev)
    min_b = math.ceil(min_budget / block_size)
    max_b = nkb if max_budget is None else min(nkb, math.ceil(max_budget / block_size))
    n = min(block_size, sq)
    vsum, ssum, mean_q = last_query_profiles(q, k, scale, n)
    vertical, slash = vsum / n, ssum / n
    cd = vertical.dtype
    n_vert = cover_count(vertical, gamma).div(block_size, rounding_mode="floor") + 1
    n_slash = cover_count(slash, gamma).div(block_size, rounding_mode="floor") + 1
    n_vert = n_vert.clamp(min=min_b).clamp(max=max_b)
    n_slash = n_slash.clamp(min=min_b).clamp(max=max_b)
    v_blocks = block_pool(vertical, block_size)  # [B, H, nkb]
    s_blocks = block_pool(slash, block_size)  # by block distance
    # The switch: does the pooled (block-mean) estimate reproduce the last block's true distribution?
    mean_k = block_mean_keys(k, block_size).to(cd).repeat_interleave(g, 1)  # [B, H, nkb, D]
    est = torch.softmax(torch.einsum("bhd,bhjd->bhj", mean_q, mean_k) * scale, dim=-1)
    query_aware = sqrt_js_divergence(est, v_blocks) < tau
    small = min(min_b, max_b)
    n_vert = torch.where(query_aware, small, n_vert)
    n_slash = torch.where(query_aware, small, n_slash)
    v_blocks[..., 0] = float("inf")
    s_blocks[..., 0] = float("inf")
    v_sel = ranks_below(v_blocks, n_vert)  # [B, H, nkb]
    s_sel = ranks_below(s_blocks, n_slash)
    mask = (v_sel[:, :, None, :] & causal) | diagonal_block_mask(s_sel, qb0, nqb)
    if bool(query_aware.any()):
        pooled_q, _ = pooled_query_blocks(q.to(cd), sk, block_size)  # [B, H, nqb, D]
        att = torch.einsum("bhmd,bhjd->bhmj", pooled_q, mean_k) * scale
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        qa = global_cover_mask(att.reshape(b, h, -1), gamma * nqb).view(b, h, nqb, nkb) & causal
        mask = mask | (qa & query_aware[:, :, None, None])
    return mask, qb0, query_aware
