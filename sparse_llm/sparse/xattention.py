"""XAttention (Xu et al. 2025): pick KV blocks by the attention mass their antidiagonals predict.

Queries and keys are cut into groups of `stride` consecutive positions. The score of query group i
with key group j is the sum of q·k along the antidiagonal of their stride x stride tile:
    S[i, j] = scale / stride * sum_t q[i*stride + stride-1-t] · k[j*stride + t]
which is one matmul after reshaping (keys: `stride` consecutive rows side by side; queries the same,
reversed inside the group). A causal softmax over j (j <= i) turns each row into a distribution; summed
over the groups of a (query block, key block) tile it estimates the tile's attention mass.
Per query block, the sink block (0) and the diagonal block are always kept; the other blocks are
added in descending mass while the mass kept so far is below threshold * (row's total mass) -- the
reference's `find_blocks_chunked` rule. `threshold` is a scalar or one value per query head.

Positions are absolute: query blocks are aligned to multiples of block_size of the KV, so a prompt
prefilled in chunks gets the same blocks as one prefilled at once (queries of the chunk only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Score-matrix elements per chunk of query blocks in the torch path.
MAX_CHUNK_ELEMENTS = 1 << 26


def check_geometry(block_size: int, stride: int) -> None:
    if stride < 1 or block_size % stride:
        raise ValueError(f"xattention: stride={stride} must be >= 1 and divide block_size={block_size}")


def reshape_antidiagonal(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int):
    """Pad q [B, H, Sq, D] / k [B, Hkv, Sk, D] to whole blocks (absolute alignment) and regroup.

    Returns (qr [B, H, Lq/stride, stride*D], kr [B, Hkv, Lk/stride, stride*D], first query block,
    row_real [Lq/stride] bool: the query group holds at least one real query).
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    q0 = sk - sq
    qb0 = q0 // block_size
    nqb = (sk - 1) // block_size - qb0 + 1
    nkb = -(-sk // block_size)
    left = q0 - qb0 * block_size
    qp = F.pad(q, (0, 0, left, nqb * block_size - left - sq))
    kp = F.pad(k, (0, 0, 0, nkb * block_size - sk))
    qr = qp.view(b, h, -1, stride, d).flip(3).reshape(b, h, -1, stride * d)
    kr = kp.reshape(b, k.shape[1], -1, stride * d)
    gpos = qb0 * block_size + torch.arange(qr.shape[2], device=q.device) * stride  # group's first position
    row_real = (gpos + stride > q0) & (gpos < sk)
    return qr, kr, qb0, row_real


def antidiagonal_block_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, block_size: int
) -> tuple[torch.Tensor, int]:
    """Estimated attention mass per (query block, key block): float32 [B, H, nqb, nkb], and the
    absolute index of the first query block. Torch path (any device), chunked over query blocks."""
    check_geometry(block_size, stride)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    gpb = block_size // stride
    qr, kr, qb0, row_real = reshape_antidiagonal(q, k, block_size, stride)
    nqb = qr.shape[2] // gpb
    nkg = kr.shape[2]
    nkb = nkg // gpb
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr = qr.view(b, hkv, g, -1, stride * d)
    col = torch.arange(nkg, device=q.device)
    col_ok = col * stride < sk
    mass = torch.zeros(b, h, nqb, nkb, dtype=cd, device=q.device)
    per = max(1, MAX_CHUNK_ELEMENTS // max(1, h * gpb * nkg))
    for c0 in range(0, nqb, per):
        c1 = min(nqb, c0 + per)
        rows = slice(c0 * gpb, c1 * gpb)
        ncols = min(nkg, (qb0 + c1) * gpb)  # no later key group is causal for these rows
        s = torch.matmul(qr[:, :, :, rows], kr[:, :, None, :ncols].transpose(-1, -2)).to(cd) * (scale / stride)
        row_abs = qb0 * gpb + torch.arange(c0 * gpb, c1 * gpb, device=q.device)
        allowed = (col[None, :ncols] <= row_abs[:, None]) & col_ok[None, :ncols]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1) * row_real[rows, None].to(cd)
        nb = ncols // gpb
        part = p.view(b, h, c1 - c0, gpb, nb, gpb).sum(dim=(3, 5))
        mass[:, :, c0:c1, :nb] = part
    return mass.float() if cd == torch.float32 else mass, qb0


