"""Pages every decode attends whatever their score: the attention sink (first pages) and the recent window
(the pages just before the current one), for Quest's `sink_pages` / `recent_pages` (configs.sparse_more).

The Triton top-k ranks a row of page scores S [N, lists, max_pages] over the "ranked" pages p < n_pages - 1
(the current page is not ranked: the decode kernel adds it). Setting S to +inf on the forced ranked pages
makes every top-k path (the sort keys and the bisection both order +inf above any finite score, ties to the
lower page) list them first, inside the same k, so the forced pages count against the budget exactly as in
the torch reference `sparse.quest.mask_scores`. Two in-place writes on device tensors, no host sync, so the
decode step stays graph-capturable. Entries of unranked pages are never read by the top-k (masked loads), so
writing +inf there is harmless.
"""
from __future__ import annotations

import torch


def force_pages_(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, sink_pages: int,
                 recent_pages: int) -> None:
    """In place: +inf on pages [0, sink_pages) and on the recent_pages - 1 ranked pages before each decode's
    current page (recent_pages counts the current page, as QuestConfig does). Must run after the softmax
    partials of the group mode are taken (the +inf then sums to +inf in the group reduce)."""
    if sink_pages < 0 or recent_pages < 1:
        raise ValueError(f"force_pages_: sink_pages={sink_pages} must be >= 0 and recent_pages={recent_pages} >= 1")
    n, lists, max_pages = scores.shape
    if sink_pages:
        scores[:, :, :min(sink_pages, max_pages)] = float("inf")
    if recent_pages > 1 and max_pages:
        n_ranked = (seq_lens.long() + page_size - 1) // page_size - 1  # [N] pages before the current one
        back = torch.arange(1, recent_pages, device=scores.device)
        # Fewer ranked pages than the window: the clamp lands on page 0 (or a ranked page twice); then every ranked
        # page fits in k anyway, so only the listing order changes.
        idx = (n_ranked[:, None] - back[None, :]).clamp(0, max_pages - 1)  # [N, recent_pages - 1]
        scores.scatter_(2, idx[:, None, :].expand(n, lists, idx.shape[1]), float("inf"))
