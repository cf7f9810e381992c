"""The checkpoint -> parameters loop: every parameter carries its own `weight_loader` (see layers.py).

Strict on purpose: a checkpoint tensor with no parameter, or a parameter (or fused shard) that the
checkpoint never filled, is an error naming the tensors. Half-loaded models would otherwise run on
uninitialised memory and produce plausible-looking garbage.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_MAX_LISTED = 8


def _listing(names: list[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _target(model: nn.Module, name: str) -> tuple[str, str | None]:
    """The parameter name (and fused shard id) that checkpoint tensor `name` loads into."""
    for ckpt_name, (fused_name, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{fused_name}."), shard_id
    return name, None


def _checkpoint_name(model: nn.Module, param_name: str, shard_id: str | None) -> str:
    """The inverse of `_target`: how the checkpoint would name this parameter (or fused shard)."""
    for ckpt_name, (fused_name, sid) in getattr(model, "packed_modules_mapping", {}).items():
        if sid == shard_id and f".{fused_name}." in param_name:
            return param_name.replace(f".{fused_name}.", f".{ckpt_name}.")
    return param_name


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint") -> None:
    params = dict(model.named_parameters())  # tied weights appear once
    expected = {name: set(getattr(p, "shard_ids", (None,))) for name, p in params.items()}
    loaded: dict[str, set] = {name: set() for name in params}
    ignored = model.ignored_checkpoint_tensors() if hasattr(model, "ignored_checkpoint_tensors") else ()
    unexpected = []
    with torch.no_grad():
        for name, tensor in weights:
            if name.endswith(ignored):
                continue
            target, shard_id = _target(model, name)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            if shard_id in loaded[target]:
                raise ValueError(f"{source}: tensor {name!r} appears twice")
            try:
                if shard_id is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"{source}: tensor {name!r}: {e}") from e
            loaded[target].add(shard_id)
    if unexpected:
        raise ValueError(
            f"{source}: tensors with no parameter in {type(model).__name__}: {_listing(unexpected)}"
        )
    missing = [_checkpoint_name(model, n, s) for n in params for s in sorted(expected[n] - loaded[n], key=str)]
    if missing:
        raise ValueError(f"{source}: parameters of {type(model).__name__} missing from the checkpoint: {_listing(missing)}")
