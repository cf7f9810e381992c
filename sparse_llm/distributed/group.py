"""The tensor-parallel group: which rank this process is, and the few collectives the sharded model needs.

A model is built sharded by constructing it inside `building(group)`: the parallel layers read the group
there once (like vLLM's parallel state, but scoped, so a later single-device model in the same process is
not sharded by accident). With size 1 every collective is a no-op and the layers are the plain ones.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (after row-parallel layers)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_last_dim_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's x along the last dim on rank 0 (vocab-parallel logits); None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def reduce_sum_to_first(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks into rank 0's x (other ranks' x is left unspecified)."""
        if self.size > 1:
            dist.reduce(x, dst=0)
        return x

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over ranks (e.g. KV blocks: every rank must hold the same block ids)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallelGroup(rank=0, size=1)
_BUILDING: contextvars.ContextVar[TensorParallelGroup] = contextvars.ContextVar("tp_building", default=SINGLE)


@contextlib.contextmanager
def building(group: TensorParallelGroup):
    """Models constructed inside this block are sharded for `group`."""
    token = _BUILDING.set(group)
    try:
        yield group
    finally:
        _BUILDING.reset(token)


def build_group() -> TensorParallelGroup:
    """The group of the model being constructed now (SINGLE outside `building`)."""
    return _BUILDING.get()
