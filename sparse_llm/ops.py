"""Kernel-level functional API on plain [B, H, S, D] tensors: sparse prefill attention without the engine.

    out, sparsity = xattention_prefill(q, k, v, threshold=0.9, stride=8, block_size=128)

q [B, H, Sq, D]; k, v [B, Hkv, Sk, D] with H a multiple of Hkv (GQA) and Sq <= Sk (the queries are the
last Sq positions: Sq == Sk for a whole prompt). Attention is causal. Every function returns
(output [B, H, Sq, D], sparsity), sparsity being The Sparse Frontier's: the fraction of causal
(query, key) pairs, over all query heads, that were not computed -- counted from the index lists the
kernel actually ran (for skip_softmax: the fraction of visited KV tiles skipped).

implementation: "auto" runs the Triton kernels on CUDA tensors and the torch reference on CPU
tensors; "triton" / "torch" force one (Triton on CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch

from sparse_llm.sparse.block_selection import (
    BlockSelection,
    batched_tiles,
    per_sequence_pairs,
    selection_from_masks,
    with_dense_last_query_block,
    with_local_window,
)

IMPLEMENTATIONS = ("auto", "triton", "torch")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, S, D] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, sq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={b}, Hkv, Sk, D={d}]")
    hkv, sk = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"q has {h} heads; it must be a multiple of k's {hkv} heads (GQA)")
    if not 1 <= sq <= sk:
        raise ValueError(f"q has {sq} positions and k {sk}: need 1 <= Sq <= Sk (queries are the last Sq keys)")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")


def _use_triton(implementation: str, device: torch.device) -> bool:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; allowed: {IMPLEMENTATIONS}")
    if implementation == "auto":
        return device.type == "cuda"
    return implementation == "triton"


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else float(scale)


def _run_selection(q, k, v, selection: BlockSelection, block_size: int, scale: float, implementation: str,
                   validate: bool = False):
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    tiles = batched_tiles(b, sq, sk, block_size, q.device)
    if validate:
        selection.validate(tiles.num_tiles, h)
    if _use_triton(implementation, q.device):
        from sparse_llm.kernels.block_sparse_prefill import batched_block_sparse_attention

        out = batched_block_sparse_attention(q, k, v, selection, scale, block_size)
    else:
        from sparse_llm.sparse.block_sparse_torch import batched_block_sparse_torch

        out = batched_block_sparse_torch(q, k, v, selection, scale, block_size)
    lens_q = torch.full((b,), sq, dtype=torch.int64, device=q.device)
    lens_k = torch.full((b,), sk, dtype=torch.int64, device=q.device)
    total, attended = per_sequence_pairs(tiles, selection, lens_q, lens_k, h)
    return out, 1.0 - float(attended.sum()) / float(total.sum())


def _widened(mask: torch.Tensor, first_block: int, local_window: int, dense_last_block: bool, block_size: int):
    """The estimators' [B, H, nqb, nkb] mask plus the library's two additions, exactly as the backends add them."""
    mask = with_local_window(mask, first_block, local_window, block_size)
    return with_dense_last_query_block(mask) if dense_last_block else mask


def _tiles_first(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, nqb, nkb] -> [B * nqb, H, nkb]: rows ordered tile-major as the kernel reads them."""
    return mask.transpose(1, 2).reshape(-1, mask.shape[1], mask.shape[3])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor | BlockSelection,
    block_size: int = 128,
    scale: float | None = None,
    implementation: str = "auto",
) -> tuple[torch.Tensor, float]:
    """Causal attention restricted to the given KV blocks.

    block_index: a bool mask [B, Hs, nqb, nkb] (Hs = H for one list per query head, or Hkv for one per
    KV head) where query block m (positions [m*bs, (m+1)*bs) counted from the start of the keys) attends
    key block j; or a BlockSelection (CSR) for the same tiles. A query row whose listed keys are all in
    its future outputs 0.
    """
    _check_qkv(q, k, v)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if isinstance(block_index, BlockSelection):
        sel = block_index
        if sel.block_size != block_size:
            raise ValueError(f"block_index.block_size={sel.block_size} differs from block_size={block_size}")
    else:
        nqb = (sk - 1) // block_size - (sk - sq) // block_size + 1
        nkb = -(-sk // block_size)
        if block_index.dtype != torch.bool or block_index.dim() != 4:
            raise ValueError(f"block_index must be a bool [B, Hs, nqb, nkb] mask or a BlockSelection, got {block_index.dtype} {tuple(block_index.shape)}")
        bb, hs, mq, mk = block_index.shape
        if bb != b or mq != nqb or mk != nkb or h % hs:
            raise ValueError(
                f"block_index has shape {tuple(block_index.shape)}; expected [B={b}, Hs dividing {h}, nqb={nqb}, nkb={nkb}] "
                f"for block_size={block_size}, Sq={sq}, Sk={sk}"
            )
        sel = selection_from_masks(_tiles_first(block_index.to(q.device)), block_size)
    return _run_selection(q, k, v, sel, block_size, _scale(scale, q.shape[-1]), implementation, validate=True)


def xattention_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float | list[float] = 0.9,
    stride: int = 8,
    block_size: int = 128,
    scale: float | None = None,
    implementation: str = "auto",
    local_window: int = 128,
    dense_last_block: bool = True,
    vertical_gamma: float = 0.99,
) -> BlockSelection:
    """XAttention's index lists for q [B, H, Sq, D] over k [B, Hkv, Sk, D] (see xattention_prefill)."""
    from sparse_llm.sparse.block_selection import with_vertical_blocks
    from sparse_llm.sparse.xattention import last_block_vertical_blocks, xattention_block_mask

    if not 0 <= vertical_gamma <= 1:
        raise ValueError(f"xattention: vertical_gamma must be in [0, 1], got {vertical_gamma}")
    sc = _scale(scale, q.shape[-1])
    use_triton = _use_triton(implementation, q.device)
    mask, qb0 = xattention_block_mask(q, k, sc, threshold, stride, block_size, use_triton=use_triton)
    if vertical_gamma > 0:
        mask = with_vertical_blocks(mask, qb0, last_block_vertical_blocks(q, k, sc, vertical_gamma, block_size, use_triton))
    return selection_from_masks(_tiles_first(_widened(mask, qb0, local_window, dense_last_block, block_size)), block_size)


