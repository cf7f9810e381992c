"""Attention of the last few queries over all keys, summed into vertical and slash profiles.

FlexPrefill and MInference's vertical-slash both estimate the pattern from the last n queries of
the prompt: a causal softmax of those n rows over every key, then
  vertical[j] = sum_i A[i, j]               (how much the key at position j is attended)
  slash[d]    = sum_i A[i, p_i - d]         (how much the diagonal at distance d >= 0 is attended)
where p_i is the absolute position of query row i. Heads are processed in chunks to bound memory.
"""
from __future__ import annotations

import torch

# Elements of the [heads, n, Sk] probability block per chunk.
MAX_CHUNK_ELEMENTS = 1 << 27


def diagonal_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., n, Sk] where row i is the query at position Sk - n + i -> sums along each distance
    d in [0, Sk): out[..., d] = sum_i a[..., i, Sk - n + i - d] (terms with a negative key are 0)."""
    n, sk = a.shape[-2], a.shape[-1]
    # Flip the keys so that distance d of row i sits at column d + (n - 1 - i), then shear the rows.
    af = torch.nn.functional.pad(a.flip(-1), (0, n)).contiguous()
    w = sk + n
    lead = af.shape[:-2]
    strides = tuple(af.stride()[:-2]) + (w - 1, 1)
    sheared = af.as_strided(lead + (n, sk), strides, storage_offset=af.storage_offset() + n - 1)
    return sheared.sum(-2)


def last_query_profiles(
    q: torch.Tensor, k: torch.Tensor, scale: float, n: int, with_slash: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Softmax of the last n queries of q [B, H, Sq, D] over k [B, Hkv, Sk, D] (queries = the last Sq
    keys). Returns (vertical [B, H, Sk], slash [B, H, Sk] or None without with_slash, mean last query
    [B, H, D]), sums in float32 (float64 for float64 inputs)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    n = min(n, sq)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    last = q[:, :, sq - n:]
    qpos = torch.arange(sk - n, sk, device=q.device)
    causal = torch.arange(sk, device=q.device)[None, :] <= qpos[:, None]  # [n, Sk]
    vertical = torch.empty(b, h, sk, dtype=cd, device=q.device)
    slash = torch.empty(b, h, sk, dtype=cd, device=q.device) if with_slash else None
    kv_per = max(1, MAX_CHUNK_ELEMENTS // max(1, b * g * n * sk))
    for k0 in range(0, hkv, kv_per):
        k1 = min(hkv, k0 + kv_per)
        qc = last[:, k0 * g:k1 * g].reshape(b, k1 - k0, g * n, d)
        s = torch.matmul(qc, k[:, k0:k1].transpose(-1, -2)).to(cd) * scale
        s = s.view(b, k1 - k0, g, n, sk).masked_fill(~causal, float("-inf"))
        a = torch.softmax(s, dim=-1).view(b, (k1 - k0) * g, n, sk)
        vertical[:, k0 * g:k1 * g] = a.sum(-2)
        if with_slash:
            slash[:, k0 * g:k1 * g] = diagonal_sums(a)
    return vertical, slash, last.to(cd).mean(-2)


def block_pool(x: torch.Tensor, block_size: int, reduce: str = "sum") -> torch.Tensor:
    """Pool the last axis in blocks of block_size (the last block may be partial): sum or mean over
    the block's actual elements."""
    n = x.shape[-1]
    nb = -(-n // block_size)
    xp = torch.nn.functional.pad(x, (0, nb * block_size - n)).view(*x.shape[:-1], nb, block_size)
    s = xp.sum(-1)
    if reduce == "sum":
        return s
    counts = torch.full((nb,), block_size, dtype=x.dtype, device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return s / counts


def block_mean_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """k [B, Hkv, Sk, D] -> mean key of each block over its actual tokens [B, Hkv, nkb, D]."""
    return block_pool(k.transpose(-1, -2), block_size, "mean").transpose(-1, -2)


def ranks_below(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the top `counts[...]` entries of scores [..., N] along the last axis (ties broken
    by sort order), counts broadcastable to scores[..., 0]."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)
    take = ranks.expand_as(scores) < counts[..., None]
    mask = torch.zeros_like(take)
    return mask.scatter_(-1, order, take)


def diagonal_block_mask(offset_sel: torch.Tensor, first_block: int, nqb: int) -> torch.Tensor:
    """offset_sel [..., nkb] (block offsets m - j kept) -> [..., nqb, nkb] causal block mask for the
    absolute query blocks first_block .. first_block + nqb - 1."""
    nkb = offset_sel.shape[-1]
    dev = offset_sel.device
    m = first_block + torch.arange(nqb, device=dev)[:, None]
    j = torch.arange(nkb, device=dev)[None, :]
    off = (m - j).clamp(min=0)
    gathered = torch.gather(
        offset_sel[..., None, :].expand(*offset_sel.shape[:-1], nqb, nkb), -1,
        off.expand(*offset_sel.shape[:-1], nqb, nkb),
    )
    return gathered & (j <= m)
