"""XAttention's antidiagonal estimate on the GPU: one GEMM pass, no score matrix in memory.

The reshaped scores S = Qr Kr^T (see sparse/xattention.py) are computed tile by tile like a GEMM
(K-loop over stride * head_dim). The epilogue cuts each [BLOCK_M, BLOCK_N] score tile into key blocks
of GPB = block_size / stride groups and stores, per (query group, key block), the log-sum-exp of the
causally masked scores in that block. The row's softmax mass of a key block is then
exp(lse_block - logsumexp_over_blocks(lse_block)), summed over the query groups of a query block:
two cheap torch passes over an array GPB times smaller than the score matrix (one float per GPB scores).

Torch reference: `sparse.xattention.antidiagonal_block_mass` (tests compare both).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.tuning import autotune_configs
from sparse_llm.sparse.xattention import check_geometry, reshape_antidiagonal

# LSE elements per launch (float32); heads are processed in chunks beyond this.
MAX_LSE_ELEMENTS = 1 << 29


_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st)
        for bn in (64, 128) for w in (4, 8) for st in (3, 4)
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)


def _fit(configs, named_args, **kwargs):
    """Key tiles must hold whole key blocks; the K-loop must tile stride * head_dim exactly."""
    ok = [c for c in configs if c.kwargs["BLOCK_N"] % kwargs["GPB"] == 0 and kwargs["KD"] % c.kwargs["BLOCK_K"] == 0]
    if not ok:
        raise ValueError(f"xattention estimate: no tile fits block_size/stride={kwargs['GPB']} and stride*head_dim={kwargs['KD']}")
    return ok


@triton.autotune(configs=_CONFIGS, key=["KD", "GPB", "GROUP"], prune_configs_by={"early_config_prune": _fit})
@triton.jit
def _antidiag_lse_kernel(
    QR, KR, LSE,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kh, stride_kr,
    stride_lb, stride_lh, stride_lr,
    num_heads, n_rows, n_cols, n_real_cols, row_abs0, scale,
    GROUP: tl.constexpr, KD: tl.constexpr, GPB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid = (row tiles, column tiles, B * heads-in-chunk)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // num_heads
    h = bh % num_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    NB: tl.constexpr = BLOCK_N // GPB
    kblk = pid_n * NB + tl.arange(0, NB)
    out_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + rows.to(tl.int64)[:, None] * stride_lr + kblk[None, :]
    out_mask = (rows < n_rows)[:, None] & (kblk < n_cols // GPB)[None, :]
    if pid_n * BLOCK_N > row_abs0 + pid_m * BLOCK_M + BLOCK_M - 1:
        # Entirely above the causal diagonal: no mass.
        tl.store(out_ptrs, tl.full([BLOCK_M, NB], float("-inf"), tl.float32), mask=out_mask)
        return
    q_base = QR + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = KR + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, KD, BLOCK_K):
        qt = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qr + (kk + offs_k)[None, :],
                     mask=(rows < n_rows)[:, None], other=0.0)
        kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kr + (kk + offs_k)[:, None],
                     mask=(cols < n_cols)[None, :], other=0.0)
        acc += tl.dot(qt, kt)
    s = acc * scale
    row_abs = row_abs0 + rows
    keep = (cols[None, :] <= row_abs[:, None]) & (cols < n_real_cols)[None, :]
    s = tl.where(keep, s, float("-inf"))
    s3 = tl.reshape(s, [BLOCK_M, NB, GPB])
    mx = tl.max(s3, axis=2)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(tl.exp(s3 - mx_safe[:, :, None]), axis=2)
    lse = tl.where(tot == 0.0, float("-inf"), mx_safe + tl.log(tl.where(tot == 0.0, 1.0, tot)))
    tl.store(out_ptrs, lse, mask=out_mask)


def antidiagonal_block_mass_triton(
    q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, block_size: int
) -> tuple[torch.Tensor, int]:
    """Same result as `antidiagonal_block_mass` (float32 [B, H, nqb, nkb], first query block)."""
    check_geometry(block_size, stride)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    gpb = block_size // stride
    qr, kr, qb0, row_real = reshape_antidiagonal(q, k, block_size, stride)
    qr, kr = qr.contiguous(), kr.contiguous()
    n_rows, n_cols = qr.shape[2], kr.shape[2]
    kd = stride * d
    nqb, nkb = n_rows // gpb, n_cols // gpb
    g = h // hkv
    heads_per = max(g, min(h, MAX_LSE_ELEMENTS // max(1, b * n_rows * nkb)) // g * g)  # whole GQA groups
    mass = torch.empty(b, h, nqb, nkb, dtype=torch.float32, device=q.device)
    real = row_real.view(1, 1, nqb, gpb, 1)
    for h0 in range(0, h, heads_per):
        h1 = min(h, h0 + heads_per)
        qc = qr[:, h0:h1]
        kc = kr[:, h0 // g:h1 // g]
        lse = torch.empty(b, h1 - h0, n_rows, nkb, dtype=torch.float32, device=q.device)
        grid = lambda meta, nh=h1 - h0: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]), b * nh)  # noqa: E731
        _antidiag_lse_kernel[grid](
            qc, kc, lse,
            qc.stride(0), qc.stride(1), qc.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            h1 - h0, n_rows, n_cols, -(-sk // stride), qb0 * gpb, scale / stride,
            GROUP=g, KD=kd, GPB=gpb,
        )
        row_lse = torch.logsumexp(lse, dim=-1, keepdim=True)
        p = torch.exp(lse - row_lse).view(b, h1 - h0, nqb, gpb, nkb)
        mass[:, h0:h1] = torch.where(real, p, 0.0).sum(3)
    return mass, qb0
