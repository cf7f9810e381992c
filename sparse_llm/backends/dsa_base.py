"""What every MLA backend shares: the absorbed-MLA view of the contract and the DSA selection plan.

Absorbed MLA is multi-query attention over the latent: q [T, H, kv_lora_rank + rope], one shared key per
token latent = [c_kv | k_pe] [T, 1, kv_lora_rank + rope], and V = the first kv_lora_rank channels of that
key. So the paged cache holds the latent once (V is a prefix of K) and `forward(q, k, v, ...)` of the
contract is `forward_mla(q, k, indexer=None, ...)`.

DSA adds the lightning indexer: per query token, logits I[t, s] = sum_j w_j(t) * ReLU(q_j(t) . k(s)) over its
causal keys, and attention over the top-`index_topk` keys only. The selection rule, identical for the torch
and Triton backends, is planned here on the host once per step:
- a sequence runs *sparse* when its KV length exceeds index_topk (and reaches seq_len_threshold, if set);
  a query of a sparse sequence at position p attends the top-min(index_topk, p + 1) of keys [0, p];
- otherwise it runs *dense* (every causal key). For kv_len <= index_topk this is exactly what top-k would
  pick, so skip_indexer_for_short_seqs only saves work; with it off such sequences still run the indexer.
"""
from __future__ import annotations

from abc import abstractmethod

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, CacheSpec, LayerSpec
from sparse_llm.backends.dsa_cache import indexer_cache_specs, latent_cache_spec
from sparse_llm.configs.params import DsaParams, LayerSparseParams


@dataclass(slots=True)
class IndexerInputs:
    """The indexer's per-token tensors of one layer (before any fp8 rotation/quantisation).

    `q`/`weights` are None when the backend said no scores are needed this step (short sequences):
    the keys must still be cached, because later steps score against them.
    """

    k: torch.Tensor  # [T, index_head_dim]
    q: torch.Tensor | None = None  # [T, index_n_heads, index_head_dim], RoPE applied
    weights: torch.Tensor | None = None  # float32 [T, index_n_heads]; softmax and head scales folded in


@dataclass(slots=True)
class RowPlan:
    """Per query row (packed token) facts for one step, on the device."""

    row_seq: torch.Tensor  # int32 [T]: sequence index of each query row
    row_pos: torch.Tensor  # int64 [T]: the row's position in its sequence (it attends keys [0, row_pos])
    seq_sparse: list[bool]  # per sequence: run the indexer + top-k
    sparse_rows: torch.Tensor  # int64 [n]: rows of sparse sequences
    dense_rows: torch.Tensor  # int64 [m]: rows of dense sequences


