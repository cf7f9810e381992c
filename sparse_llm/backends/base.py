"""The attention backend contract: the one seam between the engine and every attention algorithm.

The engine knows nothing about sparsity. Each attention layer owns one backend; the model runner
sets one `AttentionMetadata` per step; every layer calls `backend.forward(q, k, v, cache, meta)`.
Backends never see user configs, only the frozen per-layer params produced by `configs.resolve`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sparse_llm.configs.params import LayerSparseParams

PHASES = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """Static shape facts of one attention layer (heads are the ones local to this rank)."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    module_name: str
    v_head_dim: int | None = None  # None = head_dim (differs only for MLA)
    # "mha" (q/k/v heads) or "mla" (absorbed MLA: one latent key per token, V its prefix). Backends are
    # registered per type: an MLA layer gets the registry's "mla/<algorithm>" entry.
    attention_type: str = "mha"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """One per-layer paged tensor the block manager allocates as [num_blocks, *block_shape]."""

    name: str
    block_shape: tuple[int, ...]
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def kv_cache_spec(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> CacheSpec:
    """The paged K/V cache every backend needs: FlashInfer's NHD layout [2, block_size, kv_heads, head_dim]."""
    return CacheSpec("kv", (2, block_size, num_kv_heads, head_dim), dtype)


@dataclass(slots=True)
class SparsityStats:
    """Counts of attended vs total work units (tiles, tokens or pages), per phase.

    `pre_skipped` counts units skipped by a cheaper pre-check before the full score (the prefill key
    min/max bound before QK^T); they are already included in `skipped`.
    """

    total: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    skipped: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    pre_skipped: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})

    def add(self, phase: str, total: int, skipped: int, pre_skipped: int = 0) -> None:
        self.total[phase] += int(total)
        self.skipped[phase] += int(skipped)
        self.pre_skipped[phase] += int(pre_skipped)

    def sparsity(self, phase: str) -> float | None:
        t = self.total[phase]
        return None if t == 0 else self.skipped[phase] / t

    def reset(self) -> None:
        for p in PHASES:
            self.total[p] = self.skipped[p] = self.pre_skipped[p] = 0


@dataclass(slots=True)
class AttentionMetadata:
    """Everything a backend needs for one engine step; built once per step by the model runner.

    Token layout (vLLM's): the step's query tokens are packed; sequences [0, num_prefills) are prefill
    chunks (any number of tokens; their queries are the *last* q_len positions of the KV, so chunked
    prefill and prefix-cache hits work), sequences [num_prefills, num_seqs) are decodes (1 token each).
    """

    num_prefills: int
    num_prefill_tokens: int
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]: KV length including this step's tokens
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor  # int64 [num_tokens]: flat slot (block * block_size + offset); -1 = skip write
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    block_size: int
    # Per-sequence sparsity knob for the sequence's current phase (NaN = use the layer's own value).
    # The runner fills it from per-request overrides (e.g. the server's `sparse_attention` field).
    threshold_scale_factor: torch.Tensor | None = None  # float32 [num_seqs]
    # When not None, backends add (total, skipped) work units per sequence, summed over layers.
    seq_stats: torch.Tensor | None = None  # int64 [num_seqs, 2]
    # Host copies kept for backends that plan on the host (FlashInfer) or loop over few sequences.
    seq_lens_cpu: list[int] | None = None
    query_lens_cpu: list[int] | None = None
    seq_ids: list[int] | None = None  # engine sequence ids, for backends with per-sequence state
    # Prompt compression (RocketKV): per sequence, the KV length its cache is compacted to at the end of this
    # step (0 = not compacted). None when the engine runs no compacting algorithm. See engine/compaction.py.
    compact_to: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_decodes(self) -> int:
        return self.num_seqs - self.num_prefills

    @property
    def collect_stats(self) -> bool:
        return self.seq_stats is not None


class AttentionBackend(ABC):
    """One instance per attention layer.

    Subclasses declare `name` (the `attention_backend` / algorithm family they implement),
    `algorithms` (the `LayerSparseParams.algorithm` values they can run; "dense" for None) and
    `devices` ("cpu", "cuda"). The registry refuses any other combination with a clear error.
    """

    name: ClassVar[str]
    algorithms: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]]
    # True when a decode-only forward can be captured in a CUDA graph: it reads lengths and tables only from
    # the metadata's device tensors (never seq_lens_cpu/max_seqlen_k for shapes) and does no host sync.
    # The runner captures decode graphs only when every layer's backend says so.
    supports_cuda_graphs: ClassVar[bool] = False

    def __init__(self, layer: LayerSpec, params: LayerSparseParams | None):
        self.layer = layer
        self.params = params
        self.stats = SparsityStats()

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        """Caches the block manager must allocate for this layer; the paged K/V by default."""
        v_dim = self.layer.v_head_dim or self.layer.head_dim
        if v_dim != self.layer.head_dim:
            raise ValueError("the default cache_spec needs v_head_dim == head_dim; override cache_spec")
        return [kv_cache_spec(block_size, self.layer.num_kv_heads, self.layer.head_dim, dtype)]

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, v_head_dim]
        cache: dict[str, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, v_head_dim]
        """Write k/v into the cache at meta.slot_mapping, then attend (causally) over the paged cache."""

    # Lifecycle hooks. Default: nothing to do.
    def on_step_end(self, cache: dict[str, torch.Tensor], meta: AttentionMetadata) -> None:
        """Called after every layer ran for a step (e.g. RocketKV compaction after a prompt's last chunk)."""

    def on_sequence_freed(self, seq_id: int) -> None:
        """Drop any per-sequence state (called when the engine frees a sequence)."""


def write_kv(cache_kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Reference KV write: cache_kv [num_blocks, 2, block_size, Hkv, D]; slots < 0 are skipped."""
    num_blocks, _, block_size = cache_kv.shape[:3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blk, off = slots // block_size, slots % block_size
    cache_kv[blk, 0, off] = k[valid].to(cache_kv.dtype)
    cache_kv[blk, 1, off] = v[valid].to(cache_kv.dtype)
