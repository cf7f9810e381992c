"""The attention layer as models see it: a thin module that hands q/k/v to this layer's backend."""
from __future__ import annotations

import torch
from torch import nn

from sparse_llm.backends.base import AttentionBackend, LayerSpec
from sparse_llm.engine.context import get_context


class Attention(nn.Module):
    """Holds the layer's backend and its caches; both are attached by the model runner."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.backend: AttentionBackend | None = None
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, Dv]."""
        if self.backend is None:
            raise RuntimeError(f"{self.spec.module_name}: no attention backend attached")
        return self.backend.forward(q, k, v, self.cache, get_context())
