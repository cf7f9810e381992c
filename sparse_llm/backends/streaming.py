"""StreamingLLM / MInference "A-shape" attention in torch: each query sees the first `sink_tokens` keys
and the last `local_window` keys of its causal range, nothing in between.

A baseline that forgets the middle of a long context, so long-context tasks can show what sparsity
costs. Only the attended keys are gathered from the paged cache, so work and memory grow with
sink + window, not with the context:
- decode: one batched gather of [sink | window] positions per sequence, one SDPA call for all decodes;
- prefill: the queries of one sequence are cut into chunks of `chunk` rows; a chunk starting at
  position a needs keys [0, sink) and [a - window + 1, a + chunk), gathered for all chunks at once and
  attended in one batched SDPA call (a loop over sequences, never over tokens or heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, write_kv
from sparse_llm.configs.params import StreamingParams

# Prefill query rows per chunk: the gathered keys per chunk are sink + window + chunk - 1.
MAX_PREFILL_CHUNK = 256


def gather_positions(cache_kv: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V at token `positions` [B, N] (valid positions only) of sequences with `block_tables` [B, nb].

    Returns K, V as [B, N, Hkv, D] read straight from the paged cache [num_blocks, 2, bs, Hkv, D].
    """
    bs = cache_kv.shape[2]
    blocks = torch.gather(block_tables.long(), 1, positions // bs)
    offsets = positions % bs
    return cache_kv[blocks, 0, offsets], cache_kv[blocks, 1, offsets]


def skipped_keys(q_start: int, q_end: int, sink: int, window: int) -> int:
    """Keys a query at position p skips: max(0, p + 1 - sink - window), summed over p in [q_start, q_end)."""
    first = max(q_start, sink + window)  # first position that skips anything
    if first >= q_end:
        return 0
    n = q_end - first
    lo = first + 1 - sink - window
    return n * lo + n * (n - 1) // 2


def total_keys(q_start: int, q_end: int) -> int:
    """Keys in the causal range of queries [q_start, q_end): sum of p + 1."""
    n = q_end - q_start
    return n * (q_start + 1) + n * (n - 1) // 2


def a_shape_mask(qpos: torch.Tensor, kpos: torch.Tensor, in_sink_part: torch.Tensor, sink: int, window: int, kv_len) -> torch.Tensor:
    """True where query position qpos [..., q, 1] attends key position kpos [..., 1, k].

    Keys listed in the sink part are valid when < sink; keys of the window part when >= sink (so no key
    counts twice) and within the query's last `window` positions. Both need 0 <= kpos <= qpos < kv_len.
    """
    causal = (kpos >= 0) & (kpos <= qpos) & (kpos < kv_len)
    in_window = (kpos > qpos - window) & (kpos >= sink)
    return causal & torch.where(in_sink_part, kpos < sink, in_window)


class StreamingBackend(AttentionBackend):
    """Sink + local-window attention over the paged KV cache (torch, any device)."""

    name = "torch"
    algorithms = frozenset({"streaming"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, params):
        if not isinstance(params, StreamingParams):
            raise ValueError(
                f"{layer.module_name}: the streaming backend needs StreamingParams, got {type(params).__name__}"
            )
        if params.sink_tokens < 0 or params.local_window < 1:
            raise ValueError(
                f"{layer.module_name}: sink_tokens must be >= 0 and local_window >= 1, "
                f"got sink_tokens={params.sink_tokens}, local_window={params.local_window}"
            )
        super().__init__(layer, params)
        self.sink = params.sink_tokens
        self.window = params.local_window

    def forward(self, q, k, v, cache, meta: AttentionMetadata):
        write_kv(cache["kv"], k, v, meta.slot_mapping)
        q_lens = meta.query_lens_cpu
        if q_lens is None:
            q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
        out = torch.empty(q.shape[0], q.shape[1], cache["kv"].shape[-1], dtype=q.dtype, device=q.device)
        start = 0
        for i in range(meta.num_prefills):
            q_len, kv_len = q_lens[i], seq_lens[i]
            out[start:start + q_len] = self._prefill(q[start:start + q_len], cache["kv"], meta.block_tables[i], kv_len)
            self._count(meta, i, "prefill", kv_len - q_len, kv_len)
            start += q_len
        if meta.num_decodes:
            out[start:] = self._decode(q[start:], cache["kv"], meta)
            for i in range(meta.num_prefills, meta.num_seqs):
                self._count(meta, i, "decode", seq_lens[i] - 1, seq_lens[i])
        return out

    def _count(self, meta: AttentionMetadata, i: int, phase: str, q_start: int, q_end: int) -> None:
        total = total_keys(q_start, q_end)
        skipped = skipped_keys(q_start, q_end, self.sink, self.window)
        self.stats.add(phase, total, skipped)
        if meta.seq_stats is not None:
            meta.seq_stats[i, 0] += total
            meta.seq_stats[i, 1] += skipped

    def _prefill(self, q: torch.Tensor, cache_kv: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Queries q [q_len, H, D] at the last q_len positions of a kv_len-long sequence."""
        q_len, num_heads, head_dim = q.shape
        dev = q.device
        chunk = min(q_len, MAX_PREFILL_CHUNK)
        n_chunks = -(-q_len // chunk)
        sink = min(self.sink, kv_len)
        back = min(self.window - 1, kv_len)  # keys before a chunk's first query that its window can reach
        first_q = kv_len - q_len
        chunk_start = first_q + torch.arange(n_chunks, device=dev) * chunk  # [C]
        # Key positions per chunk: the sink part, then the window part [a - back, a + chunk).
        kpos = torch.cat(
            [
                torch.arange(sink, device=dev).expand(n_chunks, sink),
                chunk_start[:, None] - back + torch.arange(back + chunk, device=dev)[None, :],
            ],
            dim=1,
        )  # [C, N]
        in_sink_part = (torch.arange(kpos.shape[1], device=dev) < sink)[None, None, :]
        qpos = chunk_start[:, None] + torch.arange(chunk, device=dev)[None, :]  # [C, chunk]
        qpos = qpos.clamp(max=kv_len - 1)  # padded rows of the last chunk repeat the last query; dropped below
        mask = a_shape_mask(qpos[:, :, None], kpos[:, None, :], in_sink_part, self.sink, self.window, kv_len)
        kk, vv = gather_positions(cache_kv, block_table[None].expand(n_chunks, -1), kpos.clamp(0, kv_len - 1))
        pad = n_chunks * chunk - q_len
        qc = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n_chunks, chunk, num_heads, head_dim)
        o = F.scaled_dot_product_attention(
            qc.transpose(1, 2),
            kk.transpose(1, 2).to(q.dtype),
            vv.transpose(1, 2).to(q.dtype),
            attn_mask=mask[:, None],
            scale=self.layer.scale,
            enable_gqa=True,
        )  # [C, H, chunk, Dv]
        return o.transpose(1, 2).reshape(n_chunks * chunk, num_heads, -1)[:q_len]

    def _decode(self, q: torch.Tensor, cache_kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per decode sequence, at position seq_len - 1."""
        dev = q.device
        lens = meta.seq_lens[meta.num_prefills:].to(dev).long()  # [B]
        max_len = int(lens.max())
        sink, window = min(self.sink, max_len), min(self.window, max_len)
        kpos = torch.cat(
            [
                torch.arange(sink, device=dev).expand(lens.shape[0], sink),
                lens[:, None] - window + torch.arange(window, device=dev)[None, :],
            ],
            dim=1,
        )  # [B, N]
        in_sink_part = (torch.arange(kpos.shape[1], device=dev) < sink)[None, None, :]
        qpos = (lens - 1)[:, None, None]
        mask = a_shape_mask(qpos, kpos[:, None, :], in_sink_part, self.sink, self.window, lens[:, None, None])
        kk, vv = gather_positions(cache_kv, meta.block_tables[meta.num_prefills:], kpos.clamp(min=0).minimum(lens[:, None] - 1))
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, D]
            kk.transpose(1, 2).to(q.dtype),
            vv.transpose(1, 2).to(q.dtype),
            attn_mask=mask[:, None],
            scale=self.layer.scale,
            enable_gqa=True,
        )
        return o[:, :, 0]
