"""SnapKV and Ada-SnapKV token selection in vectorised torch (the reference; runs on CPU and CUDA).

1. `window_scores`: the softmax attention of the last W prompt queries over the prefix, summed over the window
   and the query heads of each KV group, pooled over positions (max or avg, kernel_size, same padding).
2. `snapkv_keep`: per KV head the top (budget - W) prefix tokens plus the window: equal lengths.
3. `ada_keep`: Ada-SnapKV's allocation: every head first gets its own top floor_alpha x (budget - W), the rest of
   the layer's Hkv x (budget - W) prefix slots go to the layer-wide top scores, so lengths differ per head (their
   sum is Hkv x budget, hence max_h n_h >= budget).
Ties go to the earlier position (and, across heads, to the lower head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg")


def window_scores(
    q_window: torch.Tensor,  # [W, H, D]: queries of the last W prompt positions
    k: torch.Tensor,  # [L, Hkv, D]: the prompt's keys in position order
    scale: float,
    kernel_size: int,
    pooling: str,
) -> torch.Tensor:
    """[Hkv, L - W] pooled scores of the prefix tokens (the window itself is always kept)."""
    if pooling not in POOLINGS:
        raise ValueError(f"snapkv pooling={pooling!r}: allowed {list(POOLINGS)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"snapkv kernel_size={kernel_size}: must be odd and >= 1 (same padding)")
    W, H, D = q_window.shape
    L, Hkv, _ = k.shape
    if not W < L:
        raise ValueError(f"window_scores needs window ({W}) < prompt length ({L})")
    G = H // Hkv
    dt = torch.promote_types(q_window.dtype, torch.float32)  # float64 inputs stay float64 (tests)
    s = torch.einsum("wkgd,lkd->kgwl", q_window.to(dt).view(W, Hkv, G, D), k.to(dt)) * scale  # [Hkv, G, W, L]
    qpos = torch.arange(L - W, L, device=k.device)
    s = s.masked_fill(torch.arange(L, device=k.device)[None, :] > qpos[:, None], float("-inf"))
    score = torch.softmax(s, -1)[..., : L - W].sum((1, 2))[:, None]  # [Hkv, 1, prefix]
    pad = kernel_size // 2
    if pooling == "max":
        return F.max_pool1d(score, kernel_size, stride=1, padding=pad)[:, 0]
    return F.avg_pool1d(score, kernel_size, stride=1, padding=pad)[:, 0]  # zero padding counts (SnapKV's)


def _stable_top(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest entries along the last dim, ties to the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]


def snapkv_keep(score: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Sorted kept positions per KV head, [Hkv, budget]: the top (budget - W) prefix tokens, then the window."""
    Hkv, prefix = score.shape
    if not window < budget < prefix + window:
        raise ValueError(f"snapkv needs window ({window}) < prompt_budget ({budget}) < prompt length ({prefix + window})")
    top = torch.sort(_stable_top(score, budget - window), dim=-1).values
    win = torch.arange(prefix, prefix + window, device=score.device).expand(Hkv, window)
    return torch.cat([top, win], -1)


def ada_keep(score: torch.Tensor, budget: int, window: int, floor_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ada-SnapKV: (keep [Hkv, n_max], lens [Hkv]); head h keeps keep[h, :lens[h]] (sorted prefix picks, then the
    window), entries past lens[h] are -1. sum(lens) = Hkv x budget."""
    if not 0.0 <= floor_alpha <= 1.0:
        raise ValueError(f"ada_snapkv floor_alpha={floor_alpha}: must be in [0, 1]")
    Hkv, prefix = score.shape
    if not window < budget < prefix + window:
        raise ValueError(f"ada_snapkv needs window ({window}) < prompt_budget ({budget}) < prompt length ({prefix + window})")
    share = budget - window
    floor = int(floor_alpha * share)
    chosen = torch.zeros(Hkv, prefix, dtype=torch.bool, device=score.device)
    if floor:
        chosen.scatter_(-1, _stable_top(score, floor), True)
    rest = Hkv * (share - floor)
    if rest:
        flat = score.masked_fill(chosen, float("-inf")).flatten()  # head-major: ties go to the lower head
        chosen.view(-1)[_stable_top(flat, rest)] = True
    counts = chosen.sum(-1)  # [Hkv]
    pos = torch.arange(prefix, device=score.device)
    picks = torch.sort(torch.where(chosen, pos, prefix + window), dim=-1).values[:, : int(counts.max())]
    n_max = int(counts.max()) + window
    keep = torch.full((Hkv, n_max), -1, dtype=torch.long, device=score.device)
    keep[:, : picks.shape[1]] = torch.where(picks < prefix, picks, -1)
    cols = counts[:, None] + torch.arange(window, device=score.device)  # the window right after each head's picks
    keep.scatter_(-1, cols, torch.arange(prefix, prefix + window, device=score.device).expand(Hkv, window))
    return keep, counts + window
