"""Moving kept tokens inside one sequence's paged cache (the data side of prompt compression).

Each KV head packs its kept tokens, in order, into cache slots [0, n): slot j of head h and of head h' may hold
different original tokens, which is fine because K is stored after RoPE (original positions are baked in).
The engine side (which sequences compact, freeing the blocks past the new length) is engine/compaction.py.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import write_kv
from sparse_llm.backends.torch_dense import gather_kv


def pack_kept_tokens(kv: torch.Tensor, block_table: torch.Tensor, kv_len: int, keep: torch.Tensor) -> None:
    """Write K/V of keep[h, j] (cache positions < kv_len; -1 = padding) to slot j of head h, j < keep.shape[1].

    kv: the paged cache [num_blocks, 2, block_size, Hkv, D]; block_table: the sequence's blocks. Slots a head
    pads (-1) get some token's K/V: the caller masks them (per-head valid lengths).
    """
    n = keep.shape[1]
    if n > kv_len or int(keep.max()) >= kv_len:
        raise ValueError(f"pack_kept_tokens: {n} slots / position {int(keep.max())} do not fit kv_len={kv_len}")
    k, v = gather_kv(kv, block_table, kv_len)  # [L, Hkv, D]
    idx = keep.clamp(min=0).T[:, :, None].expand(-1, -1, k.shape[-1])  # [n, Hkv, D]
    kk, vv = k.gather(0, idx), v.gather(0, idx)  # copies: safe to write back over the source
    pos = torch.arange(n, device=kv.device)
    bs = kv.shape[2]
    slots = block_table[pos // bs].long() * bs + pos % bs
    write_kv(kv, kk, vv, slots)
