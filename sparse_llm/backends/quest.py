"""Quest decode on the paged engine: per-page key min/max kept in an auxiliary paged cache, top pages
per query head at each decode step, the page-sparse decode step (Triton: scores, top-k, attention;
backends/page_select.py) or the masked reference (torch) over them. Prefill is dense (the block-sparse
kernel with every causal block listed, or the reference).

The min/max cache has `block_size // page_size` Quest pages per KV block, so it is allocated, shared
(prefix caching) and freed with the KV blocks themselves. After each K/V write, every page that
received a token is recomputed from the cache over its valid prefix (offsets up to the last one
written): decode steps touch one page per sequence.

Selection modes (QuestConfig.selection, docs/block_sparse.md): per query head (Quest's paper;
QuestTorchBackend, QuestTritonBackend) or per KV head (`group_selection`; QuestGroupTorchBackend,
QuestGroupTritonBackend): each query head's page bounds, scaled by the softmax scale, are softmaxed over the
pages and summed over the GQA group (RocketKV's reduction), and the group attends the top
token_budget // page_size pages (current page included) together, so each selected K/V page is read once
per group. `QuestGroupTorchBackend` is the torch reference of that mode.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from sparse_llm.backends.base import CacheSpec
from sparse_llm.backends.block_sparse_common import BlockSparseBackend, host_lens
from sparse_llm.configs.sparse_more import QuestParams
from sparse_llm.backends.rocket_select import group_page_scores
from sparse_llm.sparse.quest import mask_scores, page_scores, quest_selection, quest_topk

MINMAX = "quest_minmax"


def update_page_minmax(cache_kv: torch.Tensor, minmax: torch.Tensor, slot_mapping: torch.Tensor, page_size: int,
                       dedupe: bool) -> None:
    """Recompute min/max [num_blocks, pages_per_block, 2, Hkv, D] of the pages written through slot_mapping.

    dedupe: collapse tokens of the same page first (one host sync; prefill), else every token
    recomputes its page (decodes: one token per sequence, so no duplicates and no sync).
    """
    bs = cache_kv.shape[2]
    slots = slot_mapping[slot_mapping >= 0] if dedupe else slot_mapping.clamp(min=0)
    if slots.numel() == 0:
        return
    ppb = bs // page_size
    page = slots // page_size  # flat page id = block * ppb + sub
    last = slots % page_size  # in-page offset of the token
    if dedupe:
        last_of = torch.full((minmax.shape[0] * ppb,), -1, dtype=torch.long, device=slots.device)
        last_of.scatter_reduce_(0, page, last, reduce="amax")
        page = torch.unique(page)
        last = last_of[page]
    blk, sub = page // ppb, page % ppb
    offs = sub[:, None] * page_size + torch.arange(page_size, device=slots.device)[None, :]  # [n, ps]
    keys = cache_kv[blk[:, None], 0, offs].float()  # [n, ps, Hkv, D]
    valid = (torch.arange(page_size, device=slots.device)[None, :] <= last[:, None])[:, :, None, None]
    lo = torch.where(valid, keys, float("inf")).amin(1)
    hi = torch.where(valid, keys, float("-inf")).amax(1)
    new = torch.stack([lo, hi], dim=1).to(minmax.dtype)  # [n, 2, Hkv, D]
    if minmax.dtype == torch.float8_e5m2:  # index_put / where on the bits: fp8 kernels for them are not everywhere
        minmax, new = minmax.view(torch.uint8), new.view(torch.uint8)
    if dedupe:
        minmax[blk, sub] = new
    else:
        keep = (slot_mapping >= 0)[:, None, None, None]
        minmax[blk, sub] = torch.where(keep, new, minmax[blk, sub])


class QuestTorchBackend(BlockSparseBackend):
    """Quest through the masked torch reference (any device)."""

    name = "torch"
    algorithms = frozenset({"quest"})
    devices = frozenset({"cpu", "cuda"})
    # False: each query head picks its own pages; True: the GQA group picks together (see the module doc).
    group_selection: ClassVar[bool] = False

    def __init__(self, layer, params):
        if not isinstance(params, QuestParams):
            raise ValueError(f"{layer.module_name}: the quest backend needs QuestParams, got {type(params).__name__}")
        ps = params.page_size
        if ps < 1 or ps & (ps - 1) or params.token_budget < ps:
            raise ValueError(
                f"{layer.module_name}: quest page_size={ps} must be a power of two and token_budget="
                f"{params.token_budget} at least one page"
            )
        super().__init__(layer, params)

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        ps = self.params.page_size
        if block_size % ps:
            raise ValueError(
                f"quest page_size={ps} must divide the KV cache block_size={block_size} "
                f"(set kv_cache_config.block_size to a multiple of {ps}, or a smaller page_size)"
            )
        specs = super().cache_spec(block_size, dtype)
        mm_dtype = dtype if self.params.minmax_cache_dtype == "auto" else getattr(torch, self.params.minmax_cache_dtype)
        specs.append(CacheSpec(MINMAX, (block_size // ps, 2, self.layer.num_kv_heads, self.layer.head_dim), mm_dtype))
        return specs

    def update_cache(self, cache, meta):
        update_page_minmax(cache["kv"], cache[MINMAX], meta.slot_mapping, self.params.page_size,
                           dedupe=meta.num_prefill_tokens > 0)

    def decode_selection(self, q, cache, meta):
        ps = self.params.page_size
        npf = meta.num_prefills
        _, seq_lens = host_lens(meta)
        max_pages = -(-max(seq_lens[npf:]) // ps)
        minmax = cache[MINMAX]
        ppb = minmax.shape[1]
        pages = torch.arange(max_pages, device=q.device)
        tables = meta.block_tables[npf:].long()
        blocks = tables[:, (pages // ppb).clamp(max=tables.shape[1] - 1)]  # [Nd, P]; past the end: masked below
        if minmax.dtype == torch.float8_e5m2:  # gather the bits: fp8 index kernels are not on every device
            mm = minmax.view(torch.uint8)[blocks, (pages % ppb)[None, :]].view(minmax.dtype).float()
        else:
            mm = minmax[blocks, (pages % ppb)[None, :]]  # [Nd, P, 2, Hkv, D]
        n_pages = (meta.seq_lens[npf:].long() + ps - 1) // ps
        w = self.params.spread_weight
        if self.group_selection:
            dt = torch.promote_types(q.dtype, torch.float32)
            lo = torch.nan_to_num(mm[:, :, 0].to(dt), posinf=0.0, neginf=0.0)  # pages past the end: masked anyway
            hi = torch.nan_to_num(mm[:, :, 1].to(dt), posinf=0.0, neginf=0.0)
            if w != 1.0:  # the bound of the shrunk box centre ± w half-range is the spread-weighted score
                lo, hi = (lo + hi) / 2 - w * (hi - lo) / 2, (lo + hi) / 2 + w * (hi - lo) / 2
            scores = group_page_scores(q, lo, hi, n_pages, self.layer.head_dim, self.layer.scale)
            masked = mask_scores(scores, n_pages, self.params.sink_pages, self.params.recent_pages)
            return quest_topk(masked, self.params.token_budget // ps, ps)
        scores = page_scores(q, mm[:, :, 0], mm[:, :, 1], w)
        return quest_selection(scores, n_pages, self.params.token_budget // ps, ps, self.params.sink_pages,
                               self.params.recent_pages)


class QuestGroupTorchBackend(QuestTorchBackend):
    """The torch reference of the Triton backend's selection mode: one page list per KV head."""

    group_selection = True


