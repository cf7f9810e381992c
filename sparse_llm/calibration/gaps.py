"""Per-tile "max gaps": what decides skip-softmax for every threshold at once.

For a KV tile j of a query tile, let m_j be each row's running max before the tile (in the kernel's processing
order) and r_j its row max inside it.
The tile is skipped iff max_rows(r_j − m_j) < ln λ, λ = factor / kv_len. Since ln λ < 0 whenever skipping is on,
a skipped tile could never have raised the running max, so m_j is the same whether or not earlier tiles were
skipped: the decision for *every* factor follows from one dense pass. We record the normalised gap
g = max_rows(r_j − m_j) + ln(kv_len); a tile is skipped at factor f iff g < ln f. The first processed tile
is never skipped (g = +inf). Decode splits start from the sink seed (tile 0's row max) instead of -inf, which
keeps the argument intact: the seed is the same in the dense and the sparse pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_llm.kernels.geometry import DECODE_BLOCK_N, PREFILL_BLOCK_M, PREFILL_BLOCK_N, prefill_tile_order


@dataclass(frozen=True, slots=True)
class TileGeometry:
    """The deployment kernel's tiling (sparse_llm/kernels/geometry.py), which calibration must mirror exactly."""

    block_m: int = PREFILL_BLOCK_M  # query rows per prefill tile, per query head
    block_n: int = PREFILL_BLOCK_N  # keys per prefill tile
    decode_block_n: int = DECODE_BLOCK_N  # keys per decode tile


NEVER_SKIPPED = math.inf