def flexprefill_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    gamma: float = 0.9,
    tau: float = 0.1,
    block_size: int = 128,
    min_budget: int = 1024,
    max_budget: int | None = None,
    scale: float | None = None,
    local_window: int = 128,
    dense_last_block: bool = True,
) -> BlockSelection:
    """FlexPrefill's index lists (see flexprefill_prefill)."""
    from sparse_llm.sparse.flexprefill import flexprefill_block_mask

    if not 0 < gamma <= 1 or not tau >= 0:
        raise ValueError(f"flexprefill: gamma must be in (0, 1] and tau >= 0, got gamma={gamma}, tau={tau}")
    mask, qb0, _ = flexprefill_block_mask(q, k, _scale(scale, q.shape[-1]), gamma, tau, min_budget, max_budget, block_size)
    return selection_from_masks(_tiles_first(_widened(mask, qb0, local_window, dense_last_block, block_size)), block_size)


def vertical_slash_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    vertical_size: int,
    slash_size: int,
    last_q: int = 64,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
    block_size: int = 64,
    scale: float | None = None,
) -> BlockSelection:
    """Vertical-slash index lists: slash lines as KV blocks, vertical lines as single KV columns."""
    from sparse_llm.sparse.vertical_slash import vertical_slash_selection_masks

    if vertical_size < 1 or slash_size < 1 or last_q < 1:
        raise ValueError(f"vertical_size, slash_size and last_q must be >= 1, got {vertical_size}, {slash_size}, {last_q}")
    blocks, _, v_idx, cols = vertical_slash_selection_masks(
        q, k, _scale(scale, q.shape[-1]), vertical_size, slash_size, last_q, sink_tokens, local_diagonals, block_size
    )
    nqb = blocks.shape[2]
    pos = v_idx[:, None].expand(-1, nqb, -1, -1).reshape(-1, v_idx.shape[1], v_idx.shape[2])
    return selection_from_masks(_tiles_first(blocks), block_size, pos, _tiles_first(cols))


