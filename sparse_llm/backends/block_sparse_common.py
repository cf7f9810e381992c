"""Shared engine plumbing of the block-sparse family (XAttention, FlexPrefill, vertical-slash, Quest).

A subclass says how to pick the KV of a prefill chunk (`prefill_selection`) or of the decodes
(`decode_selection`); None means that phase is dense. This base writes the new K/V, walks the prefill
sequences (estimation needs each one's keys: a loop over sequences, never tokens or heads), runs the
selection either through the Triton block-sparse kernel over the paged cache (`use_triton`) or through
the masked torch reference, and counts the work: query-key pairs summed over query heads (The Sparse
Frontier's sparsity), per phase and per sequence.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, write_kv
from sparse_llm.backends.torch_dense import gather_kv
from sparse_llm.sparse.block_selection import (
    BlockSelection,
    QueryTiles,
    causal_pairs,
    decode_tiles,
    per_sequence_pairs,
    prefill_tiles,
    token_mask,
)
from sparse_llm.sparse.block_sparse_torch import block_sparse_sequence, masked_attention, slice_selection
from sparse_llm.sparse.skipped_blocks import (
    block_means,
    merge_attention,
    skipped_block_attention,
    skipped_flags,
    skipped_pairs,
)

# Query rows per decode tile of the Triton kernel (tl.dot needs 16); only the first row is real.
DECODE_ROWS = 16
# Keys per Triton tile for decode lists (Quest pages are gathered several to a tile).
DECODE_BLOCK_N = 64


def host_lens(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """(query lengths, KV lengths) per sequence on the host."""
    q_lens = meta.query_lens_cpu
    if q_lens is None:
        q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    return list(q_lens), list(seq_lens)


class BlockSparseBackend(AttentionBackend):
    """Base of the block-sparse backends; subclasses set the ClassVars and the two selection hooks."""

    use_triton: ClassVar[bool] = False
    # Tokens per listed block in the dense fallback of the Triton kernel.
    dense_block: ClassVar[int] = 64

    def __init__(self, layer, params):
        if (layer.v_head_dim or layer.head_dim) != layer.head_dim:
            raise ValueError(f"{layer.module_name}: v_head_dim={layer.v_head_dim} must equal head_dim={layer.head_dim}")
        super().__init__(layer, params)

    # ------------------------------------------------------------ hooks
    def prefill_selection(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection | None:
        """q [1, H, Sq, D] (the last Sq positions), k [1, Hkv, Sk, D] of one sequence -> the selection over
        its block-aligned query tiles (rows tile-major), or None for dense."""
        return None

    def decode_selection(
        self, q: torch.Tensor, cache: dict[str, torch.Tensor], meta: AttentionMetadata
    ) -> BlockSelection | None:
        """q [Nd, H, D] of the decodes -> a selection with one tile per decode, or None for dense."""
        return None

    def update_cache(self, cache: dict[str, torch.Tensor], meta: AttentionMetadata) -> None:
        """Auxiliary cache maintenance after the K/V write (Quest's page min/max)."""

    # ------------------------------------------------------------ forward
    def forward(self, q, k, v, cache, meta: AttentionMetadata):
        kv = cache["kv"]
        if self.use_triton:
            from sparse_llm.kernels.kv_write import kv_write

            kv_write(kv, k, v, meta.slot_mapping)
        else:
            write_kv(kv, k, v, meta.slot_mapping)
        self.update_cache(cache, meta)
        out = torch.empty(q.shape[0], q.shape[1], kv.shape[-1], dtype=q.dtype, device=q.device)
        q_lens, seq_lens = host_lens(meta)
        cu = meta.cu_seqlens_q.tolist() if meta.num_prefills else [0]
        for i in range(meta.num_prefills):
            self._prefill_one(q, kv, meta, i, cu[i], q_lens[i], seq_lens[i], out)
        if meta.num_decodes:
            self._decodes(q[meta.num_prefill_tokens:], cache, meta, seq_lens, out[meta.num_prefill_tokens:])
        return out

    def _prefill_one(self, q, kv, meta, i, start, q_len, kv_len, out) -> None:
        qi = q[start:start + q_len]
        k, v = gather_kv(kv, meta.block_tables[i], kv_len)
        sel = self.prefill_selection(qi.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype))
        block = sel.block_size if sel is not None else self.dense_block
        tiles = prefill_tiles([q_len], [kv_len], block, q.device)
        tiles = QueryTiles(torch.full_like(tiles.seq, i), tiles.start, tiles.rows)
        means = sel is not None and getattr(self.params, "skipped_blocks", "drop") == "mean"
        lse1 = None
        if self.use_triton:
            from sparse_llm.kernels.block_sparse_prefill import block_sparse_attention_launch

            lse_out = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) if means else None
            block_sparse_attention_launch(
                q, 0, meta.cu_seqlens_q.to(torch.int32), out, 0, kv[:, 0], kv[:, 1], meta.block_tables,
                (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).to(torch.int32), meta.seq_lens, tiles, sel,
                self.layer.scale, dense_block=block, contiguous_pages=True, lse_out=lse_out,
            )
            if means:
                lse1 = lse_out[start:start + q_len] * math.log(2.0)
        elif means:
            out[start:start + q_len], lse1 = block_sparse_sequence(qi, k, v, self.layer.scale, tiles, sel, i,
                                                                   return_lse=True)
        else:
            out[start:start + q_len] = block_sparse_sequence(qi, k, v, self.layer.scale, tiles, sel, i)
        extra_pairs = self._skipped_block_means(qi, k, v, tiles, sel, lse1, kv_len, out[start:start + q_len]) if means else 0
        lens_q = torch.tensor([q_len], device=q.device)
        lens_k = torch.tensor([kv_len], device=q.device)
        if sel is None:
            total = attended = int(causal_pairs(lens_q, lens_k)[0]) * self.layer.num_heads
        else:
            local = QueryTiles(torch.zeros_like(tiles.seq), tiles.start, tiles.rows)
            t, a = per_sequence_pairs(local, sel, lens_q, lens_k, self.layer.num_heads)
            total, attended = int(t[0]), int(a[0]) + extra_pairs
        self._count(meta, i, "prefill", total, attended)

    def _skipped_block_means(self, q, k, v, tiles, sel, lse1, kv_len, out) -> int:
        """Merge the pseudo-keys of the skipped blocks (sparse/skipped_blocks.py) into `out` (this sequence's
        rows, normalised over the listed keys with log-sum-exp lse1); returns their work in pairs."""
        bs = sel.block_size
        kbar, vbar = block_means(k, v, bs)
        skipped = skipped_flags(sel, tiles.start, kbar.shape[0])
        o2, lse2 = skipped_block_attention(q, kbar, vbar, tiles.start, skipped, self.layer.scale, bs, kv_len)
        out.copy_(merge_attention(out.to(o2.dtype), lse1.to(o2.dtype), o2, lse2.to(o2.dtype)))
        return skipped_pairs(skipped, tiles.start, tiles.rows, q.shape[0], kv_len, self.layer.num_heads)

    def _decodes(self, q, cache, meta, seq_lens, out) -> None:
        kv = cache["kv"]
        npf, nd = meta.num_prefills, meta.num_decodes
        lens = meta.seq_lens[npf:]
        sel = self.decode_selection(q, cache, meta)
        tiles = decode_tiles(lens.to(torch.int32), 0, DECODE_ROWS)
        ones = torch.ones(nd, dtype=torch.int32, device=q.device)
        if self.use_triton:
            from sparse_llm.kernels.block_sparse_prefill import block_sparse_attention_launch, default_num_splits

            max_len = max(seq_lens[npf:])
            sel_block = sel.block_size if sel is not None else self.dense_block
            listed = max_len if sel is None else sel.block_indices.numel() // max(1, sel.num_rows) * sel_block
            splits = default_num_splits(nd, self.layer.num_heads, -(-listed // DECODE_BLOCK_N), q.device)
            block_sparse_attention_launch(
                q, 0, torch.arange(nd, dtype=torch.int32, device=q.device), out, 0, kv[:, 0], kv[:, 1],
                meta.block_tables[npf:], ones, lens, tiles, sel, self.layer.scale,
                block_n=DECODE_BLOCK_N, dense_block=self.dense_block, num_splits=splits, contiguous_pages=True,
            )
        else:
            out.copy_(self._decode_torch(q, kv, meta, seq_lens, tiles, sel))
        if sel is None:
            totals = [n * self.layer.num_heads for n in seq_lens[npf:]]
            attended = totals
        else:
            t, a = per_sequence_pairs(tiles, sel, ones, lens, self.layer.num_heads)
            totals, attended = t.tolist(), a.tolist()
        for j in range(nd):
            self._count(meta, npf + j, "decode", totals[j], attended[j])

    def _decode_torch(self, q, kv, meta, seq_lens, tiles, sel) -> torch.Tensor:
        """Decodes through the masked reference: each decode is a one-query sequence."""
        npf = meta.num_prefills
        rows = []
        for j, kv_len in enumerate(seq_lens[npf:]):
            k, v = gather_kv(kv, meta.block_tables[npf + j], kv_len)
            if sel is None:
                rows.append(masked_attention(q[j:j + 1], k, v, self.layer.scale, None, None))
            else:
                hs = sel.num_heads
                one = slice_selection(sel, j * hs, (j + 1) * hs)
                one_tiles = QueryTiles(tiles.seq[j:j + 1], tiles.start[j:j + 1], tiles.rows)
                mask = token_mask(one_tiles, one, kv_len)
                rows.append(masked_attention(q[j:j + 1], k, v, self.layer.scale, tiles.start[j:j + 1], mask))
        return torch.cat(rows)

    def _count(self, meta: AttentionMetadata, i: int, phase: str, total: int, attended: int) -> None:
        self.stats.add(phase, total, total - attended)
        if meta.seq_stats is not None:
            meta.seq_stats[i, 0] += total
            meta.seq_stats[i, 1] += total - attended

