"""Dense paged attention in plain torch: the reference backend (CPU) and the oracle for kernel tests.

One SDPA call per prefill sequence (a loop over sequences, never tokens) and one batched SDPA call for
all decodes. GQA goes through SDPA's `enable_gqa`, so K/V are not repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, write_kv


def gather_kv(cache_kv: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of one sequence as [kv_len, Hkv, D] from the paged cache [num_blocks, 2, bs, Hkv, D]."""
    bs = cache_kv.shape[2]
    nb = (kv_len + bs - 1) // bs
    blocks = cache_kv[block_table[:nb].long()]  # [nb, 2, bs, Hkv, D]
    k = blocks[:, 0].reshape(nb * bs, *blocks.shape[3:])[:kv_len]
    v = blocks[:, 1].reshape(nb * bs, *blocks.shape[3:])[:kv_len]
    return k, v


def gather_kv_batch(cache_kv: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded K, V of many sequences as [B, max_len, Hkv, D]."""
    bs = cache_kv.shape[2]
    nb = (max_len + bs - 1) // bs
    blocks = cache_kv[block_tables[:, :nb].long()]  # [B, nb, 2, bs, Hkv, D]
    B = blocks.shape[0]
    k = blocks[:, :, 0].reshape(B, nb * bs, *blocks.shape[4:])[:, :max_len]
    v = blocks[:, :, 1].reshape(B, nb * bs, *blocks.shape[4:])[:, :max_len]
    return k, v


def causal_suffix_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask (True = attend) for queries that are the last q_len positions."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= qpos


def paged_attention_torch(q: torch.Tensor, cache_kv: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Dense causal attention of packed queries q [T, H, D] over the paged cache; returns [T, H, Dv]."""
    out = torch.empty(q.shape[0], q.shape[1], cache_kv.shape[-1], dtype=q.dtype, device=q.device)
    cu = meta.query_lens_cpu
    if cu is None:
        cu = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    start = 0
    for i in range(meta.num_prefills):
        q_len, kv_len = cu[i], seq_lens[i]
        k, v = gather_kv(cache_kv, meta.block_tables[i], kv_len)
        qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        ki, vi = k.transpose(0, 1).unsqueeze(0).to(q.dtype), v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = causal_suffix_mask(q_len, kv_len, q.device)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    nd = meta.num_decodes
    if nd:
        lens = meta.seq_lens[meta.num_prefills:]
        max_len = max(seq_lens[meta.num_prefills:])
        k, v = gather_kv_batch(cache_kv, meta.block_tables[meta.num_prefills:], max_len)
        qd = q[start:start + nd].unsqueeze(2)  # [Bd, H, 1, D]
        valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None].to(q.device)
        # Slots past a sequence's end were never written (they may hold NaN, and 0 * NaN = NaN): zero them.
        k = torch.where(valid[:, :, None, None], k, 0)
        v = torch.where(valid[:, :, None, None], v, 0)
        mask = valid[:, None, None, :]
        o = F.scaled_dot_product_attention(
            qd, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[start:start + nd] = o[:, :, 0]
    return out


class TorchDenseBackend(AttentionBackend):
    """Dense attention through torch SDPA over the paged cache; runs anywhere."""

    name = "torch"
    algorithms = frozenset({"dense"})
    devices = frozenset({"cpu", "cuda"})

    def forward(self, q, k, v, cache, meta):
        write_kv(cache["kv"], k, v, meta.slot_mapping)
        return paged_attention_torch(q, cache["kv"], meta, self.layer.scale)
