"""MLA attention with Triton kernels: DeepSeek Sparse Attention (indexer logits -> radix top-k -> sparse MLA
attention) and dense MLA (the same attention kernel over every causal key).

Same selection rule and cache layout as the torch backend (backends/dsa_base.py, dsa_cache.py). The top-k
kernel hands the attention kernel physical cache slots, and fp8 queries are prepared by one fused kernel. Rows of
dense sequences (short, or below seq_len_threshold) run the same attention kernel in its dense causal mode.
The indexer logits of sparse rows are materialised as float32 [rows, max_len]; rows are processed in
chunks so that buffer stays under LOGITS_BUDGET elements (and indexer_max_chunk_size rows).
"""
from __future__ import annotations

import torch

from sparse_llm.backends.dsa_base import DsaBackendBase, IndexerInputs, MlaBackend, row_positions, seq_lens
from sparse_llm.backends.dsa_cache import INDEXER_K, INDEXER_K_SCALE, LATENT, prepare_indexer_query, write_indexer_k, write_latent
from sparse_llm.kernels.dsa_indexer import indexer_logits
from sparse_llm.kernels.dsa_launch import dsa_launch, select_topk
from sparse_llm.kernels.dsa_mla_attention import mla_attention
from sparse_llm.kernels.dsa_query_prep import prepare_indexer_query_fp8

LOGITS_BUDGET = 1 << 28  # float32 elements (1 GiB)


class DsaTritonBackend(DsaBackendBase):
    name = "triton"
    algorithms = frozenset({"dsa"})
    devices = frozenset({"cuda", "cpu"})  # cpu only under TRITON_INTERPRET=1 (the registry checks)

    def forward_mla(self, q, latent, indexer: IndexerInputs | None, cache, meta):
        plan = self.plan(meta, q.device)
        lens = seq_lens(meta)
        any_sparse = any(plan.seq_sparse)
        self.check_indexer(indexer, any_sparse)
        write_latent(cache[LATENT], latent, meta.slot_mapping)
        write_indexer_k(cache, indexer.k, meta.slot_mapping)
        out = torch.empty(q.shape[0], q.shape[1], self.layer.v_head_dim, dtype=q.dtype, device=q.device)
        n_valid = (plan.row_pos + 1).to(torch.int32)
        if plan.dense_rows.numel():
            rows = plan.dense_rows
            max_tokens = max(n for n, s in zip(lens, plan.seq_sparse) if not s)
            out[rows] = mla_attention(
                q[rows], cache[LATENT], meta.block_tables, plan.row_seq[rows], n_valid[rows],
                self.layer.scale, self.layer.v_head_dim, max_tokens,
            )
        if any_sparse:
            self._sparse(q, indexer, cache, meta, plan.sparse_rows, plan.row_seq, n_valid,
                         max(n for n, s in zip(lens, plan.seq_sparse) if s), out)
        self._count(meta, plan.seq_sparse)
        return out

    def _sparse(self, q, indexer, cache, meta, rows, row_seq, n_valid, max_len, out) -> None:
        topk = self.params.index_topk
        step = max(1, min(self.params.indexer_max_chunk_size, LOGITS_BUDGET // max_len))
        for start in range(0, rows.numel(), step):
            r = rows[start:start + step]
            nv = n_valid[r]
            launch = dsa_launch(r.numel(), max_len, q.device, q.shape[1], q.shape[2])  # {}: the kernels' defaults
            if INDEXER_K_SCALE in cache:  # rotation + fp8 quantisation of the queries in one kernel
                iq, iw = prepare_indexer_query_fp8(indexer.q[r], indexer.weights[r])
            else:
                iq, iw = prepare_indexer_query(indexer.q[r], indexer.weights[r], cache)
            logits = indexer_logits(
                iq, iw, cache[INDEXER_K], cache.get(INDEXER_K_SCALE), meta.block_tables, row_seq[r], nv, max_len,
                **launch.get("indexer", {}),
            )
            _, slots = select_topk(logits, nv, topk, block_tables=meta.block_tables, row_seq=row_seq[r],
                                   page=cache[LATENT].shape[1], **launch.get("topk", {}))
            out[r] = mla_attention(
                q[r], cache[LATENT], meta.block_tables, row_seq[r], torch.clamp(nv, max=topk),
                self.layer.scale, self.layer.v_head_dim, topk, indices=slots, indices_are_slots=True,
                **launch.get("attention", {}),
            )


class MlaDenseTritonBackend(MlaBackend):
    """Dense absorbed MLA (sparse_attention_config=None): every query row attends all its causal keys."""

    name = "triton"
    algorithms = frozenset({"dense"})
    devices = frozenset({"cuda", "cpu"})  # cpu only under TRITON_INTERPRET=1 (the registry checks)

    def forward_mla(self, q, latent, indexer, cache, meta):
        write_latent(cache[LATENT], latent, meta.slot_mapping)
        row_seq, row_pos = row_positions(meta, q.device)
        out = mla_attention(
            q, cache[LATENT], meta.block_tables, row_seq, (row_pos + 1).to(torch.int32), self.layer.scale,
            self.layer.v_head_dim, max(seq_lens(meta)),
        )
        self._count(meta, None)
        return out
