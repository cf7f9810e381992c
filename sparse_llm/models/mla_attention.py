"""The attention seam for MLA layers: like `Attention`, but it also carries the DSA indexer's inputs.

The model computes the absorbed query q [T, H, kv_lora_rank + rope] and the latent [T, 1, kv_lora_rank + rope];
this module hands them, plus the indexer tensors when the backend uses an indexer, to the layer's MLA backend
with the per-step metadata. It asks the backend first which indexer tensors this step needs, so the model
does not compute indexer queries for steps that run dense (every sequence no longer than index_topk).
"""
from __future__ import annotations

import torch

from sparse_llm.backends.dsa_base import IndexerInputs, MlaBackend
from sparse_llm.engine.context import get_context
from sparse_llm.models.attention import Attention


class MlaAttention(Attention):
    def _mla_backend(self) -> MlaBackend:
        if self.backend is None:
            raise RuntimeError(f"{self.spec.module_name}: no attention backend attached")
        if not isinstance(self.backend, MlaBackend):
            raise TypeError(
                f"{self.spec.module_name} is an MLA layer (latent KV cache); its backend must be an MLA backend "
                f"(sparse_llm.backends.dsa_base.MlaBackend), got {type(self.backend).__name__}"
            )
        return self.backend

    def wants_indexer_keys(self) -> bool:
        """Indexer keys must be computed and cached every step when the backend runs DSA."""
        return self._mla_backend().uses_indexer

    def wants_indexer_scores(self) -> bool:
        """Indexer queries/weights are needed this step (some sequence runs sparse)."""
        backend = self._mla_backend()
        return backend.uses_indexer and backend.indexer_scores_needed(get_context())

    def forward(self, q: torch.Tensor, latent: torch.Tensor, indexer: IndexerInputs | None = None) -> torch.Tensor:
        """q [T, H, Dl + R], latent [T, 1, Dl + R] -> latent-space output [T, H, Dl]."""
        return self._mla_backend().forward_mla(q, latent, indexer, self.cache, get_context())
