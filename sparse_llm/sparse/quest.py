"""Quest (Tang et al., ICML 2024): query-aware page selection at decode time.

Each page of `page_size` keys keeps its channel-wise key minimum and maximum. For a decode query q,
    score(page) = sum_d max(q_d * min_d, q_d * max_d)
upper-bounds q·k for every key k of the page. Each query head attends its top token_budget // page_size
pages; the page holding the current token is always kept (and optionally the first `sink_pages` and last
`recent_pages` pages, inside the budget); a sequence with no more pages than the
budget attends everything. Page statistics are per KV head; scores are per query head.
"""
from __future__ import annotations

import torch

from sparse_llm.sparse.block_selection import BlockSelection

# A full segmented sort can beat torch.topk for large k on GPUs; chosen by measurement (benchmarks/block_sparse.py).
TOPK_BY_SORT = False


def page_minmax(k: torch.Tensor, page_size: int, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k [..., S, Hkv, D] -> (min, max) per page [..., ceil(S / page_size), Hkv, D], over the first
    kv_len keys (a partial last page uses only its actual keys)."""
    s = k.shape[-3]
    kv_len = s if kv_len is None else kv_len
    n_pages = -(-kv_len // page_size)
    pad = n_pages * page_size - kv_len
    kk = k[..., :kv_len, :, :]
    lo = torch.nn.functional.pad(kk, (0, 0, 0, 0, 0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(kk, (0, 0, 0, 0, 0, pad), value=float("-inf"))
    shape = (*kk.shape[:-3], n_pages, page_size, *kk.shape[-2:])
    return lo.view(shape).amin(-3), hi.view(shape).amax(-3)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, spread_weight: float = 1.0) -> torch.Tensor:
    """q [N, H, D], kmin/kmax [N, P, Hkv, D] -> float32 [N, H, P]: sum_d max(q_d min_d, q_d max_d).

    Since min <= max, max(q_d min_d, q_d max_d) = max(q_d, 0) max_d + min(q_d, 0) min_d: two batched
    matmuls, with no [N, H, P, D] temporary. That is q·centre + Σ_d |q_d| half-range_d; spread_weight w < 1
    scores q·centre + w Σ_d |q_d| half-range_d = ½(q + w|q|)·max + ½(q − w|q|)·min instead (w = 1: the bound)."""
    n, h, d = q.shape
    hkv = kmin.shape[2]
    g = h // hkv
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(cd).view(n, hkv, g, d)
    lo = kmin.to(cd).permute(0, 2, 3, 1)  # [N, Hkv, D, P]
    hi = kmax.to(cd).permute(0, 2, 3, 1)
    if spread_weight == 1.0:
        return (qf.clamp(min=0) @ hi + qf.clamp(max=0) @ lo).view(n, h, -1)
    qa = spread_weight * qf.abs()
    return (0.5 * (qf + qa) @ hi + 0.5 * (qf - qa) @ lo).view(n, h, -1)


def select_pages(scores: torch.Tensor, n_pages: torch.Tensor, budget_pages: int) -> torch.Tensor:
    """scores [N, H, P] (pages >= n_pages[i] are padding) -> bool [N, H, P] of attended pages:
    the top budget_pages valid pages with the last valid page forced; all valid pages when there are
    at most budget_pages of them."""
    n, h, p = scores.shape
    dev = scores.device
    pages = torch.arange(p, device=dev)[None, None, :]
    npg = n_pages.to(dev).long()[:, None, None]
    valid = pages < npg
    s = scores.masked_fill(~valid, float("-inf"))
    s = torch.where(pages == npg - 1, torch.full_like(s, float("inf")), s)
    k = min(budget_pages, p)
    top = torch.topk(s, k, dim=-1).indices
    mask = torch.zeros(n, h, p, dtype=torch.bool, device=dev).scatter_(-1, top, True)
    return (mask & valid) | (valid & (npg <= budget_pages))


def mask_scores(scores: torch.Tensor, n_pages: torch.Tensor, sink_pages: int = 0, recent_pages: int = 1) -> torch.Tensor:
    """-inf on pages past each sequence's end; +inf (always kept) on its first `sink_pages` pages (the attention
    sink) and its last `recent_pages` pages (the current page and the ones before it)."""
    pages = torch.arange(scores.shape[-1], device=scores.device)[None, None, :]
    npg = n_pages.to(scores.device).long()[:, None, None]
    s = scores.masked_fill(pages >= npg, float("-inf"))
    forced = ((pages < sink_pages) | (pages >= npg - max(recent_pages, 1))) & (pages < npg)
    return torch.where(forced, torch.full_like(s, float("inf")), s)


def quest_topk(masked: torch.Tensor, budget_pages: int, page_size: int) -> BlockSelection:
    """Masked scores [N, H, P] -> fixed-width CSR selection (one row per decode tile and query head,
    min(budget_pages, P) ascending pages), with no host sync so decode steps can be captured in CUDA
    graphs. Rows with fewer valid pages list padding pages past the sequence end, which the kernel
    masks and the pair count ignores."""
    n, h, p = masked.shape
    k = min(budget_pages, p)
    if TOPK_BY_SORT:
        top = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        top = torch.topk(masked, k, dim=-1, sorted=False).indices
    top = top.sort(-1).values.to(torch.int32)
    offsets = torch.arange(n * h + 1, dtype=torch.int32, device=masked.device) * k
    return BlockSelection(page_size, h, offsets, top.reshape(-1))


def quest_selection(scores: torch.Tensor, n_pages: torch.Tensor, budget_pages: int, page_size: int,
                    sink_pages: int = 0, recent_pages: int = 1) -> BlockSelection:
    """The pages of `select_pages` as a fixed-width CSR selection (see quest_topk); the first sink_pages and last
    recent_pages pages are forced in (mask_scores) and count against budget_pages."""
    return quest_topk(mask_scores(scores, n_pages, sink_pages, recent_pages), budget_pages, page_size)
