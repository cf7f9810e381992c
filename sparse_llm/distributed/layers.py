"""Tensor-parallel versions of the model building blocks (models/layers.py), Megatron-style.

- ColumnParallelMergedLinear: fused projections (QKV, gate/up) cut along their output rows; rank r keeps the
  r-th 1/N of *every* shard, so it holds matching q/k/v heads (q heads of its own KV heads, since q head h
  uses KV head h // group_size) and matching gate/up slices. No communication.
- RowParallelLinear: input features cut; partial products summed with one all-reduce (o_proj, down_proj).
- VocabParallelEmbedding / ParallelLMHead: vocabulary rows cut into ceil(V / N) per rank (the last rank is
  zero-padded); lookups all-reduce, logits are gathered on rank 0 only (the only rank that samples).

Weights are sliced at load time from the full checkpoint tensors: each rank reads the whole checkpoint and
keeps its slice (copied, so the full tensor is freed). With a group of size 1 every class behaves exactly as
its base class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_llm.distributed.group import TensorParallelGroup
from sparse_llm.models.layers import Embedding, Linear, MergedLinear, default_weight_loader


def local_size(full: int, group: TensorParallelGroup, what: str) -> int:
    """full / N, refusing sizes that do not split into whole equal parts."""
    if full % group.size:
        raise ValueError(f"tensor_parallel_size={group.size} does not divide {what}={full}")
    return full // group.size


def _check_rows(loaded: torch.Tensor, expected: int, what: str) -> None:
    if loaded.shape[0] != expected:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the full {what} has {expected} rows")


class ColumnParallelMergedLinear(MergedLinear):
    """`full_shards` names each fused projection and its full number of output rows (as in MergedLinear)."""

    def __init__(self, in_features: int, full_shards: dict[str, int], bias: bool, group: TensorParallelGroup, what: str):
        self.group = group
        super().__init__(in_features, {k: local_size(v, group, f"{what} {k} rows") for k, v in full_shards.items()}, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.shard_offsets)}")
        start, rows = self.shard_offsets[shard_id]
        if self.group.size == 1:
            super().weight_loader(param, loaded, shard_id)
            return
        _check_rows(loaded, rows * self.group.size, f"{shard_id} projection")
        default_weight_loader(param.data.narrow(0, start, rows), loaded.narrow(0, self.group.rank * rows, rows))


class RowParallelLinear(Linear):
    """y = all_reduce(x_r W_r^T) + b: each rank holds the columns of W for its slice of the input features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup, what: str):
        self.group = group
        super().__init__(local_size(in_features, group, f"{what} input features"), out_features, bias)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        cols = self.in_features
        if self.group.size == 1:
            default_weight_loader(param, loaded)
            return
        if loaded.ndim != 2 or loaded.shape[1] != cols * self.group.size:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected [*, {cols * self.group.size}]")
        default_weight_loader(param, loaded.narrow(1, self.group.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(x)
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class _VocabShard:
    """Rows [start, end) of a vocabulary of `vocab_size`, padded to `rows` per rank."""

    def __init__(self, vocab_size: int, group: TensorParallelGroup):
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // group.size)
        self.start = min(vocab_size, group.rank * self.rows)
        self.end = min(vocab_size, self.start + self.rows)

    def load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_rows(loaded, self.vocab_size, "vocabulary")
        if self.rows == self.vocab_size:
            default_weight_loader(param, loaded)
            return
        if tuple(loaded.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected [*, {param.shape[1]}]")
        param.data.zero_()  # padding rows of the last rank: embeddings never read, logits cut off
        param.data[: self.end - self.start].copy_(loaded[self.start:self.end])


class VocabParallelEmbedding(Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, group: TensorParallelGroup):
        self.group = group
        self.shard = _VocabShard(num_embeddings, group)
        super().__init__(self.shard.rows, embedding_dim)
        self.weight.weight_loader = self.shard.load

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(input_ids)
        mine = (input_ids >= self.shard.start) & (input_ids < self.shard.end)
        out = F.embedding(torch.where(mine, input_ids - self.shard.start, 0), self.weight)
        return self.group.all_reduce(out.masked_fill(~mine.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """Logits over the full vocabulary on rank 0, None on the other ranks."""

    def __init__(self, hidden_size: int, vocab_size: int, group: TensorParallelGroup, tied: VocabParallelEmbedding | None):
        self.group = group
        self.shard = _VocabShard(vocab_size, group)
        super().__init__(hidden_size, self.shard.rows, weight=None if tied is None else tied.weight)
        if tied is None:
            self.weight.weight_loader = self.shard.load

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight)
        if self.group.size == 1:
            return logits
        full = self.group.gather_last_dim_to_first(logits)
        return None if full is None else full[..., : self.shard.vocab_size]