class QuestTritonBackend(QuestTorchBackend):
    """Quest through Triton, one page list per query head (the paper's mode, the registry's default), through
    the page-sparse step (backends/page_select.py): page scores read straight from the paged min/max cache
    (each min/max entry once per GQA group), a Triton top-k per query head (the RocketKV sort kernels, each
    query head its own group of one), then the page-sparse decode kernel with one list per query head (CUDA;
    CPU under TRITON_INTERPRET=1). Selects the pages of QuestTorchBackend (ties aside); no host sync in the step."""

    name = "triton"
    use_triton = True
    devices = frozenset({"cuda", "cpu"})

    def __init__(self, layer, params):
        from sparse_llm.kernels.geometry import check_head_dim

        check_head_dim(layer.head_dim)  # the page-sparse decode kernel's head dims
        super().__init__(layer, params)

    def _decodes(self, q, cache, meta, seq_lens, out) -> None:
        from sparse_llm.backends.page_select import attended_tokens, page_sparse_step

        ps = self.params.page_size
        npf = meta.num_prefills
        lens = meta.seq_lens[npf:]
        mm = cache[MINMAX]
        max_pages = -(-max(seq_lens[npf:]) // ps)
        _, pages = page_sparse_step(
            q, cache["kv"], mm[:, :, 0], mm[:, :, 1], meta.block_tables[npf:], lens, ps, max_pages,
            self.layer.head_dim, self.params.token_budget // ps - 1, self.layer.scale, out=out,
            per_query_head=not self.group_selection, sink_pages=self.params.sink_pages,
            recent_pages=self.params.recent_pages, spread_weight=self.params.spread_weight,
        )
        # Query-key pairs summed over query heads, as the other block-sparse backends count.
        heads_per_list = self.layer.num_heads // pages.shape[1]
        attended = (attended_tokens(pages, lens, ps) * heads_per_list).tolist()
        for j, n in enumerate(seq_lens[npf:]):
            total = n * self.layer.num_heads
            self._count(meta, npf + j, "decode", total, min(total, attended[j]))


class QuestGroupTritonBackend(QuestTritonBackend):
    """Quest decode with one page list per KV head (`group_selection`; `selection: per_kv_head`) through the
    same page-sparse step (RocketKV's group-reduced scores). Not the registry default: at the same token_budget
    it is less accurate than per-query-head lists when the heads of a group look for different pages
    (tests/test_page_sparse_backends.py); at group_size x the budget it reads the same K/V as the per-head mode
    and is more accurate. Torch reference: QuestGroupTorchBackend."""

    group_selection = True
