"""Building blocks shared by the decoder models: linear layers that load their own weights, RMSNorm, SiLU-gating.

Parameters are allocated with `torch.empty` (no random init: every one is overwritten by the checkpoint, and
the loader refuses a checkpoint that leaves one unset). Each parameter carries a `weight_loader(param, tensor
[, shard_id])`, so the checkpoint loop stays a short generic loop (nano-vllm's pattern).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Fill a parameter of exactly the same shape from a checkpoint tensor (dtype/device converted).

    A whole parameter whose tensor already has the right dtype, device and layout takes over that storage
    instead of copying it: half the memory traffic (and page faults) of a load.
    """
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    if isinstance(param, nn.Parameter) and loaded.dtype == param.dtype and loaded.device == param.device and loaded.is_contiguous():
        param.data = loaded
    else:
        param.data.copy_(loaded)


def _parameter(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = default_weight_loader
    return param


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored as HF stores it: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, weight: nn.Parameter | None = None):
        """`weight` shares an existing [out, in] parameter (tied embeddings) instead of allocating one."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _parameter(out_features, in_features) if weight is None else weight
        self.bias = _parameter(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul (QKV, gate/up).

    The checkpoint stores them separately; `shards` names each one and its number of output rows, in the
    order they are stacked. `weight_loader(param, tensor, shard_id)` copies one of them into its rows.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shards.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for shard_id, rows in shards.items():
            self.shard_offsets[shard_id] = (start, rows)
            start += rows
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.weight_loader
                param.shard_ids = tuple(shards)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.shard_offsets)}")
        start, rows = self.shard_offsets[shard_id]
        default_weight_loader(param.data.narrow(0, start, rows), loaded)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The fused output cut back into its projections, in shard order."""
        return list(y.split([rows for _, rows in self.shard_offsets.values()], dim=-1))


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden]; also the LM head when embeddings are tied."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = _parameter(num_embeddings, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


# Fused Triton kernels (kernels/elementwise.py) for RMSNorm, residual add + RMSNorm, RoPE and SiLU·mul.
# None (default): on CUDA tensors only; the torch code below stays the CPU path and the kernels' reference.
# True/False force them on/off everywhere (tests run them on CPU under TRITON_INTERPRET=1).
FUSED_KERNELS: bool | None = None


def use_fused_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda if FUSED_KERNELS is None else FUSED_KERNELS


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, exactly as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _parameter(dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual` -> (norm(x + residual), x + residual).

        The second form folds the previous sublayer's residual add into this norm (one kernel on the fused
        path, which writes the results into x's and residual's own memory: both inputs are consumed).
        """
        if use_fused_kernels(x):
            from sparse_llm.kernels import elementwise

            if residual is None:
                return elementwise.rms_norm(x, self.weight, self.eps)
            return elementwise.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, for the fused [.., 2 * intermediate] gate/up output."""
    if use_fused_kernels(gate_up):
        from sparse_llm.kernels.elementwise import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
