"""Per-block key min/max kept with the paged cache, and the torch reference of the prefill bound pre-skip.

The cache ("key_bounds", [num_blocks, 2, Hkv, D]: channel-wise min and max of the block's written keys)
is allocated, shared and freed with the KV blocks; it is recomputed for every block a step writes into
(Quest's `update_page_minmax` with one page per block), so it always covers exactly the keys in the
cache. The prefill kernel (kernels/prefill.py, BOUND_SKIP) reads it to skip a KV tile before QKᵀ when

    for every valid row r:  exp(ub_r − running_max_r) < λ,
    ub_r = scale · max over the tile's blocks seen by r of Σ_c max(q_c·kmin_c, q_c·kmax_c)   (box widened)

Since ub_r ≥ the row's tile max, such a tile is one BLASST skips anyway: the output and the skip set
are unchanged, only QKᵀ is saved. `bound_skip_counts` replays both decisions from the scores, so the
kernel's (total, skipped, pre-skipped) counts can be checked exactly and the bound's catch rate measured
on real attention inputs without running attention.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import CacheSpec
from sparse_llm.backends.quest import update_page_minmax
from sparse_llm.kernels.geometry import PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_BOUND_WIDEN, cdiv, prefill_tile_order

KEY_BOUNDS = "key_bounds"
NEG_INF = float("-inf")


def key_bounds_spec(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> CacheSpec:
    """[2, Hkv, D] per KV block: 2·Hkv·D values against the block's 2·block_size·Hkv·D of K/V."""
    return CacheSpec(KEY_BOUNDS, (2, num_kv_heads, head_dim), dtype)


def update_key_bounds(cache_kv: torch.Tensor, key_bounds: torch.Tensor, slot_mapping: torch.Tensor,
                      has_prefill: bool) -> None:
    """Recompute min/max of every block this step wrote (after the K/V write).

    has_prefill: collapse tokens of one block first (one host sync); a decode-only step writes one
    token per sequence, needs no dedupe and no sync (CUDA-graph safe).
    """
    block_size = cache_kv.shape[2]
    update_page_minmax(cache_kv, key_bounds.unsqueeze(1), slot_mapping, block_size, dedupe=has_prefill)


