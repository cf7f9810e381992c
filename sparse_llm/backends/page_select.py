"""The page-sparse decode step shared by the Triton RocketKV and Quest backends: score, top-k, attend.

score: `kernels.page_scores` (per KV head, group-reduced softmax of the min/max bounds; or, per_query_head,
each query head's raw Quest bound);
top-k: `kernels.page_scores.select_top_pages` (Triton sorts of candidate keys per KV head; per query head a
bisection on the score bits, no sort of the row; ties to the lower page);
attend: `kernels.page_sparse_decode.page_sparse_decode` (each selected K/V page read once per GQA group, or
once per query head with per-query-head lists; the current page added by the kernel). Three steps, no host
sync: graph-capturable when `max_pages` is fixed by the caller. Torch reference of the selection:
`backends.rocket_select.select_pages` (per KV head), `sparse.quest.quest_selection` (per query head).
"""
from __future__ import annotations

import torch

from sparse_llm.backends.rocket_select import channel_mask
from sparse_llm.kernels.page_scores import select_top_pages
from sparse_llm.kernels.page_sparse_decode import page_sparse_decode


def select_page_lists(
    q: torch.Tensor,  # [N, H, D]
    lo: torch.Tensor,  # [num_blocks, PPB, Hkv, D] view of the page minima
    hi: torch.Tensor,  # same, maxima
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    max_pages: int,
    topr: int,
    k_others: int,
    scale: float,
    per_query_head: bool = False,
    sink_pages: int = 0,
    recent_pages: int = 1,
    spread_weight: float = 1.0,
) -> torch.Tensor:
    """int32 [N, Hkv, min(k_others, max_pages - 1)] ranked pages per KV head (-1 = unused), or [N, H, ...] per
    query head (per_query_head: Quest's paper mode); the current page is not listed (the decode kernel adds it).
    sink_pages / recent_pages: pages always listed (Quest; recent_pages counts the current page);
    spread_weight: Quest's score q·centre + w Σ|q_d| half-range (1 = the min/max bound)."""
    n, h, _ = q.shape
    hkv = lo.shape[2]
    k = min(k_others, max_pages - 1)
    if k < 1:
        return torch.empty(n, h if per_query_head else hkv, 0, dtype=torch.int32, device=q.device)
    mask = channel_mask(q, hkv, topr)
    qm = q if mask is None else q * mask.repeat_interleave(h // hkv, 1).to(q.dtype)
    return select_top_pages(qm, lo, hi, block_tables, seq_lens, page_size, max_pages, scale, k, per_query_head,
                            sink_pages, recent_pages, spread_weight)


def page_sparse_step(
    q, cache_kv, lo, hi, block_tables, seq_lens, page_size: int, max_pages: int, topr: int, k_others: int,
    scale: float, out: torch.Tensor | None = None, per_query_head: bool = False, sink_pages: int = 0,
    recent_pages: int = 1, spread_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output [N, H, D], the page lists [N, Hkv or H, K]) of one decode step."""
    pages = select_page_lists(q, lo, hi, block_tables, seq_lens, page_size, max_pages, topr, k_others, scale,
                              per_query_head, sink_pages, recent_pages, spread_weight)
    o = page_sparse_decode(q, cache_kv, pages, block_tables, seq_lens, page_size, scale, out=out)
    return o, pages


def attended_tokens(pages: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """int64 [N]: tokens attended summed over the lists (KV or query heads; full listed pages plus the partial
    current page)."""
    listed = (pages >= 0).sum((1, 2))
    current = seq_lens.long() - (seq_lens.long() - 1) // page_size * page_size
    return listed * page_size + current * pages.shape[1]
