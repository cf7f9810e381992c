"""MInference's vertical-slash pattern (Jiang et al., NeurIPS 2024): a few key columns every query sees
(vertical lines) plus a few diagonals (slash lines), estimated from the last `last_q` queries.

From the causal softmax A of the last last_q queries over all keys:
- vertical[j] = sum_i A[i, j]; the first `sink_tokens` keys are forced; the top `vertical_size` keys
  become the vertical lines;
- slash[d] = sum_i A[i, p_i - d] per distance d >= 0; the `local_diagonals` nearest distances are
  forced; the top `slash_size` distances become the slash lines.
Execution on the block-sparse kernel: every KV block that a slash line crosses inside a query tile is
listed for that tile (a line at distance d crosses block offsets d // bs and, unless d is a multiple
of bs, d // bs + 1), and each vertical line not already inside a listed block is a gathered single
KV column of the tile (only if it is causal for some row of the tile).
"""
from __future__ import annotations

import torch

from sparse_llm.sparse.last_queries import diagonal_block_mask, last_query_profiles


def vertical_slash_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    vertical_size: int,
    slash_size: int,
    last_q: int = 64,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical key positions [B, H, V] ascending, slash distances [B, H, S]) of q [B, H, Sq, D]
    (the last Sq positions) over k [B, Hkv, Sk, D]."""
    sk = k.shape[2]
    vertical, slash, _ = last_query_profiles(q, k, scale, last_q)
    vertical[..., :sink_tokens] = float("inf")
    slash[..., :local_diagonals] = float("inf")
    v_idx = torch.topk(vertical, min(vertical_size, sk), dim=-1).indices.sort(-1).values
    s_idx = torch.topk(slash, min(slash_size, sk), dim=-1).indices
    return v_idx, s_idx


def vertical_slash_masks(
    v_idx: torch.Tensor, s_idx: torch.Tensor, sq: int, sk: int, block_size: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Lines -> (block mask [B, H, nqb, nkb], first query block, column mask [B, H, nqb, V]) over the
    block-aligned query tiles of the last sq of sk positions."""
    b, h, _ = v_idx.shape
    dev = v_idx.device
    nkb = -(-sk // block_size)
    qb0 = (sk - sq) // block_size
    nqb = (sk - 1) // block_size - qb0 + 1
    # Block offsets crossed by the slash lines.
    offsets = torch.zeros(b, h, nkb + 1, dtype=torch.bool, device=dev)
    lo = (s_idx // block_size).clamp(max=nkb)
    hi = torch.where(s_idx % block_size == 0, lo, lo + 1).clamp(max=nkb)
    offsets.scatter_(-1, lo, True)
    offsets.scatter_(-1, hi, True)
    blocks = diagonal_block_mask(offsets[..., :nkb], qb0, nqb)  # [B, H, nqb, nkb]
    # Vertical lines that are causal for the tile and not inside one of its listed blocks.
    tile_end = torch.clamp((qb0 + torch.arange(nqb, device=dev) + 1) * block_size, max=sk)  # [nqb]
    covered = torch.gather(blocks, -1, (v_idx // block_size)[:, :, None, :].expand(b, h, nqb, -1))
    cols = (v_idx[:, :, None, :] < tile_end[None, None, :, None]) & ~covered
    return blocks, qb0, cols


def vertical_slash_selection_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    vertical_size: int,
    slash_size: int,
    last_q: int = 64,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
    block_size: int = 64,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(block mask, first query block, vertical positions [B, H, V], column mask [B, H, nqb, V])."""
    v_idx, s_idx = vertical_slash_indices(q, k, scale, vertical_size, slash_size, last_q, sink_tokens, local_diagonals)
    blocks, qb0, cols = vertical_slash_masks(v_idx, s_idx, q.shape[2], k.shape[2], block_size)
    return blocks, qb0, v_idx, cols