def segment_starts(n_tiles: int, block_n: int, page_size: int) -> torch.Tensor:
    """First key of each (tile, segment): a tile is cut at block boundaries into block_n // page_size
    segments (one when the tile lies inside a block). [n_tiles, segments]."""
    seg = min(page_size, block_n)
    return torch.arange(n_tiles)[:, None] * block_n + torch.arange(block_n // seg)[None, :] * seg


def row_tile_bounds(
    q: torch.Tensor, k: torch.Tensor, scale: float, page_size: int, block_n: int, box_dtype: torch.dtype,
    widen: float = PREFILL_BOUND_WIDEN,
) -> torch.Tensor:
    """ub [H, Lq, n_tiles] (scaled) of one sequence: q [Lq, H, D] are the last Lq positions of k [Lk, Hkv, D].

    The box is computed from k in float64, widened by widen·max(|kmin|, |kmax|) (the kernel's
    PREFILL_BOUND_WIDEN; other values only for measurements) and rounded to
    box_dtype (the dtype the kernel's bound dot sees), then evaluated in q's dtype (float64 for an oracle).
    A row gets -inf for a tile none of whose segments starts at or before its position.
    """
    lq, h, d = q.shape
    lk, hkv, _ = k.shape
    n_blocks = cdiv(lk, page_size)
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, 0, 0, n_blocks * page_size - lk))
    kp = kp.view(n_blocks, page_size, hkv, d)
    ok = (torch.arange(n_blocks * page_size, device=k.device) < lk).view(n_blocks, page_size, 1, 1)
    lo = torch.where(ok, kp, float("inf")).amin(1)
    hi = torch.where(ok, kp, NEG_INF).amax(1)  # [n_blocks, Hkv, D]
    w = torch.maximum(lo.abs(), hi.abs()) * widen
    lo = (lo - w).to(box_dtype).to(q.dtype)
    hi = (hi + w).to(box_dtype).to(q.dtype)
    g = h // hkv
    qg = q.view(lq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
    ub = qg.clamp(min=0) @ hi.permute(1, 2, 0)[:, None] + qg.clamp(max=0) @ lo.permute(1, 2, 0)[:, None]
    ub = ub.reshape(h, lq, n_blocks) * scale  # [H, Lq, n_blocks]
    n_tiles = cdiv(lk, block_n)
    starts = segment_starts(n_tiles, block_n, page_size).to(q.device)  # [T, S]
    qpos = torch.arange(lk - lq, lk, device=q.device)
    seen = (starts[None] <= qpos[:, None, None]) & (starts[None] < lk)  # [Lq, T, S]
    per_seg = ub[:, :, (starts // page_size).clamp(max=n_blocks - 1)]  # [H, Lq, T, S]
    return per_seg.masked_fill(~seen[None], NEG_INF).amax(-1)


def row_tile_max(q: torch.Tensor, k: torch.Tensor, scale: float, block_n: int, chunk: int = 256) -> torch.Tensor:
    """Causal row max of the scaled scores per KV tile, [H, Lq, n_tiles] (-inf where a row sees no key)."""
    lq, h, d = q.shape
    lk, hkv, _ = k.shape
    g = h // hkv
    n_tiles = cdiv(lk, block_n)
    kk = torch.nn.functional.pad(k.to(q.dtype), (0, 0, 0, 0, 0, n_tiles * block_n - lk)).permute(1, 0, 2)
    keys = torch.arange(n_tiles * block_n, device=q.device)
    out = torch.full((h, lq, n_tiles), NEG_INF, dtype=q.dtype, device=q.device)
    for r0 in range(0, lq, chunk):  # bounded memory on long real inputs
        qc = q[r0:r0 + chunk].view(-1, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, c, D]
        c = qc.shape[2]
        t_end = cdiv(lk - lq + r0 + c, block_n)  # tiles any row of the chunk sees
        kc, keys_c = kk[:, : t_end * block_n], keys[: t_end * block_n]
        s = (qc @ kc[:, None].transpose(-1, -2)) * scale  # [Hkv, G, c, t_end * block_n]
        qpos = torch.arange(lk - lq + r0, lk - lq + r0 + c, device=q.device)
        s = s.masked_fill((keys_c[None, :] > qpos[:, None]) | (keys_c[None, :] >= lk), NEG_INF)
        out[:, r0:r0 + c, :t_end] = s.reshape(h, c, t_end, block_n).amax(-1)
    return out


def bound_skip_decisions(
    rowmax: torch.Tensor, ub: torch.Tensor, kv_len: int, log_lambda: float,
    block_m: int = PREFILL_BLOCK_M, block_n: int = PREFILL_BLOCK_N,
) -> tuple[int, int, int, int]:
    """Replay the kernel's tile loop on row maxima: (total, skipped, pre_skipped, pre_but_not_skipped).

    rowmax, ub: [H, Lq, n_tiles] from `row_tile_max` / `row_tile_bounds`. Per (head, query tile of
    block_m rows), tiles up to the causal end in the skip build's order (`prefill_tile_order`: sink,
    diagonal, rest nearest first); BLASST skips when every valid row has
    rowmax − m < log λ (never tile 0); the bound pre-skips when every valid row has ub − m < log λ; m is
    the running max over processed tiles. The last count is 0 whenever ub bounds rowmax (tests check it).
    """
    h, lq, _ = rowmax.shape
    nqt = cdiv(lq, block_m)
    pad = nqt * block_m - lq
    rm = torch.nn.functional.pad(rowmax, (0, 0, 0, pad), value=NEG_INF).view(h, nqt, block_m, -1)
    bd = torch.nn.functional.pad(ub, (0, 0, 0, pad), value=NEG_INF).view(h, nqt, block_m, -1)
    row_valid = (torch.arange(nqt * block_m, device=rowmax.device) < lq).view(nqt, block_m)
    ctx = kv_len - lq
    first = ctx + torch.arange(nqt, device=rowmax.device) * block_m
    last = ctx + torch.clamp((torch.arange(nqt, device=rowmax.device) + 1) * block_m, max=lq)
    n_tiles = (last + block_n - 1) // block_n  # [nqt]
    order = prefill_tile_order(first, last, block_n, rm.shape[-1])  # [nqt, n_tiles of the sequence]
    m = torch.full((h, nqt, block_m), NEG_INF, dtype=rowmax.dtype, device=rowmax.device)
    total = skipped = pre_skipped = violations = 0
    for t in range(int(n_tiles.max())):
        j = order[None, :, t, None, None].expand(h, nqt, block_m, 1)  # each query tile's t-th KV tile
        rm_j, bd_j = rm.gather(-1, j)[..., 0], bd.gather(-1, j)[..., 0]
        active = (t < n_tiles)[None].expand(h, nqt)
        gap = torch.where(row_valid, rm_j - m, NEG_INF).amax(-1)
        pre_gap = torch.where(row_valid, bd_j - m, NEG_INF).amax(-1)
        skip = (gap < log_lambda) & (t > 0) & active
        pre = (pre_gap < log_lambda) & (t > 0) & active
        update = (active & ~skip)[..., None]
        m = torch.where(update, torch.maximum(m, rm_j), m)
        total += int(active.sum())
        skipped += int(skip.sum())
        pre_skipped += int(pre.sum())
        violations += int((pre & ~skip).sum())
    return total, skipped, pre_skipped, violations


def bound_skip_counts(
    q: torch.Tensor, k: torch.Tensor, scale: float, log_lambda: float, page_size: int,
    block_m: int = PREFILL_BLOCK_M, block_n: int = PREFILL_BLOCK_N, box_dtype: torch.dtype | None = None,
) -> tuple[int, int, int, int]:
    """(total, skipped, pre_skipped, pre_but_not_skipped) tiles of one sequence; see `bound_skip_decisions`."""
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"q_len={q.shape[0]} exceeds kv_len={k.shape[0]}: queries must be a suffix of the keys")
    rowmax = row_tile_max(q, k, scale, block_n)
    ub = row_tile_bounds(q, k, scale, page_size, block_n, box_dtype or k.dtype)
    return bound_skip_decisions(rowmax, ub, k.shape[0], log_lambda, block_m, block_n)
