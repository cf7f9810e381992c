"""Quest decode on the paged engine: per-page key min/max kept in an auxiliary paged cache, top pages
per query head at each decode step, the block-sparse kernel (Triton) or the masked reference (torch)
over them. Prefill is dense (the same kernel with every causal block listed, or the reference).

The min/max cache has `block_size // page_size` Quest pages per KV block, so it is allocated, shared
(prefix caching) and freed with the KV blocks themselves. After each K/V write, every page that
received a token is recomputed from the cache over its valid prefix (offsets up to the last one
written): decode steps touch one page per sequence.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import CacheSpec
from sparse_llm.backends.block_sparse_common import BlockSparseBackend, host_lens
from sparse_llm.configs.sparse_more import QuestParams
from sparse_llm.sparse.quest import page_scores, quest_selection, quest_topk

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
        specs.append(CacheSpec(MINMAX, (block_size // ps, 2, self.layer.num_kv_heads, self.layer.head_dim), dtype))
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
        mm = minmax[blocks, (pages % ppb)[None, :]]  # [Nd, P, 2, Hkv, D]
        scores = page_scores(q, mm[:, :, 0], mm[:, :, 1])
        n_pages = (meta.seq_lens[npf:].long() + ps - 1) // ps
        return quest_selection(scores, n_pages, self.params.token_budget // ps, ps)


class QuestTritonBackend(QuestTorchBackend):
    """Quest through Triton: page scores read straight from the paged min/max cache, then the
    block-sparse kernel (CUDA; CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    use_triton = True
    devices = frozenset({"cuda", "cpu"})

    def decode_selection(self, q, cache, meta):
        from sparse_llm.kernels.quest_scores import quest_scores_paged

        ps = self.params.page_size
        npf = meta.num_prefills
        _, seq_lens = host_lens(meta)
        max_pages = -(-max(seq_lens[npf:]) // ps)
        scores = quest_scores_paged(q, cache[MINMAX], meta.block_tables[npf:], meta.seq_lens[npf:], ps, max_pages)
        return quest_topk(scores, self.params.token_budget // ps, ps)