def prefill_tile_gaps(
    q: torch.Tensor,  # [Lq, H, D]: the last Lq query positions of a sequence of kv_len tokens
    k: torch.Tensor,  # [kv_len, Hkv, D]
    scale: float,
    geometry: TileGeometry,
    max_rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Normalised gaps of every processed (query tile, head, KV tile), flattened; first tiles are +inf.

    Query tiles start at the chunk's first query (as the varlen kernel tiles them); KV tiles start at key 0,
    up to the causal end of the query tile, processed in the skip build's order (`prefill_tile_order`: sink,
    diagonal, rest nearest first); the gaps are returned in tile-index order. Cost: one QKᵀ over the causal half
    (in row chunks) and one max per tile; the causal mask is applied to the tile maxima, and only each row's
    diagonal tile is re-reduced with its mask, so no pass over the full score matrix is spent on masking.
    """
    lq, h, d = q.shape
    kv_len, hkv, _ = k.shape
    group = h // hkv
    bm, bn = geometry.block_m, geometry.block_n
    offset = kv_len - lq
    n_kt_all = (kv_len + bn - 1) // bn
    cdt = torch.promote_types(q.dtype, torch.float32)
    # Zero keys pad the last tile: they lie past every query's position, so the causal mask below hides them.
    kf = torch.nn.functional.pad(k.to(cdt).permute(1, 0, 2), (0, 0, 0, n_kt_all * bn - kv_len))  # [Hkv, T·bn, D]
    tile_idx = torch.arange(n_kt_all, device=q.device)
    lane = torch.arange(bn, device=q.device)
    out = []
    rows_per_chunk = max(bm, (max_rows_per_chunk // bm) * bm)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        rows = stop - start
        # Keys past the chunk's last query are never visited: the causal half is not computed at all.
        n_kt = (stop + offset + bn - 1) // bn
        qc = q[start:stop].to(cdt).permute(1, 0, 2).reshape(hkv, group, rows, d)
        s = torch.einsum("kgqd,knd->kgqn", qc, kf[:, :n_kt * bn]).reshape(hkv, group, rows, n_kt, bn)
        rowmax = s.amax(-1)  # [Hkv, G, rows, T], unmasked yet
        qpos = torch.arange(start, stop, device=q.device) + offset
        diag = qpos // bn  # the tile holding the row's own position: the only partially visible one
        idx = diag[None, None, :, None, None].expand(hkv, group, rows, 1, bn)
        diag_s = s.gather(3, idx).squeeze(3).masked_fill_(diag[:, None] * bn + lane > qpos[:, None], -math.inf)
        del s
        rowmax.masked_fill_(tile_idx[None, :n_kt] > diag[:, None], -math.inf)
        rowmax.scatter_(3, idx[..., 0], diag_s.amax(-1, keepdim=True))
        rowmax *= scale  # max(s)·scale == max(s·scale) exactly: scale > 0 and rounding is monotone
        n_qt = (rows + bm - 1) // bm
        rpad = n_qt * bm - rows
        if rpad:  # padded rows of a partial query tile count as skippable (-inf: they never block a skip)
            rowmax = torch.nn.functional.pad(rowmax, (0, 0, 0, rpad), value=-math.inf)
        rowmax = rowmax.reshape(hkv, group, n_qt, bm, n_kt)
        # The skip build's order per query tile (sink, diagonal, rest nearest first); gaps go back to tile index.
        q_first = torch.arange(n_qt, device=q.device) * bm + start + offset
        q_last = torch.clamp(torch.arange(n_qt, device=q.device) * bm + bm - 1, max=rows - 1) + start + offset
        order = prefill_tile_order(q_first, q_last + 1, bn, n_kt)[:, None, :].expand(n_qt, bm, n_kt)
        in_order = rowmax.gather(-1, order.expand_as(rowmax))
        running = torch.cummax(in_order, dim=-1).values
        before = torch.cat([torch.full_like(running[..., :1], -math.inf), running[..., :-1]], dim=-1)
        gap_rows = torch.nan_to_num(in_order - before, nan=-math.inf)  # -inf for masked rows; nan when both -inf
        gap = torch.empty_like(gap_rows[:, :, :, 0]).scatter_(-1, order[:, 0].expand_as(gap_rows[:, :, :, 0]),
                                                             gap_rows.amax(3))  # [Hkv, G, Qt, T]
        # Which KV tiles the kernel processes for each query tile: up to the causal end of its last row.
        processed = (torch.arange(n_kt, device=q.device)[None, :] * bn) <= q_last[:, None]  # [Qt, T]
        g = gap + math.log(kv_len)
        g[..., 0] = NEVER_SKIPPED
        out.append(g[:, :, processed].reshape(-1))
    return torch.cat(out) if out else torch.empty(0)


def decode_tile_gaps(
    q: torch.Tensor,  # [H, D]: one decode query
    k: torch.Tensor,  # [kv_len, Hkv, D]
    scale: float,
    block_n: int,
    split_tiles: int,
) -> torch.Tensor:
    """Normalised gaps of every (KV head, KV tile) of one decode step, flattened.

    Rows are the GQA group's query heads (the decision is voted over the group); KV tiles are cut into
    splits of `split_tiles` tiles, each with its own running max (flash-decoding) seeded with tile 0's row
    max (sink-seeded splits, kernels/decode.py): only split 0's tile 0 is never skipped.
    """
    h, d = q.shape
    kv_len, hkv, _ = k.shape
    group = h // hkv
    n_kt = (kv_len + block_n - 1) // block_n
    n_split = (n_kt + split_tiles - 1) // split_tiles
    cdt = torch.promote_types(q.dtype, torch.float32)  # float64 inputs stay float64 (tests compare exactly)
    s = torch.einsum("kgd,nkd->kgn", q.to(cdt).reshape(hkv, group, d), k.to(cdt)) * scale  # [Hkv, G, L]
    s = torch.nn.functional.pad(s, (0, n_split * split_tiles * block_n - kv_len), value=-math.inf)
    rowmax = s.reshape(hkv, group, n_split, split_tiles, block_n).amax(-1)  # [Hkv, G, S, T]
    seed = rowmax[:, :, :1, :1]  # [Hkv, G, 1, 1]: tile 0, the sink, starts every split's running max
    running = torch.maximum(torch.cummax(rowmax, dim=-1).values, seed)
    before = torch.cat([seed.expand(-1, -1, n_split, 1), running[..., :-1]], dim=-1)
    gap = (rowmax - before).amax(1)  # [Hkv, S, T]; seed is finite, so no -inf - -inf
    g = gap + math.log(kv_len)
    g[:, 0, 0] = NEVER_SKIPPED
    real = (torch.arange(n_split * split_tiles, device=q.device) * block_n < kv_len).reshape(n_split, split_tiles)
    return g[:, real].reshape(-1)


def sparsity_at(gaps: torch.Tensor, factor: float) -> float:
    """Fraction of processed tiles skipped at this threshold_scale_factor (0 when off)."""
    if gaps.numel() == 0 or factor <= 0:
        return 0.0
    return float((gaps < math.log(factor)).sum()) / gaps.numel()
