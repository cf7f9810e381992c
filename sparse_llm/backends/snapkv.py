"""SnapKV and Ada-SnapKV in torch (CPU and CUDA): dense prefill, prompt compression of the paged cache, dense
decode over the kept tokens.

Cache layout after compaction (engine/compaction.py decides who compacts and frees the blocks past the new
length C of the sequence; backends/kv_compaction.py moves the tokens):
- every KV head h packs its n_h kept tokens (sorted prefix picks, then the window) into slots [0, n_h); K is
  stored after RoPE, so the tokens keep their original positions;
- SnapKV: n_h = prompt_budget for every head and layer, so C = prompt_budget and nothing is masked;
- Ada-SnapKV: n_h varies per head and layer (sum over heads = Hkv x prompt_budget). The block table is shared
  by all layers, so C = max over layers and heads of n_h (each layer raises meta.compact_to to its own max in
  `on_step_end`). Decode attends, per head, slots [0, n_h) and [C, kv_len) (the generated tokens): slots
  [n_h, C) of head h are masked. Memory: C slots per sequence, i.e. the largest head, not the mean;
  ceil(C / block_size) blocks instead of ceil(prompt_len / block_size).

Per-sequence state (per layer): the trailing window queries across prefill chunks, the selection between the
forward and `on_step_end`, then the packed per-head lengths, the prompt length and C (learned at the first
decode step, whose KV length is C + 1). Not CUDA-graph capturable (host-side bookkeeping per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.backends.kv_compaction import pack_kept_tokens
from sparse_llm.backends.prompt_window import PromptWindowBackend
from sparse_llm.backends.snapkv_select import ada_keep, snapkv_keep, window_scores
from sparse_llm.backends.torch_dense import gather_kv_batch
from sparse_llm.configs.sparse_more import SnapKVParams


@dataclass(slots=True)
class Compacted:
    """One compacted sequence in one layer."""

    head_lens: torch.Tensor  # [Hkv] long, on the host: kept tokens per KV head (slots [0, n_h))
    prompt_len: int  # tokens the prompt had before compaction
    cache_len: int | None = None  # C: the sequence's cache length right after compaction (all layers)


class SnapKVBackend(PromptWindowBackend):
    name = "torch"
    algorithms = frozenset({"snapkv", "ada_snapkv"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params: SnapKVParams):
        super().__init__(layer, params)
        if params.algorithm == "ada_snapkv" and params.floor_alpha is None:
            raise ValueError("ada_snapkv params need floor_alpha (a number in [0, 1])")
        self.compacted: dict[int, Compacted] = {}  # pending: seq_id -> (keep, lens)

    # --- selection ------------------------------------------------------------------------------------
    def select(self, q_window: torch.Tensor, keys: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [Hkv, n_max] cache positions, -1 padded; lens [Hkv]) for one prompt."""
        p = self.params
        score = window_scores(q_window, keys, self.layer.scale, p.kernel_size, p.pooling)
        if p.algorithm == "ada_snapkv":
            return ada_keep(score, budget, q_window.shape[0], p.floor_alpha)
        keep = snapkv_keep(score, budget, q_window.shape[0])
        return keep, torch.full((keep.shape[0],), budget, dtype=torch.long, device=keep.device)

    def _decode(self, q: torch.Tensor, cache: dict[str, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Dense attention over each head's valid slots: [0, n_h) and [C, kv_len) when compacted, else all."""
        kv = cache["kv"]
        n0 = meta.num_prefills
        lens = meta.seq_lens[n0:].long()
        seq_lens = meta.seq_lens_cpu[n0:] if meta.seq_lens_cpu is not None else lens.tolist()
        seq_ids = meta.seq_ids[n0:] if meta.seq_ids is not None else [None] * len(seq_lens)
        B, H, D = q.shape
        Hkv = self.layer.num_kv_heads
        head_lens = torch.zeros(B, Hkv, dtype=torch.long)
        cache_lens = torch.zeros(B, dtype=torch.long)
        total = torch.tensor(seq_lens, dtype=torch.long) * Hkv  # uncompacted: every token of every head
        skipped = torch.zeros(B, dtype=torch.long)
        for j, (sid, n) in enumerate(zip(seq_ids, seq_lens)):
            self.window_q.pop(sid, None)
            c = self.compacted.get(sid)
            if c is None:
                continue
            if c.cache_len is None:
                c.cache_len = n - 1  # the first decode writes slot C
            generated = n - c.cache_len
            head_lens[j], cache_lens[j] = c.head_lens, c.cache_len
            total[j] = (c.prompt_len + generated) * Hkv
            skipped[j] = c.prompt_len * Hkv - int(c.head_lens.sum())
        max_len = max(seq_lens)
        k, v = gather_kv_batch(kv, meta.block_tables[n0:], max_len)  # [B, L, Hkv, D]
        slot = torch.arange(max_len, device=q.device)
        in_seq = slot[None, :] < lens[:, None]  # [B, L]
        k = torch.where(in_seq[:, :, None, None], k, 0).to(q.dtype)  # unwritten slots may hold NaN
        v = torch.where(in_seq[:, :, None, None], v, 0).to(q.dtype)
        head_lens, cache_lens = head_lens.to(q.device), cache_lens.to(q.device)
        kept = (slot[None, None, :] < head_lens[:, :, None]) | (slot[None, None, :] >= cache_lens[:, None, None])
        attend = kept & in_seq[:, None, :]  # [B, Hkv, L]

        qg = q.view(B, Hkv, H // Hkv, D)
        s = torch.einsum("bkgd,blkd->bkgl", qg, k)
        s = s.to(torch.promote_types(s.dtype, torch.float32)) * self.layer.scale  # softmax in >= fp32
        s = s.masked_fill(~attend[:, :, None, :], float("-inf"))
        o = torch.einsum("bkgl,blkd->bkgd", torch.softmax(s, -1).to(v.dtype), v)

        self.stats.add("decode", int(total.sum()), int(skipped.sum()))
        if meta.seq_stats is not None:
            meta.seq_stats[n0:, 0] += total.to(meta.seq_stats.device)
            meta.seq_stats[n0:, 1] += skipped.to(meta.seq_stats.device)
        return o.reshape(B, H, -1)

    # --- lifecycle ------------------------------------------------------------------------------------
    def on_step_end(self, cache, meta):
        """Pack the kept tokens of the sequences that finished their prompt this step; raise compact_to to the
        longest head (Ada-SnapKV) so the engine keeps enough slots for every layer."""
        if meta.num_prefills == 0 or meta.compact_to is None:
            return
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
        for i in range(meta.num_prefills):
            if not meta.compact_to[i]:
                continue
            sid = meta.seq_ids[i]
            keep, head_lens = self.pending.pop(sid)
            pack_kept_tokens(cache["kv"], meta.block_tables[i], seq_lens[i], keep)
            self.compacted[sid] = Compacted(head_lens.cpu(), seq_lens[i])  # host copy: decode plans on the host
            meta.compact_to[i] = max(meta.compact_to[i], int(head_lens.max()))

    def on_sequence_freed(self, seq_id: int) -> None:
        self.window_q.pop(seq_id, None)
        self.pending.pop(seq_id, None)
        self.compacted.pop(seq_id, None)