def threshold_tensor(threshold: float | list[float] | torch.Tensor, num_heads: int, device) -> torch.Tensor:
    """The per-query-head threshold as float64 [H]; a list must have one value per query head."""
    t = torch.as_tensor(threshold, dtype=torch.float64, device=device)
    if t.dim() == 0:
        t = t.expand(num_heads)
    if t.shape != (num_heads,):
        raise ValueError(f"xattention threshold: expected a scalar or {num_heads} values (one per query head), got {tuple(t.shape)}")
    if bool(((t <= 0) | (t > 1)).any()):
        raise ValueError(f"xattention threshold values must be in (0, 1], got {t.tolist()}")
    return t


def select_blocks_by_mass(mass: torch.Tensor, first_block: int, threshold: torch.Tensor) -> torch.Tensor:
    """[B, H, nqb, nkb] mass -> bool mask of kept blocks: sink + diagonal forced, then descending mass
    while the kept mass is below threshold[h] * total (causal blocks only)."""
    b, h, nqb, nkb = mass.shape
    dev = mass.device
    m = mass.to(torch.float64)
    qb = first_block + torch.arange(nqb, device=dev)
    col = torch.arange(nkb, device=dev)
    causal = col[None, :] <= qb[:, None]  # [nqb, nkb]
    forced = (col[None, :] == 0) | (col[None, :] == qb[:, None])
    m = m.masked_fill(~causal, 0.0)
    total = m.sum(-1, keepdim=True)
    required = total * threshold.to(dev)[None, :, None, None]
    forced_sum = m.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    others = m.masked_fill(forced | ~causal, -1.0)  # -1 sorts non-candidates last
    vals, order = torch.sort(others, dim=-1, descending=True)
    kept_before = forced_sum + torch.cumsum(vals.clamp(min=0), dim=-1) - vals.clamp(min=0)
    take = (kept_before < required) & (vals >= 0)
    mask = torch.zeros_like(take)
    mask.scatter_(-1, order, take)
    return (mask | forced) & causal


def xattention_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    threshold: float | list[float] | torch.Tensor = 0.9,
    stride: int = 8,
    block_size: int = 128,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, int]:
    """The XAttention block mask [B, H, nqb, nkb] of q [B, H, Sq, D] (the last Sq positions) over
    k [B, Hkv, Sk, D], and the absolute index of the first query block. CUDA tensors use the fused
    Triton estimator unless use_triton=False."""
    thr = threshold_tensor(threshold, q.shape[1], q.device)
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        from sparse_llm.kernels.xattention_estimate import antidiagonal_block_mass_triton

        mass, qb0 = antidiagonal_block_mass_triton(q, k, scale, stride, block_size)
    else:
        mass, qb0 = antidiagonal_block_mass(q, k, scale, stride, block_size)
    return select_blocks_by_mass(mass, qb0, thr), qb0


def last_block_vertical_blocks(
    q: torch.Tensor, k: torch.Tensor, scale: float, gamma: float, block_size: int, use_triton: bool | None = None
) -> torch.Tensor:
    """Not in the paper: per head, the fewest key blocks that hold `gamma` of the last block_size queries' true
    (softmax) attention, averaged over those rows -> [B, H, nkb] bool. The antidiagonal estimate pairs each query
    row with one key in `stride`, so a row that attends a few particular tokens is seen 1 time in `stride`; an
    exact look from the last rows finds such tokens when the prompt's end also reads them (FlexPrefill's
    vertical estimate, at block level). CUDA tensors use the Triton kernel unless use_triton=False."""
    from sparse_llm.sparse.flexprefill import cover_count
    from sparse_llm.sparse.last_queries import block_pool, last_query_profiles, ranks_below

    n = min(block_size, q.shape[2])
    if use_triton if use_triton is not None else q.is_cuda:
        from sparse_llm.kernels.last_rows_block_mass import last_rows_block_mass_triton

        blocks = last_rows_block_mass_triton(q, k, scale, n, block_size)
    else:
        vertical, _, _ = last_query_profiles(q, k, scale, n, with_slash=False)
        blocks = block_pool(vertical / n, block_size)
    return ranks_below(blocks, cover_count(blocks, gamma))
