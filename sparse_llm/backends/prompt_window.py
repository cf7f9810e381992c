"""What RocketKV and SnapKV share: dense prefill, then prompt compression chosen from the prompt's last window queries.

Both keep, per sequence and layer, the queries of the prompt's last `window_size` positions across prefill chunks
(so a last chunk shorter than the window still scores with the full window), and when the engine asks a sequence
to compact (`meta.compact_to`) they score the cached keys with that window and park the kept positions in
`pending` until `on_step_end` packs them. Subclasses say how to pick the kept tokens (`select`) and how to decode
(`_decode`); the cache layout after compaction and the decode state are theirs.
"""
from __future__ import annotations

import dataclasses
from abc import abstractmethod

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, write_kv
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch


def prefill_part(meta: AttentionMetadata) -> AttentionMetadata:
    """The metadata of the batch's prefill sequences only (for the dense prefill path)."""
    n = meta.num_prefills
    return dataclasses.replace(
        meta,
        cu_seqlens_q=meta.cu_seqlens_q[:n + 1],
        seq_lens=meta.seq_lens[:n],
        block_tables=meta.block_tables[:n],
        seq_lens_cpu=None if meta.seq_lens_cpu is None else meta.seq_lens_cpu[:n],
        query_lens_cpu=None if meta.query_lens_cpu is None else meta.query_lens_cpu[:n],
        threshold_scale_factor=None,
        seq_stats=None,
    )


class PromptWindowBackend(AttentionBackend):
    """Dense prefill + window-scored prompt compression; `select` and `_decode` are the algorithm's."""

    def __init__(self, layer, params):
        super().__init__(layer, params)
        self.window_q: dict[int, torch.Tensor] = {}  # seq_id -> [<= W, H, D]
        self.pending: dict[int, object] = {}  # seq_id -> the selection, until on_step_end packs it

    @abstractmethod
    def select(self, q_window: torch.Tensor, keys: torch.Tensor, budget: int):
        """The kept tokens of one prompt (the subclass's own form), from its window queries and cached keys."""

    @abstractmethod
    def _decode(self, q: torch.Tensor, cache: dict[str, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Outputs of the batch's decode rows q [B, H, D] (the algorithm's own cache layout after compaction)."""

    def forward(self, q, k, v, cache, meta):
        write_kv(cache["kv"], k, v, meta.slot_mapping)
        out = torch.empty(q.shape[0], q.shape[1], cache["kv"].shape[-1], dtype=q.dtype, device=q.device)
        npt = meta.num_prefill_tokens
        if meta.num_prefills:
            out[:npt] = paged_attention_torch(q[:npt], cache["kv"], prefill_part(meta), self.layer.scale)
            if meta.compact_to is not None and meta.seq_ids is not None:
                self._prefill_selection(q, cache["kv"], meta)
        if meta.num_decodes:
            out[npt:] = self._decode(q[npt:], cache, meta)
        return out

    def _prefill_selection(self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> None:
        """Keep each prefill sequence's trailing window queries; choose the kept tokens of those compacting now."""
        W = self.params.window_size
        cu = meta.cu_seqlens_q.tolist()
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
        for i in range(meta.num_prefills):
            sid, qlen, kv_len = meta.seq_ids[i], cu[i + 1] - cu[i], seq_lens[i]
            if kv_len == qlen:  # a first chunk (or a recompute after preemption) starts afresh
                self.on_sequence_freed(sid)
            chunk = q[cu[i]:cu[i + 1]]
            prev = self.window_q.get(sid)
            win = chunk[-W:] if prev is None else torch.cat([prev, chunk])[-W:]
            self.window_q[sid] = win
            if meta.compact_to[i]:
                keys, _ = gather_kv(kv, meta.block_tables[i], kv_len)
                self.pending[sid] = self.select(win, keys, meta.compact_to[i])
                del self.window_q[sid]
