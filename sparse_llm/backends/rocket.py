"""RocketKV in torch: dense prefill, prompt compression of the paged cache, KT-cache top-k page decode.

Cache layout: the usual paged K/V plus an auxiliary "kt" cache [num_blocks, 2, block_size // page_size,
Hkv, D] (channel-wise min, max of K per page of cache slots), indexed by the same block table.
Every KV head keeps exactly prompt_budget tokens, so compaction packs each head's kept tokens into slots
[0, prompt_budget) of the sequence; slot j of head h and of head h' may hold different original tokens,
which is fine because K is stored after RoPE. The engine (engine/compaction.py) decides which sequences
compact (meta.compact_to), then frees the blocks past the new length.

Per-sequence state: the queries of the prompt's last window_size positions, kept across prefill chunks so
a last chunk shorter than the window still scores with the full window.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import AttentionMetadata, CacheSpec, write_kv
from sparse_llm.backends.prompt_window import PromptWindowBackend
from sparse_llm.backends.rocket_select import page_minmax, prompt_keep_indices, select_pages
from sparse_llm.backends.torch_dense import gather_kv
from sparse_llm.configs.params import RocketParams

KT_DTYPES = {"bfloat16": torch.bfloat16, "float8_e5m2": torch.float8_e5m2}


class TorchRocketBackend(PromptWindowBackend):
    name = "torch"
    algorithms = frozenset({"rocket"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params: RocketParams):
        super().__init__(layer, params)
        if params.kt_cache_dtype not in KT_DTYPES:
            raise ValueError(f"rocket kt_cache_dtype={params.kt_cache_dtype!r}: allowed {sorted(KT_DTYPES)}")
        self.compacted: set[int] = set()  # pending: seq_id -> kept cache positions [Hkv, budget]

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        ps = self.params.page_size
        if block_size % ps:
            raise ValueError(
                f"rocket page_size={ps} must divide kv_cache_config.block_size={block_size} (use a page_size <= block_size)"
            )
        kt = CacheSpec("kt", (2, block_size // ps, self.layer.num_kv_heads, self.layer.head_dim),
                       KT_DTYPES[self.params.kt_cache_dtype])
        return super().cache_spec(block_size, dtype) + [kt]

    # --- prompt compression and decode ---------------------------------------------------------------
    def select(self, q_window: torch.Tensor, keys: torch.Tensor, budget: int) -> torch.Tensor:
        """Kept cache positions [Hkv, budget] of one prompt (SnapKV-style window scores, max-pooled)."""
        return prompt_keep_indices(q_window, keys, self.layer.scale, self.params.kernel_size, budget)

    def _decode(self, q: torch.Tensor, cache: dict[str, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        p, ps = self.params, self.params.page_size
        n0, nd = meta.num_prefills, meta.num_decodes
        lens = meta.seq_lens[n0:].long()
        tables = meta.block_tables[n0:]
        self._update_current_page(cache, tables, lens, meta.slot_mapping[meta.num_prefill_tokens:])

        seq_lens = meta.seq_lens_cpu[n0:] if meta.seq_lens_cpu is not None else lens.tolist()
        max_len = max(seq_lens)
        P = -(-max_len // ps)
        kmin, kmax = self._read_pages(cache["kt"], tables, P)
        num_pages = (lens + ps - 1) // ps
        picked = select_pages(q, kmin, kmax, num_pages, p.topr, p.topk, self.layer.scale)  # [B, Hkv, P]
        if p.seq_len_threshold is not None and meta.seq_ids is not None:
            # Below the threshold an uncompacted sequence stays dense.
            dense = [sid not in self.compacted and n < p.seq_len_threshold for sid, n in zip(meta.seq_ids[n0:], seq_lens)]
            picked |= torch.tensor(dense, device=q.device)[:, None, None]
        o = self._attend_pages(q, cache["kv"], tables, lens, picked)
        in_range = torch.arange(P, device=q.device)[None, :] < num_pages[:, None]
        total = num_pages * self.layer.num_kv_heads
        selected = (picked & in_range[:, None, :]).sum((1, 2))
        self.stats.add("decode", int(total.sum()), int((total - selected).sum()))
        if meta.seq_stats is not None:
            meta.seq_stats[n0:, 0] += total
            meta.seq_stats[n0:, 1] += total - selected
        return o

    def _attend_pages(self, q, kv, tables, lens, picked) -> torch.Tensor:
        """Attention of q [B, H, D] over only the picked pages (bool [B, Hkv, P]) of each KV head: gathers
        max-picked-pages x page_size keys per head, not the whole context."""
        ps, bs = self.params.page_size, kv.shape[2]
        B, H, D = q.shape
        Hkv = picked.shape[1]
        width = int(picked.sum(-1).max())
        order = picked.to(torch.int8).topk(width, -1)  # picked pages first (values 1), then padding (0)
        page, listed = order.indices, order.values.bool()  # [B, Hkv, width]
        pos = (page[..., None] * ps + torch.arange(ps, device=q.device)).flatten(2)  # [B, Hkv, T]
        ok = listed.repeat_interleave(ps, -1) & (pos < lens[:, None, None])
        blk = tables.long().gather(1, (pos // bs).flatten(1).clamp(max=tables.shape[1] - 1)).view_as(pos)
        heads = torch.arange(Hkv, device=q.device)[None, :, None]
        k = torch.where(ok[..., None], kv[blk, 0, pos % bs, heads], 0).to(q.dtype)  # [B, Hkv, T, D]
        v = torch.where(ok[..., None], kv[blk, 1, pos % bs, heads], 0).to(q.dtype)
        qg = q.view(B, Hkv, H // Hkv, D)
        s = torch.einsum("bkgd,bktd->bkgt", qg, k)
        s = s.to(torch.promote_types(s.dtype, torch.float32)) * self.layer.scale  # softmax in >= fp32
        s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
        return torch.einsum("bkgt,bktd->bkgd", torch.softmax(s, -1).to(v.dtype), v).reshape(B, H, -1)

    # --- KT cache -------------------------------------------------------------------------------------
    @staticmethod
    def _page_location(tables: torch.Tensor, pages: torch.Tensor, per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block id, page index within the block) of cache pages [B, P] of sequences with block tables [B, *]."""
        blk = tables.long().gather(1, (pages // per_block).clamp(max=tables.shape[1] - 1))
        return blk, pages % per_block

    def _read_pages(self, kt: torch.Tensor, tables: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        pages = torch.arange(P, device=tables.device).expand(tables.shape[0], P)
        blk, local = self._page_location(tables, pages, kt.shape[2])
        entry = kt[blk, :, local].float()  # [B, P, 2, Hkv, D]
        return entry[:, :, 0], entry[:, :, 1]

    def _write_pages(self, cache, tables: torch.Tensor, first_page: torch.Tensor, num_pages: int, lens: torch.Tensor):
        """Recompute KT entries of pages [first_page, first_page + num_pages) of each sequence from its K."""
        kv, kt = cache["kv"], cache["kt"]
        ps, bs = self.params.page_size, kv.shape[2]
        pages = first_page[:, None] + torch.arange(num_pages, device=tables.device)[None, :]  # [B, n]
        tok = pages[:, :, None] * ps + torch.arange(ps, device=tables.device)  # [B, n, ps]
        tok_blk = tables.long().gather(1, (tok // bs).flatten(1).clamp(max=tables.shape[1] - 1)).view_as(tok)
        keys = kv[tok_blk, 0, tok % bs]  # [B, n, ps, Hkv, D]
        valid = tok < lens[:, None, None]
        kmin, kmax = page_minmax(keys.flatten(1, 2), valid.flatten(1), ps)  # [B, n, Hkv, D]
        has = valid[:, :, 0]
        blk, local = self._page_location(tables, pages, kt.shape[2])
        entry = torch.stack([kmin, kmax], 2).to(kt.dtype)  # [B, n, 2, Hkv, D]
        kt[blk[has], :, local[has]] = entry[has]

    def _update_current_page(self, cache, tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep the KT entry of each decode sequence's current page exact (it changes with every new token).

        Device-only (CUDA-graph safe): no boolean indexing, no host sync. Rows whose slot is -1 (the padding
        rows of a replayed decode graph: length 1, block table of zeros) must not write, but a masked write
        needs a sync, so they rewrite the first real row's entry (the same value to the same place), or, when
        no row is real, the entry already in the cache.
        """
        kv, kt = cache["kv"], cache["kt"]
        ps, bs = self.params.page_size, kv.shape[2]
        page = (lens - 1) // ps  # [B]
        tok = page[:, None] * ps + torch.arange(ps, device=tables.device)  # [B, ps]
        tok_blk = tables.long().gather(1, (tok // bs).clamp(max=tables.shape[1] - 1))
        kmin, kmax = page_minmax(kv[tok_blk, 0, tok % bs], tok < lens[:, None], ps)  # [B, 1, Hkv, D]
        entry = torch.stack([kmin[:, 0], kmax[:, 0]], 1).to(kt.dtype)  # [B, 2, Hkv, D]
        blk, local = self._page_location(tables, page[:, None], kt.shape[2])
        real = slots >= 0
        src = torch.where(real, torch.arange(real.shape[0], device=real.device), real.int().argmax(0, keepdim=True))
        blk, local, entry = blk[src, 0], local[src, 0], entry[src]
        entry = torch.where(real[src][:, None, None, None], entry, kt[blk, :, local])
        kt[blk, :, local] = entry

    # --- lifecycle ------------------------------------------------------------------------------------
    def on_step_end(self, cache, meta):
        """Compact the sequences that finished their prompt this step; refresh KT for all prefill chunks.

        Also drops the prompt-window queries of decoding sequences (kept out of forward so that a decode forward
        changes no Python state and can be replayed from a CUDA graph)."""
        if meta.seq_ids is not None:
            for sid in meta.seq_ids[meta.num_prefills:]:
                self.window_q.pop(sid, None)
        if meta.num_prefills == 0 or "kt" not in cache:
            return
        ps = self.params.page_size
        cu = meta.cu_seqlens_q.tolist()
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
        for i in range(meta.num_prefills):
            table = meta.block_tables[i:i + 1]
            start, kv_len = seq_lens[i] - (cu[i + 1] - cu[i]), seq_lens[i]
            target = 0 if meta.compact_to is None else meta.compact_to[i]
            if target:
                keep = self.pending.pop(meta.seq_ids[i])
                self._compact(cache["kv"], meta.block_tables[i], kv_len, keep)
                self.compacted.add(meta.seq_ids[i])
                start, kv_len = 0, target
            first = start // ps
            n = -(-kv_len // ps) - first
            lens = torch.tensor([kv_len], device=table.device)
            self._write_pages(cache, table, torch.tensor([first], device=table.device), n, lens)

    @staticmethod
    def _compact(kv: torch.Tensor, block_table: torch.Tensor, kv_len: int, keep: torch.Tensor) -> None:
        """Pack each KV head's kept tokens (keep [Hkv, budget], sorted cache positions) into slots [0, budget)."""
        k, v = gather_kv(kv, block_table, kv_len)  # [L, Hkv, D]
        idx = keep.T[:, :, None].expand(-1, -1, k.shape[-1])  # [budget, Hkv, D]
        kk, vv = k.gather(0, idx), v.gather(0, idx)  # copies: safe to write back over the source
        pos = torch.arange(keep.shape[1], device=kv.device)
        bs = kv.shape[2]
        slots = block_table[pos // bs].long() * bs + pos % bs
        write_kv(kv, kk, vv, slots)

    def on_sequence_freed(self, seq_id: int) -> None:
        self.window_q.pop(seq_id, None)
        self.pending.pop(seq_id, None)
        self.compacted.discard(seq_id)