def query_lens(meta: AttentionMetadata) -> list[int]:
    if meta.query_lens_cpu is not None:
        return list(meta.query_lens_cpu)
    return (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()


def seq_lens(meta: AttentionMetadata) -> list[int]:
    return list(meta.seq_lens_cpu) if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()


def row_positions(meta: AttentionMetadata, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_seq int32 [T], row_pos int64 [T]): queries are the last q_len positions of each sequence."""
    q_lens = torch.tensor(query_lens(meta), dtype=torch.int64, device=device)
    lens = meta.seq_lens.to(device=device, dtype=torch.int64)
    num_tokens = int(q_lens.sum())
    row_seq = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens, output_size=num_tokens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    row_pos = lens[row_seq] - q_lens[row_seq] + (torch.arange(num_tokens, device=device) - starts[row_seq])
    return row_seq.to(torch.int32), row_pos


class MlaBackend(AttentionBackend):
    """Base of the MLA backends: latent cache, the contract's forward mapped onto forward_mla."""

    uses_indexer: ClassVar[bool] = False

    def __init__(self, layer: LayerSpec, params: LayerSparseParams | None):
        super().__init__(layer, params)
        if layer.num_kv_heads != 1 or layer.v_head_dim is None or layer.v_head_dim >= layer.head_dim:
            raise ValueError(
                f"{layer.module_name}: an MLA backend needs num_kv_heads=1 and v_head_dim (kv_lora_rank) < head_dim "
                f"(kv_lora_rank + rope); got num_kv_heads={layer.num_kv_heads}, head_dim={layer.head_dim}, "
                f"v_head_dim={layer.v_head_dim}"
            )

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        return [latent_cache_spec(block_size, self.layer.head_dim, dtype)]

    def indexer_scores_needed(self, meta: AttentionMetadata) -> bool:
        """Whether forward_mla needs indexer q/weights this step (keys are always needed when uses_indexer)."""
        return False

    def forward(self, q, k, v, cache, meta):
        """The contract's entry: v must be the first v_head_dim channels of k (absorbed MLA)."""
        return self.forward_mla(q, k, None, cache, meta)

    @abstractmethod
    def forward_mla(
        self,
        q: torch.Tensor,  # [T, H, kv_lora_rank + rope]
        latent: torch.Tensor,  # [T, 1, kv_lora_rank + rope]
        indexer: IndexerInputs | None,
        cache: dict[str, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H, kv_lora_rank]
        """Each DSA backend (torch, Triton) implements the MLA attention here."""

    def _count(self, meta: AttentionMetadata, plan_sparse: list[bool] | None) -> None:
        """Tokens attended vs causal tokens, per phase and (when asked) per sequence."""
        topk = self.params.index_topk if isinstance(self.params, DsaParams) else None
        q_lens, lens = query_lens(meta), seq_lens(meta)
        per_seq = []
        for i, (ql, kl) in enumerate(zip(q_lens, lens)):
            first = kl - ql  # positions first .. kl-1; a query at p has p + 1 causal keys
            total = ql * (first + 1) + ql * (ql - 1) // 2
            skipped = 0
            if plan_sparse is not None and plan_sparse[i]:
                lo = max(first, topk)  # positions p >= topk skip p + 1 - topk keys
                n = kl - lo
                if n > 0:
                    skipped = n * (lo + 1 - topk) + n * (n - 1) // 2
            phase = "prefill" if i < meta.num_prefills else "decode"
            self.stats.add(phase, total, skipped)
            per_seq.append((total, skipped))
        if meta.seq_stats is not None and per_seq:
            meta.seq_stats += torch.tensor(per_seq, dtype=meta.seq_stats.dtype, device=meta.seq_stats.device)


class DsaBackendBase(MlaBackend):
    """The DSA part shared by the torch and Triton backends: params checks, caches, the per-step plan."""

    uses_indexer = True

    def __init__(self, layer: LayerSpec, params: LayerSparseParams | None):
        super().__init__(layer, params)
        if not isinstance(params, DsaParams):
            raise ValueError(f"{layer.module_name}: the DSA backend needs DsaParams, got {type(params).__name__}")
        if params.indexer_k_dtype not in ("fp8", "bf16"):
            raise ValueError(f"indexer_k_dtype={params.indexer_k_dtype!r} is not supported; allowed: 'fp8', 'bf16'")
        self.params: DsaParams = params

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        return super().cache_spec(block_size, dtype) + indexer_cache_specs(
            block_size, self.params.index_head_dim, self.params.indexer_k_dtype, dtype
        )

    def seq_is_sparse(self, kv_len: int) -> bool:
        p = self.params
        if p.seq_len_threshold is not None and kv_len < p.seq_len_threshold:
            return False
        return kv_len > p.index_topk or not p.skip_indexer_for_short_seqs

    def indexer_scores_needed(self, meta: AttentionMetadata) -> bool:
        return any(self.seq_is_sparse(n) for n in seq_lens(meta))

    def check_indexer(self, indexer: IndexerInputs | None, needs_scores: bool) -> None:
        p = self.params
        if indexer is None:
            raise ValueError(f"{self.layer.module_name}: the DSA backend needs the indexer inputs (got None)")
        if indexer.k.shape[-1] != p.index_head_dim:
            raise ValueError(
                f"{self.layer.module_name}: the model's indexer keys have {indexer.k.shape[-1]} channels but "
                f"sparse_attention_config.index_head_dim={p.index_head_dim}; it must match the checkpoint"
            )
        if needs_scores:
            if indexer.q is None or indexer.weights is None:
                raise ValueError(f"{self.layer.module_name}: this step needs indexer q and weights (got None)")
            if indexer.q.shape[1] != p.index_n_heads:
                raise ValueError(
                    f"{self.layer.module_name}: the model's indexer has {indexer.q.shape[1]} heads but "
                    f"sparse_attention_config.index_n_heads={p.index_n_heads}; it must match the checkpoint"
                )

    def plan(self, meta: AttentionMetadata, device) -> RowPlan:
        row_seq, row_pos = row_positions(meta, device)
        sparse = [self.seq_is_sparse(n) for n in seq_lens(meta)]
        row_sparse = torch.tensor(sparse, dtype=torch.bool, device=device)[row_seq.long()]
        return RowPlan(
            row_seq=row_seq,
            row_pos=row_pos,
            seq_sparse=sparse,
            sparse_rows=torch.nonzero(row_sparse).flatten(),
            dense_rows=torch.nonzero(~row_sparse).flatten(),
        )
