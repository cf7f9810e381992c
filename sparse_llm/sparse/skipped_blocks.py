"""Skipped blocks as block means: a floor on every query row's attention outside its selection.

A block-sparse prefill renormalises each row's softmax over the blocks its query block kept. That is
fine for the rows the estimate describes, but an estimate scores a query *block* (XAttention: summed
antidiagonal mass; FlexPrefill: a pooled query or the last query block), so a few rows whose attention
sits elsewhere -- one token of every haystack sentence looking at the needle, or rows spreading their
mass over many old blocks -- lose almost all of it (SmolLM2: 3-10% kept; docs/algorithms.md, sessions 7
and 8) and their output becomes the average of the local window instead.

`skipped_blocks="mean"` gives each such row a first-order account of what it skipped: every block that
lies wholly before the query tile and was not kept enters the softmax as one pseudo-key, the block's
mean key k̄ and mean value v̄, with logit scale * q·k̄ + ln(block_size) (a block of equal keys would
contribute exactly that). By Jensen the pseudo-key never over-weights a block (exp(q·k̄) <= mean exp(q·k)),
so rows whose kept blocks hold their mass barely change. Cost: one key per skipped block, 1/block_size
of the skipped work, counted as attended pairs in the sparsity.

This module is the torch reference (and the CPU path): block means, the skipped-block flags of a
selection, the pseudo-key attention with its log-sum-exp, and the merge with the kept-block output.
"""
from __future__ import annotations

import math

import torch

from sparse_llm.sparse.block_selection import BlockSelection, row_ids

SKIPPED_BLOCKS = ("drop", "mean")


def check_skipped_blocks(value: str) -> str:
    if value not in SKIPPED_BLOCKS:
        raise ValueError(f"skipped_blocks={value!r}; allowed: {', '.join(SKIPPED_BLOCKS)}")
    return value


def block_means(k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k / v [Lk, Hkv, D] -> (k̄, v̄) float32 (float64 for float64 input) [n_full, Hkv, D]: the mean of each
    whole block (a trailing partial block is never wholly before a query tile, so it has no mean)."""
    cd = torch.float64 if k.dtype == torch.float64 else torch.float32
    n = k.shape[0] // block_size
    kb = k[: n * block_size].to(cd).view(n, block_size, *k.shape[1:]).mean(1)
    vb = v[: n * block_size].to(cd).view(n, block_size, *v.shape[1:]).mean(1)
    return kb, vb


def skipped_flags(selection: BlockSelection, tile_start: torch.Tensor, n_full: int) -> torch.Tensor:
    """[n_tiles, Hs, n_full] bool: block j ends at or before the tile's first row and the row did not list it."""
    nt, hs = tile_start.shape[0], selection.num_heads
    dev = selection.block_offsets.device
    listed = torch.zeros(selection.num_rows, n_full + 1, dtype=torch.bool, device=dev)
    idx = selection.block_indices.long().clamp(max=n_full)
    listed[row_ids(selection.block_offsets, idx.numel()), idx] = True
    before = torch.arange(n_full, device=dev)[None, :] * selection.block_size + selection.block_size <= tile_start.to(dev).long()[:, None]
    return (~listed[:, :n_full]).view(nt, hs, n_full) & before[:, None, :]


def skipped_block_attention(
    q: torch.Tensor,
    kbar: torch.Tensor,
    vbar: torch.Tensor,
    tile_start: torch.Tensor,
    skipped: torch.Tensor,
    scale: float,
    block_size: int,
    kv_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Lq, H, D] (the last Lq of kv_len positions) over the pseudo-keys of its tile's skipped
    blocks. Returns (output [Lq, H, Dv] in the compute dtype, natural log-sum-exp [Lq, H]; -inf and a zero
    output where a row skipped nothing)."""
    lq, h, d = q.shape
    n_full, hkv, dv = vbar.shape
    cd = kbar.dtype
    dev = q.device
    hs = skipped.shape[1]
    qpos = torch.arange(kv_len - lq, kv_len, device=dev)
    t = torch.searchsorted(tile_start.to(dev).long(), qpos, right=True) - 1  # tile of each row
    allowed = skipped[t]  # [Lq, Hs, n_full]
    allowed = allowed.repeat_interleave(h // hs, 1)  # [Lq, H, n_full]
    g = h // hkv
    s = torch.einsum("qhd,nhd->qhn", q.to(cd), kbar.repeat_interleave(g, 1)) * scale + math.log(block_size)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf where nothing is allowed
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("qhn,nhd->qhd", p, vbar.repeat_interleave(g, 1))
    return out, lse


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted merge of two normalised partial outputs [.., D] with natural log-sum-exps [..]."""
    big = torch.maximum(lse1, lse2)
    big = torch.where(torch.isinf(big), torch.zeros_like(big), big)
    w1, w2 = torch.exp(lse1 - big), torch.exp(lse2 - big)
    den = w1 + w2
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / den[..., None]


def skipped_pairs(skipped: torch.Tensor, tile_start: torch.Tensor, tile_rows: int, q_len: int, kv_len: int,
                  num_heads: int) -> int:
    """Pseudo-key work as (query, key) pairs summed over query heads: each real row of a tile attends one
    pseudo-key per skipped block of its selection head."""
    start = tile_start.long().to(skipped.device)
    rows = (torch.clamp(start + tile_rows, max=kv_len) - torch.clamp(start, min=kv_len - q_len)).clamp(min=0)
    per_head = num_heads // skipped.shape[1]
    return int((skipped.sum(-1).sum(-1) * rows).sum()) * per_head
