"""RocketKV's two selection steps in vectorised torch (the reference the backend and future kernels follow).

1. Prompt compression (SnapKV): the last `window` prompt queries rank the prefix tokens per KV head.
2. Decode page selection: a KT cache holds, per page of `page_size` cache slots and KV head, the
   channel-wise min and max of K; the top-`topr` channels of |q| give an upper-bound score per page and
   the top-`topk` pages plus the current (last) page are attended.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prompt_keep_indices(
    q_window: torch.Tensor,  # [W, H, D]: queries of the last W prompt positions
    k: torch.Tensor,  # [L, Hkv, D]: the prompt's keys (cache order = position order before compaction)
    scale: float,
    kernel_size: int,
    budget: int,
) -> torch.Tensor:
    """Sorted cache positions kept per KV head, [Hkv, budget]: the top (budget - W) prefix tokens plus the window.

    Score of a prefix token = softmax probability summed over the window queries and the group's query heads,
    then max-pooled over positions (kernel_size, same padding). Ties go to the earlier position.
    """
    W, H, D = q_window.shape
    L, Hkv, _ = k.shape
    if not W < budget < L:
        raise ValueError(f"prompt compression needs window ({W}) < prompt_budget ({budget}) < prompt length ({L})")
    G = H // Hkv
    dt = torch.promote_types(q_window.dtype, torch.float32)  # float64 inputs stay float64 (tests)
    qf = q_window.to(dt).view(W, Hkv, G, D)
    s = torch.einsum("wkgd,lkd->kgwl", qf, k.to(dt)) * scale  # [Hkv, G, W, L]
    qpos = torch.arange(L - W, L, device=k.device)
    s = s.masked_fill(torch.arange(L, device=k.device)[None, :] > qpos[:, None], float("-inf"))
    prefix = L - W
    score = torch.softmax(s, -1)[..., :prefix].sum((1, 2))  # [Hkv, prefix]
    pooled = F.max_pool1d(score[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :budget - W]
    top = torch.sort(order, dim=-1).values
    window = torch.arange(prefix, L, device=k.device).expand(Hkv, W)
    return torch.cat([top, window], -1)


def page_minmax(k: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min/max of K per page: k [..., P * page_size, Hkv, D], valid [..., P * page_size] bool.

    Returns kmin, kmax [..., P, Hkv, D]; a page with no valid token gets (+inf, -inf).
    """
    shape = k.shape[:-3] + (k.shape[-3] // page_size, page_size) + k.shape[-2:]
    kp = k.to(torch.promote_types(k.dtype, torch.float32)).reshape(shape)
    vp = valid.reshape(shape[:-2])[..., None, None]
    kmin = torch.where(vp, kp, float("inf")).amin(-3)
    kmax = torch.where(vp, kp, float("-inf")).amax(-3)
    return kmin, kmax


def channel_mask(q: torch.Tensor, num_kv_heads: int, topr: int) -> torch.Tensor | None:
    """Bool [B, Hkv, D]: per KV head the top-topr channels of |q| summed over the group (None = all channels)."""
    B, H, D = q.shape
    if topr >= D:
        return None
    qg = q.to(torch.promote_types(q.dtype, torch.float32)).view(B, num_kv_heads, H // num_kv_heads, D)
    chan = qg.abs().sum(2).topk(topr, -1).indices  # [B, Hkv, r]
    return torch.zeros(B, num_kv_heads, D, dtype=torch.bool, device=q.device).scatter_(-1, chan, True)


def group_page_scores(
    q: torch.Tensor,  # [B, H, D]: one decode query per sequence
    kmin: torch.Tensor,  # [B, P, Hkv, D]
    kmax: torch.Tensor,  # [B, P, Hkv, D]
    num_pages: torch.Tensor,  # [B]: pages holding tokens (the last one is the current, maybe partial, page)
    topr: int,
    scale: float,
) -> torch.Tensor:
    """[B, Hkv, P] ranking scores of the filled pages before the current one (0 on every other page).

    Per KV head: channels = top-topr of |q| summed over the group's query heads; per query head, page score =
    Σ_channels max(q·kmin, q·kmax) (an upper bound of q·k on the page); softmax over pages, summed over the group.
    """
    B, H, D = q.shape
    P, Hkv = kmin.shape[1], kmin.shape[2]
    G = H // Hkv
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).view(B, Hkv, G, D)
    r = min(topr, D)
    chan = qg.abs().sum(2).topk(r, -1).indices  # [B, Hkv, r]
    qs = qg.gather(-1, chan[:, :, None, :].expand(B, Hkv, G, r))
    idx = chan[:, :, None, :].expand(B, Hkv, P, r)
    lo = kmin.to(dt).transpose(1, 2).gather(-1, idx)[:, :, None]  # [B, Hkv, 1, P, r]
    hi = kmax.to(dt).transpose(1, 2).gather(-1, idx)[:, :, None]
    qe = qs[:, :, :, None, :]
    s = torch.maximum(qe * lo, qe * hi).sum(-1) * scale  # [B, Hkv, G, P]
    pages = torch.arange(P, device=q.device)
    last = (num_pages.long() - 1).clamp(min=0)
    others = pages[None, :] < last[:, None]  # [B, P]: filled pages before the current one
    s = s.masked_fill(~others[:, None, None, :], float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0).sum(2)  # all -inf rows -> 0


def select_pages(
    q: torch.Tensor,  # [B, H, D]: one decode query per sequence
    kmin: torch.Tensor,  # [B, P, Hkv, D]
    kmax: torch.Tensor,  # [B, P, Hkv, D]
    num_pages: torch.Tensor,  # [B]: pages holding tokens (the last one is the current, maybe partial, page)
    topr: int,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """Bool [B, Hkv, P]: the pages each KV head attends (top min(topk, pages - 1) others plus the current page),
    ranked by `group_page_scores`."""
    B, P, Hkv = q.shape[0], kmin.shape[1], kmin.shape[2]
    pages = torch.arange(P, device=q.device)
    last = (num_pages.long() - 1).clamp(min=0)
    others = pages[None, :] < last[:, None]
    score = group_page_scores(q, kmin, kmax, num_pages, topr, scale)
    score = score.masked_fill(~others[:, None, :], -1.0)
    k = min(topk, P)
    picked = torch.zeros(B, Hkv, P, dtype=torch.bool, device=q.device)
    picked.scatter_(-1, score.topk(k, -1).indices, True)
    picked &= others[:, None, :]
    picked |= (pages[None, :] == last[:, None])[:, None, :]
    return picked
