"""Block-sparse causal attention in plain torch: the oracle of the Triton kernel and the CPU execution path.

The selection is expanded into a dense boolean mask over (query, key) pairs, exactly as the kernel
reads it (listed blocks and columns, then causality); a query row with nothing allowed outputs 0, as in
the kernel. Queries are processed in chunks so memory stays bounded (a loop over query chunks, never
over tokens or heads).
"""
from __future__ import annotations

import torch

from sparse_llm.sparse.block_selection import BlockSelection, QueryTiles, batched_tiles, token_mask

# Score-matrix elements per chunk (heads x query rows x keys).
MAX_CHUNK_ELEMENTS = 1 << 25


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tile_start: torch.Tensor | None,
    row_mask: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [Lq, H, D] are the last Lq positions of k/v [Lk, Hkv, D].

    tile_start [nt] (ascending) and row_mask [nt, Hs, Lk] say which keys the tile containing each query
    lists (None = dense causal). Returns [Lq, H, Dv] in q's dtype, and with return_lse the rows' natural
    log-sum-exp of the allowed scores [Lq, H] in the compute dtype (-inf for a row with nothing allowed).
    """
    lq, h, d = q.shape
    lk, hkv, dv = v.shape
    if lq > lk:
        raise ValueError(f"q_len={lq} exceeds kv_len={lk}: queries must be the last positions of the keys")
    g = h // hkv
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    dev = q.device
    qq = q.to(cd).transpose(0, 1).reshape(hkv, g, lq, d)
    kk = k.to(cd).transpose(0, 1)  # [Hkv, Lk, D]
    vv = v.to(cd).transpose(0, 1)
    keys = torch.arange(lk, device=dev)
    qpos = torch.arange(lk - lq, lk, device=dev)
    out = torch.empty(lq, h, dv, dtype=q.dtype, device=dev)
    lse = torch.empty(lq, h, dtype=cd, device=dev) if return_lse else None
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, h * lk))
    for c0 in range(0, lq, chunk):
        c1 = min(lq, c0 + chunk)
        p = qpos[c0:c1]
        s = torch.einsum("kgqd,knd->kgqn", qq[:, :, c0:c1], kk) * scale
        allowed = keys[None, :] <= p[:, None]  # [n, Lk]
        if row_mask is not None:
            t = torch.searchsorted(tile_start.to(dev).long(), p, right=True) - 1
            rm = row_mask[t].permute(1, 0, 2)  # [Hs, n, Lk]
            rm = rm.repeat_interleave(h // rm.shape[0], 0).view(hkv, g, c1 - c0, lk)
            allowed = allowed & rm
        s = s.masked_fill(~allowed, float("-inf"))
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        e = torch.exp(s - mx)
        den = e.sum(-1, keepdim=True)
        pr = e / torch.where(den == 0, torch.ones_like(den), den)
        o = torch.einsum("kgqn,knd->kgqd", pr, vv)  # [Hkv, G, n, Dv]
        out[c0:c1] = o.reshape(h, c1 - c0, dv).transpose(0, 1).to(q.dtype)
        if return_lse:
            row = torch.where(den == 0, float("-inf"), mx + torch.log(torch.where(den == 0, torch.ones_like(den), den)))
            lse[c0:c1] = row.reshape(h, c1 - c0).transpose(0, 1)
    return (out, lse) if return_lse else out


def sequence_rows(tiles: QueryTiles, seq: int) -> slice:
    """The (contiguous) tiles of sequence `seq`."""
    idx = (tiles.seq == seq).nonzero()
    if idx.numel() == 0:
        return slice(0, 0)
    return slice(int(idx[0]), int(idx[-1]) + 1)


def block_sparse_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tiles: QueryTiles,
    selection: BlockSelection | None,
    seq: int,
    compute_dtype: torch.dtype | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of sequence `seq` (q [Lq, H, D], k/v [Lk, Hkv, D]) under its rows of `selection`
    (with return_lse, also the natural log-sum-exp [Lq, H]: see masked_attention)."""
    if selection is None:
        return masked_attention(q, k, v, scale, None, None, compute_dtype, return_lse)
    sl = sequence_rows(tiles, seq)
    hs = selection.num_heads
    sub = slice_selection(selection, sl.start * hs, sl.stop * hs)
    sub_tiles = QueryTiles(tiles.seq[sl], tiles.start[sl], tiles.rows)
    mask = token_mask(sub_tiles, sub, k.shape[0])
    return masked_attention(q, k, v, scale, tiles.start[sl], mask, compute_dtype, return_lse)


def slice_selection(sel: BlockSelection, row_lo: int, row_hi: int) -> BlockSelection:
    """Rows [row_lo, row_hi) of a selection, re-based to start at offset 0."""

    def cut(off, idx):
        if off is None:
            return None, None
        a, b = int(off[row_lo]), int(off[row_hi])
        return off[row_lo:row_hi + 1] - a, idx[a:b]

    b_off, b_idx = cut(sel.block_offsets, sel.block_indices)
    c_off, c_idx = cut(sel.column_offsets, sel.column_indices)
    return BlockSelection(sel.block_size, sel.num_heads, b_off, b_idx, c_off, c_idx)


def batched_block_sparse_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection | None,
    scale: float,
    block_size: int,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[B, H, Sq, D] x [B, Hkv, Sk, D] with block_size-aligned tiles per batch row (as the kernel's
    batched launch): the reference of `batched_block_sparse_attention`."""
    b = q.shape[0]
    tiles = batched_tiles(b, q.shape[2], k.shape[2], block_size, q.device)
    outs = [
        block_sparse_sequence(q[i].transpose(0, 1), k[i].transpose(0, 1), v[i].transpose(0, 1), scale, tiles,
                              selection, i, compute_dtype).transpose(0, 1)
        for i in range(b)
    ]
    return torch.stack(outs)

