"""MLA (dense) and DeepSeek Sparse Attention in plain torch: the CPU backends and the kernels' oracles.

The three steps of DSA are separate functions on gathered (non-paged) tensors so kernel tests can compare
against them directly: `indexer_logits_ref`, `topk_positions_ref`, `mla_attention_ref`. The backends loop
over prefill sequences (chunks of query rows bound the memory) and batch all decodes; never a loop over
tokens or heads.
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.backends.dsa_base import DsaBackendBase, IndexerInputs, MlaBackend, query_lens, seq_lens
from sparse_llm.backends.dsa_cache import (
    LATENT,
    gather_indexer_k,
    gather_latent,
    prepare_indexer_query,
    write_indexer_k,
    write_latent,
)

# Elements of the largest intermediate ([rows, heads, keys] scores or [rows, keys, dim] gathers) per chunk.
CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (the oracle in tests), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def indexer_logits_ref(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I[r, s] = sum_h weights[r, h] * relu(q[r, h] . k[s]), in float32 (float64 for float64 inputs).

    q [R, Hi, Di], weights [R, Hi], k [R or 1, S, Di] -> [R, S].
    """
    dt = _compute_dtype(q, weights, k)
    scores = torch.relu(torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)))  # [R, Hi, S]
    return torch.matmul(weights.to(dt)[:, None, :], scores)[:, 0]