def xattention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: float | list[float] = 0.9,
    stride: int = 8,
    block_size: int = 128,
    scale: float | None = None,
    implementation: str = "auto",
    local_window: int = 128,
    dense_last_block: bool = True,
    vertical_gamma: float = 0.99,
) -> tuple[torch.Tensor, float]:
    """XAttention: antidiagonal block scoring, blocks kept up to `threshold` of the estimated mass
    (a scalar or one value per query head); sink and diagonal blocks always kept. `local_window`,
    `dense_last_block` and `vertical_gamma` as in XAttentionConfig (the defaults here are the config's; the
    paper: 0 / False / 0)."""
    _check_qkv(q, k, v)
    sel = xattention_selection(q, k, threshold, stride, block_size, scale, implementation, local_window, dense_last_block,
                               vertical_gamma)
    return _run_selection(q, k, v, sel, block_size, _scale(scale, q.shape[-1]), implementation)


def flexprefill_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: float = 0.9,
    tau: float = 0.1,
    block_size: int = 128,
    min_budget: int = 1024,
    max_budget: int | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    local_window: int = 128,
    dense_last_block: bool = True,
) -> tuple[torch.Tensor, float]:
    """FlexPrefill: per head, query-aware blocks or vertical-slash blocks covering `gamma` of the
    attention, switched by sqrt(JS divergence) < tau; budgets in tokens. `local_window` and
    `dense_last_block` as in FlexPrefillConfig (the defaults here are the config's; the paper: 0 / False)."""
    _check_qkv(q, k, v)
    sel = flexprefill_selection(q, k, gamma, tau, block_size, min_budget, max_budget, scale, local_window, dense_last_block)
    return _run_selection(q, k, v, sel, block_size, _scale(scale, q.shape[-1]), implementation)


def vertical_slash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vertical_size: int,
    slash_size: int,
    last_q: int = 64,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
    block_size: int = 64,
    scale: float | None = None,
    implementation: str = "auto",
) -> tuple[torch.Tensor, float]:
    """MInference vertical-slash: top `vertical_size` key columns and `slash_size` diagonals from the
    last `last_q` queries (sinks and local diagonals forced)."""
    _check_qkv(q, k, v)
    sel = vertical_slash_selection(q, k, vertical_size, slash_size, last_q, sink_tokens, local_diagonals, block_size, scale)
    return _run_selection(q, k, v, sel, block_size, _scale(scale, q.shape[-1]), implementation)


def skip_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold_scale_factor: float,
    scale: float | None = None,
    implementation: str = "auto",
) -> tuple[torch.Tensor, float]:
    """BLASST / TensorRT-LLM skip-softmax with λ = threshold_scale_factor / Sk; sparsity = skipped
    fraction of the KV tiles visited (0 <= factor; 0 or λ >= 1 means dense)."""
    _check_qkv(q, k, v)
    if not (math.isfinite(threshold_scale_factor) and threshold_scale_factor >= 0):
        raise ValueError(f"threshold_scale_factor must be a finite number >= 0, got {threshold_scale_factor!r}")
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    sc = _scale(scale, d)
    lam = threshold_scale_factor / sk
    log_lam = math.log(lam) if 0 < lam < 1 else float("-inf")
    if _use_triton(implementation, q.device):
        from sparse_llm.kernels.prefill import paged_prefill

        qp = q.transpose(1, 2).reshape(b * sq, h, d)
        cache = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=1)  # [B, 2, Sk, Hkv, D]: a page per row
        i32 = torch.int32
        cu = torch.arange(b + 1, dtype=i32, device=q.device) * sq
        lens = torch.full((b,), sk, dtype=i32, device=q.device)
        tables = torch.arange(b, dtype=i32, device=q.device)[:, None]
        stats = torch.zeros(b, 2, dtype=i32, device=q.device)
        lam_t = torch.full((b,), log_lam, dtype=torch.float32, device=q.device)
        out = paged_prefill(qp, cache, cu, lens, tables, sq, sc, log_lambda=lam_t, stats=stats)
        total, skipped = int(stats[:, 0].sum()), int(stats[:, 1].sum())
        return out.view(b, sq, h, d).transpose(1, 2), (skipped / total if total else 0.0)
    from sparse_llm.backends.skip_softmax_torch import skip_softmax_prefill_reference

    outs, total, skipped = [], 0, 0
    for i in range(b):
        o, t, s = skip_softmax_prefill_reference(
            q[i].transpose(0, 1), k[i].transpose(0, 1), v[i].transpose(0, 1), sc, log_lam
        )
        outs.append(o.transpose(0, 1))
        total += t
        skipped += s
    return torch.stack(outs), (skipped / total if total else 0.0)
