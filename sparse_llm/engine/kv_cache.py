"""Sizing and allocating the paged caches of every layer from one memory budget.

Every backend declares its per-layer caches (`cache_spec`: the paged K/V plus any auxiliary cache);
a block id indexes all of them in every layer, so the budget is divided by the bytes one block costs
summed over all layers and all their caches.
"""
from __future__ import annotations

import numpy as np
import torch

from sparse_llm.backends.base import AttentionBackend, CacheSpec
from sparse_llm.engine.block_manager import cdiv

# CPU default when kv_cache_config.max_tokens is not set (also the documented LlmArgs default).
CPU_DEFAULT_MAX_TOKENS = 65536


def layer_cache_specs(backends: list[AttentionBackend], block_size: int, dtype: torch.dtype) -> list[list[CacheSpec]]:
    return [b.cache_spec(block_size, dtype) for b in backends]


def bytes_per_block(specs: list[list[CacheSpec]]) -> int:
    return sum(s.bytes_per_block() for layer in specs for s in layer)


def check_fits_one_sequence(num_blocks: int, block_size: int, max_model_len: int, block_bytes: int, how_to_grow: str) -> None:
    """A KV cache that cannot hold one max_model_len sequence would deadlock the scheduler: refuse it."""
    needed = cdiv(max_model_len, block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache is too small for one sequence: it holds {num_blocks * block_size} tokens "
            f"({num_blocks} blocks of {block_size}), but max_model_len={max_model_len} needs {needed} blocks = "
            f"{needed * block_size} tokens = {needed * block_bytes / 2**20:.1f} MiB "
            f"({block_bytes / block_size / 1024:.1f} KiB per token); {how_to_grow} or lower max_model_len"
        )


def cpu_num_blocks(max_tokens: int | None, block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """CPU: the size is kv_cache_config.max_tokens, else min(65536, what max_num_seqs full sequences could use)."""
    if max_tokens is None:
        max_tokens = min(CPU_DEFAULT_MAX_TOKENS, max_num_seqs * max_model_len)
    return max_tokens // block_size


def cuda_num_blocks(
    block_bytes: int, block_size: int, free_fraction: float, activation_peak_bytes: int, max_tokens: int | None, device
) -> int:
    """CUDA: (free memory now − the activation peak of a warm-up step) × free_gpu_memory_fraction, capped by max_tokens."""
    free, _ = torch.cuda.mem_get_info(device)
    budget = max(0, free - activation_peak_bytes) * free_fraction
    num_blocks = int(budget // block_bytes)
    if max_tokens is not None:
        num_blocks = min(num_blocks, max_tokens // block_size)
    return num_blocks


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zero-filled, so padded reads of never-written slots are finite (masked-out garbage could be NaN).

    On CPU the memory comes from calloc (through numpy): the OS hands out zero pages lazily, so a large
    default cache costs memory only as its blocks are used.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def allocate_caches(specs: list[list[CacheSpec]], num_blocks: int, device) -> list[dict[str, torch.Tensor]]:
    return [{s.name: zeros((num_blocks, *s.block_shape), s.dtype, device) for s in layer} for layer in specs]
