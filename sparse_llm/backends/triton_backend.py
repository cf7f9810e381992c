"""Paged attention through our Triton kernels: dense, or skip-softmax (BLASST) per phase.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests). Prefill chunks go through the varlen prefill
kernel, decodes through the split-KV decode kernel; a phase whose threshold is unset runs the dense
build of the kernel (no skip code compiled in). Decisions and counts equal `TorchSkipSoftmaxBackend`'s.
With `bound_skip`, the layer also keeps per-block key min/max (backends/key_bounds.py) and prefill skips
tiles before QK^T when that bound proves them skippable (same output, counted as `stats.pre_skipped`).
"""
from __future__ import annotations

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata, CacheSpec
from sparse_llm.backends.key_bounds import KEY_BOUNDS, key_bounds_spec, update_key_bounds
from sparse_llm.backends.skip_softmax_rule import max_decode_kv_len, phase_log_lambda, record_phase_stats
from sparse_llm.configs.params import SkipSoftmaxParams
from sparse_llm.kernels.decode import paged_decode
from sparse_llm.kernels.geometry import check_head_dim
from sparse_llm.kernels.kv_write import kv_write
from sparse_llm.kernels.prefill import paged_prefill


class TritonBackend(AttentionBackend):
    """Dense or skip-softmax attention with the Triton kernels of sparse_llm/kernels."""

    name = "triton"
    algorithms = frozenset({"dense", "skip_softmax"})
    devices = frozenset({"cuda", "cpu"})  # cpu only under TRITON_INTERPRET=1 (the registry checks)
    # Decode forwards take lengths from device tensors, size the split grid from max_decode_kv_len (no
    # sync) and skip host-side bookkeeping while capturing (skip_softmax_rule.capturing).
    supports_cuda_graphs = True

    def __init__(self, layer, params):
        if params is not None and not isinstance(params, SkipSoftmaxParams):
            raise TypeError(f"{type(self).__name__} runs dense or skip_softmax layers, got {type(params).__name__}")
        check_head_dim(layer.head_dim)
        if (layer.v_head_dim or layer.head_dim) != layer.head_dim:
            raise ValueError(f"{layer.module_name}: v_head_dim={layer.v_head_dim} must equal head_dim={layer.head_dim}")
        super().__init__(layer, params)

    @property
    def bound_skip(self) -> bool:
        return self.params is not None and self.params.bound_skip

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
        specs = super().cache_spec(block_size, dtype)
        if self.bound_skip:
            specs.append(key_bounds_spec(self.layer.num_kv_heads, self.layer.head_dim, dtype))
        return specs

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        if kv.dtype != q.dtype:
            raise ValueError(f"{self.layer.module_name}: cache dtype {kv.dtype} differs from query dtype {q.dtype}")
        kv_write(kv, k, v, meta.slot_mapping)
        bounds = cache[KEY_BOUNDS] if self.bound_skip else None
        if bounds is not None:  # every write, decodes included: a later prefix-cache hit reads these blocks
            update_key_bounds(kv, bounds, meta.slot_mapping, has_prefill=meta.num_prefill_tokens > 0)
        out = torch.empty_like(q)
        npf, npt = meta.num_prefills, meta.num_prefill_tokens
        if q.shape[0] - npt != meta.num_decodes:
            raise ValueError(
                f"{q.shape[0] - npt} decode tokens for {meta.num_decodes} decode sequences: "
                "decodes carry one token each"
            )
        scale = self.layer.scale
        if npf:
            lam = self._log_lambda(meta, "prefill")
            pre_bounds = bounds if lam is not None else None  # the bound only refines a skipping phase
            stats = self._counter(meta, lam, npf, q.device, 3 if pre_bounds is not None else 2)
            paged_prefill(
                q[:npt], kv, meta.cu_seqlens_q[:npf + 1], meta.seq_lens[:npf], meta.block_tables[:npf],
                meta.max_seqlen_q, scale, log_lambda=lam, stats=stats, out=out[:npt], key_bounds=pre_bounds,
            )
            if stats is not None:
                record_phase_stats(self.stats, meta, "prefill", stats)
        if meta.num_decodes:
            lam = self._log_lambda(meta, "decode")
            stats = self._counter(meta, lam, meta.num_decodes, q.device)
            paged_decode(
                q[npt:], kv, meta.seq_lens[npf:], meta.block_tables[npf:], max_decode_kv_len(meta), scale,
                log_lambda=lam, stats=stats, out=out[npt:],
            )
            if stats is not None:
                record_phase_stats(self.stats, meta, "decode", stats)
        return out

    def _log_lambda(self, meta: AttentionMetadata, phase: str) -> torch.Tensor | None:
        return None if self.params is None else phase_log_lambda(self.params, meta, phase)

    @staticmethod
    def _counter(meta, log_lambda, n, device, columns: int = 2) -> torch.Tensor | None:
        """A fresh int32 [n, columns] tile counter (total, skipped[, pre-skipped]) when stats are on and the
        phase runs skip-softmax."""
        if log_lambda is None or not meta.collect_stats:
            return None
        return torch.zeros(n, columns, dtype=torch.int32, device=device)