def topk_positions_ref(logits: torch.Tensor, n_valid: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest logits among the first n_valid of each row; int32 [R, k], -1 padded.

    The Triton kernel's rule, so the selection is deterministic: ties at the k-th value go to the lowest
    positions; the output lists the positions above the k-th value in increasing order, then the tied ones
    in increasing order. When n_valid <= k: 0 .. n_valid-1, then -1.
    """
    num_rows, n = logits.shape
    dev = logits.device
    valid = torch.arange(n, device=dev)[None, :] < n_valid[:, None]
    kk = min(k, n)
    masked = logits.masked_fill(~valid, float("-inf"))
    sel = masked.sort(dim=-1, descending=True, stable=True).indices[:, :kk]
    kth = masked.gather(1, sel[:, -1:])  # the k-th value where n_valid > k (the only rows with ties)
    tied = (masked.gather(1, sel) == kth) & (n_valid[:, None] > k)
    taken = torch.arange(kk, device=dev)[None, :] < n_valid[:, None]
    order_key = torch.where(taken, tied.long() * n + sel, 2 * n + sel)
    idx = sel.gather(1, order_key.argsort(dim=-1))
    idx = torch.where(taken, idx, -1)
    out = torch.full((num_rows, k), -1, dtype=torch.int32, device=logits.device)
    out[:, :kk] = idx.to(torch.int32)
    return out


def mla_attention_ref(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """Absorbed-MLA attention of each row over its own key set, in float32 (float64 for float64 inputs).

    q [R, H, D], kv [R or 1, N, D] (V = kv[..., :v_dim]), valid [R, N] -> [R, H, v_dim] in q.dtype.
    """
    dt = _compute_dtype(q, kv)
    kv_c = kv.to(dt)
    scores = torch.matmul(q.to(dt), kv_c.transpose(-1, -2)) * scale  # [R, H, N]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, kv_c[..., :v_dim]).to(q.dtype)


def _row_chunks(num_rows: int, per_row: int, limit: int | None = None):
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    if limit is not None:
        step = min(step, limit)
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def _dense_prefill(q, kv, first_pos, scale, v_dim, out, rows: slice) -> None:
    """Rows q [ql, H, D] at positions first_pos.. over the sequence's latent kv [L, D] (causal)."""
    n = kv.shape[0]
    for c in _row_chunks(q.shape[0], q.shape[1] * n):
        pos = torch.arange(c.start, c.stop, device=q.device) + first_pos
        valid = torch.arange(n, device=q.device)[None, :] <= pos[:, None]
        out[rows][c] = mla_attention_ref(q[c], kv[None], valid, scale, v_dim)


def _dense_decodes(q, cache_kv, block_tables, lens_cpu, lens, scale, v_dim) -> torch.Tensor:
    """One batched pass for decode rows q [B, H, D] over all their keys."""
    max_len = max(lens_cpu)
    positions = torch.arange(max_len, device=q.device)[None, :].expand(q.shape[0], -1)
    valid = positions < lens[:, None].to(q.device)
    kv = gather_latent(cache_kv, block_tables, positions)
    return mla_attention_ref(q, kv, valid, scale, v_dim)


class MlaDenseTorchBackend(MlaBackend):
    """Dense absorbed MLA over the paged latent cache (sparse_attention_config=None)."""

    name = "torch"
    algorithms = frozenset({"dense"})
    devices = frozenset({"cpu", "cuda"})

    def forward_mla(self, q, latent, indexer, cache, meta):
        write_latent(cache[LATENT], latent, meta.slot_mapping)
        out = torch.empty(q.shape[0], q.shape[1], self.layer.v_head_dim, dtype=q.dtype, device=q.device)
        scale, v_dim = self.layer.scale, self.layer.v_head_dim
        q_lens, lens = query_lens(meta), seq_lens(meta)
        start = 0
        for i in range(meta.num_prefills):
            rows = slice(start, start + q_lens[i])
            kv = gather_latent(cache[LATENT], meta.block_tables[i:i + 1], torch.arange(lens[i], device=q.device)[None])[0]
            _dense_prefill(q[rows], kv, lens[i] - q_lens[i], scale, v_dim, out, rows)
            start += q_lens[i]
        if meta.num_decodes:
            p = meta.num_prefills
            out[start:] = _dense_decodes(
                q[start:], cache[LATENT], meta.block_tables[p:], lens[p:], meta.seq_lens[p:], scale, v_dim
            )
        self._count(meta, None)
        return out


class DsaTorchBackend(DsaBackendBase):
    """DSA in torch: indexer logits, exact top-k, attention over the gathered selected latents."""

    name = "torch"
    algorithms = frozenset({"dsa"})
    devices = frozenset({"cpu", "cuda"})

    def forward_mla(self, q, latent, indexer: IndexerInputs | None, cache, meta: AttentionMetadata):
        sparse = [self.seq_is_sparse(n) for n in seq_lens(meta)]
        self.check_indexer(indexer, any(sparse))
        write_latent(cache[LATENT], latent, meta.slot_mapping)
        write_indexer_k(cache, indexer.k, meta.slot_mapping)
        out = torch.empty(q.shape[0], q.shape[1], self.layer.v_head_dim, dtype=q.dtype, device=q.device)
        q_lens, lens = query_lens(meta), seq_lens(meta)
        iq, iw = prepare_indexer_query(indexer.q, indexer.weights, cache) if any(sparse) else (None, None)
        start = 0
        for i in range(meta.num_prefills):
            rows = slice(start, start + q_lens[i])
            self._prefill_seq(q, iq, iw, cache, meta.block_tables[i:i + 1], lens[i], rows, sparse[i], out)
            start += q_lens[i]
        dec = list(range(meta.num_prefills, meta.num_seqs))
        for want_sparse in (False, True):
            ids = [i for i in dec if sparse[i] == want_sparse]
            if not ids:
                continue
            rows = torch.tensor([start + j - meta.num_prefills for j in ids], device=q.device)
            tables = meta.block_tables[ids]
            if want_sparse:
                out[rows] = self._sparse_rows(q[rows], iq[rows], iw[rows], cache, tables, meta.seq_lens[ids].to(q.device) - 1)
            else:
                out[rows] = _dense_decodes(
                    q[rows], cache[LATENT], tables, [lens[i] for i in ids], meta.seq_lens[ids], self.layer.scale,
                    self.layer.v_head_dim,
                )
        self._count(meta, sparse)
        return out

    def _prefill_seq(self, q, iq, iw, cache, table, kv_len, rows: slice, sparse: bool, out) -> None:
        n_rows = rows.stop - rows.start
        first = kv_len - n_rows
        if not sparse:
            kv = gather_latent(cache[LATENT], table, torch.arange(kv_len, device=q.device)[None])[0]
            _dense_prefill(q[rows], kv, first, self.layer.scale, self.layer.v_head_dim, out, rows)
            return
        k_idx = gather_indexer_k(cache, table, torch.arange(kv_len, device=q.device)[None], torch.float32)
        per_row = max(self.params.index_n_heads * kv_len, self.params.index_topk * q.shape[-1])
        for c in _row_chunks(n_rows, per_row, self.params.indexer_max_chunk_size):
            r = slice(rows.start + c.start, rows.start + c.stop)
            pos = torch.arange(c.start, c.stop, device=q.device) + first
            out[r] = self._sparse_rows(q[r], iq[r], iw[r], cache, table.expand(pos.shape[0], -1), pos, k_idx)

    def _sparse_rows(self, q, iq, weights, cache, tables, row_pos, k_idx=None) -> torch.Tensor:
        """Rows at positions row_pos of sequences with block `tables` [R, nb]: score, select, attend."""
        n_max = int(row_pos.max()) + 1
        if k_idx is None:  # decodes: one padded gather of every row's keys
            positions = torch.arange(n_max, device=q.device)[None, :].expand(q.shape[0], -1)
            k_idx = gather_indexer_k(cache, tables, positions, torch.float32)
        logits = indexer_logits_ref(iq, weights, k_idx[:, :n_max])
        pos = topk_positions_ref(logits, row_pos + 1, self.params.index_topk)
        kv = gather_latent(cache[LATENT], tables, pos.long())
        return mla_attention_ref(q, kv, pos >= 0, self.layer.scale, self.layer.v_head_dim)
