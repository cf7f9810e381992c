"""Random paged-attention batches (metadata + cache + new tokens) for kernel tests and benchmarks.

Pages are assigned in a shuffled order so kernels must follow the block tables, and the cache starts
filled with NaN (float caches) so any read of an unwritten slot shows up in the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.backends.base import AttentionMetadata, write_kv
from sparse_llm.kernels.geometry import cdiv


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, H, D] this step's queries
    k: torch.Tensor  # [T, Hkv, D] this step's new keys (not yet in the cache)
    v: torch.Tensor
    cache: dict[str, torch.Tensor]  # {"kv": [num_blocks, 2, block_size, Hkv, D]}
    meta: AttentionMetadata
    k_full: list[torch.Tensor]  # per sequence [kv_len, Hkv, D]: cached prefix + new tokens
    v_full: list[torch.Tensor]


def random_paged_batch(
    q_lens: list[int],
    kv_lens: list[int],
    num_prefills: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    sink_logit: float = 0.0,
) -> PagedBatch:
    """A mixed batch: sequences [0, num_prefills) are prefill chunks, the rest decodes (q_len 1).

    Each sequence's first kv_len - q_len tokens are already in the cache (a cached prefix); the last
    q_len tokens are returned as k/v to be written by the backend through meta.slot_mapping.
    sink_logit > 0 adds an attention sink: the first 4 keys score about `sink_logit` (after the
    1/sqrt(head_dim) scale) with every query, so later tiles become skippable as in real models.
    """
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"q_lens ({len(q_lens)}) and kv_lens ({len(kv_lens)}) must have the same length")
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        if not 1 <= ql <= kl:
            raise ValueError(f"sequence {i}: need 1 <= q_len <= kv_len, got q_len={ql}, kv_len={kl}")
        if i >= num_prefills and ql != 1:
            raise ValueError(f"sequence {i} is a decode: q_len must be 1, got {ql}")
    g = torch.Generator().manual_seed(seed)
    n_blocks = [cdiv(kl, block_size) for kl in kv_lens]
    total_blocks = sum(n_blocks) + spare_blocks
    perm = torch.randperm(total_blocks, generator=g)
    tables = torch.zeros(len(kv_lens), max(n_blocks), dtype=torch.int32)
    cache = torch.full((total_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    sink_dir = torch.nn.functional.normalize(torch.randn(head_dim, generator=g), dim=0)
    k_full, v_full, qs, ks, vs, slots = [], [], [], [], [], []
    used = 0
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        tables[i, :n_blocks[i]] = perm[used:used + n_blocks[i]]
        used += n_blocks[i]
        kf = torch.randn(kl, num_kv_heads, head_dim, generator=g)
        vf = torch.randn(kl, num_kv_heads, head_dim, generator=g).to(dtype)
        qf = torch.randn(ql, num_heads, head_dim, generator=g)
        if sink_logit > 0:
            amp = (sink_logit * head_dim ** 0.5) ** 0.5  # (amp * u)·(amp * u) / sqrt(D) = sink_logit
            kf[:4] += amp * sink_dir
            qf += amp * sink_dir
        kf = kf.to(dtype)
        pos = torch.arange(kl)
        slot = tables[i, pos // block_size].long() * block_size + pos % block_size
        ctx = kl - ql
        write_kv(cache, kf[:ctx], vf[:ctx], slot[:ctx])
        k_full.append(kf.to(device))
        v_full.append(vf.to(device))
        qs.append(qf.to(dtype))
        ks.append(kf[ctx:])
        vs.append(vf[ctx:])
        slots.append(slot[ctx:])
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        num_prefills=num_prefills,
        num_prefill_tokens=int(sum(q_lens[:num_prefills])),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(kv_lens),
        slot_mapping=torch.cat(slots).to(device),
        block_tables=tables.to(device),
        block_size=block_size,
        seq_lens_cpu=list(kv_lens),
        query_lens_cpu=list(q_lens),
    )
    return PagedBatch(
        torch.cat(qs).to(device), torch.cat(ks).to(device), torch.cat(vs).to(device),
        {"kv": cache.to(device)}, meta, k_full, v_full,
    )


def reference_attention(batch: PagedBatch, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense causal attention from the unpaged per-sequence K/V (independent of any block table)."""
    outs = []
    cu = batch.meta.cu_seqlens_q.tolist()
    for i, (kf, vf) in enumerate(zip(batch.k_full, batch.v_full, strict=True)):
        q = batch.q[cu[i]:cu[i + 1]].to(dtype).transpose(0, 1)  # [H, Lq, D]
        kv_len, hkv = kf.shape[0], kf.shape[1]
        g = q.shape[0] // hkv
        k = kf.to(dtype).transpose(0, 1).repeat_interleave(g, 0)
        v = vf.to(dtype).transpose(0, 1).repeat_interleave(g, 0)
        s = (q @ k.transpose(-1, -2)) * scale
        qpos = torch.arange(kv_len - q.shape[1], kv_len, device=q.device)
        s = s.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > qpos[:, None], float("-inf"))
        outs.append((torch.softmax(s, -1) @ v).transpose(0, 1))
    return torch.cat(outs)
