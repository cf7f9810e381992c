"""Launch parameters of the DSA decode kernels per shape class, and the top-k method switch.

TUNED_DSA_LAUNCH is the one table that would replace the kernels' built-in defaults in the Triton DSA backend:
the fastest variant per stage that benchmarks/dsa_tune.py measured on an H100 (session 3,
benchmarks/results/dsa_tune_h100.json, `best` per shape). It is on because dsa_tune's near-tie check passed on
the GPU at every shape (tuned vs default indexer: 8-336 top-k indices differ per shape, every one within the
band of a near-tie, none outside; the tuned attention equals the default attention on the tuned selection). Classes: rows (decode batch) 1-4 / 5-16 / more, longest row
<= 64K / more.
"""
from __future__ import annotations

import torch

from sparse_llm.kernels.dsa_topk import topk_positions
from sparse_llm.kernels.dsa_topk_sampled import topk_positions_sampled

USE_TUNED_DSA_LAUNCH = True

TOPK_METHODS = {"radix": topk_positions, "sampled": topk_positions_sampled}

_IX = dict(block_n=128, num_warps=4, num_stages=3, keys_as_m=True)
TUNED_DSA_LAUNCH: dict[tuple[str, str], dict] = {
    ("B1", "32K"): dict(indexer=dict(_IX, block_n=64, tiles=2, num_stages=2),
                        topk=dict(method="radix", chunk=2048, radix_bits=8),
                        attention=dict(block_h=16, block_n=32, num_warps=4, num_stages=3, num_splits=16)),
    ("B1", "128K"): dict(indexer=dict(_IX, tiles=2),
                         topk=dict(method="radix", chunk=2048, radix_bits=8),
                         attention=dict(block_h=16, block_n=32, num_warps=4, num_stages=3, num_splits=16)),
    ("B8", "32K"): dict(indexer=dict(_IX, tiles=4),
                        topk=dict(method="radix", chunk=2048, radix_bits=8),
                        attention=dict(block_h=64, block_n=64, num_warps=8, num_stages=3, num_splits=8)),
    ("B8", "128K"): dict(indexer=dict(_IX, tiles=8),
                         topk=dict(method="sampled", chunk=4096, num_warps=8, select_warps=16, sample=2048),
                         attention=dict(block_h=64, block_n=64, num_warps=8, num_stages=3, num_splits=8)),
    ("B32", "32K"): dict(indexer=dict(_IX, tiles=8),
                         topk=dict(method="sampled", chunk=4096, num_warps=8, select_warps=16, sample=2048),
                         attention=dict(block_h=64, block_n=64, num_warps=8, num_stages=3, num_splits=2)),
    ("B32", "128K"): dict(indexer=dict(_IX, tiles=8),
                          topk=dict(method="sampled", chunk=2048, num_warps=4, select_warps=16),
                          attention=dict(block_h=64, block_n=64, num_warps=8, num_stages=3, num_splits=2)),
}


def shape_class(rows: int, max_len: int) -> tuple[str, str]:
    """The TUNED_DSA_LAUNCH key of a decode chunk: rows scored together, and its longest row."""
    batch = "B1" if rows <= 4 else "B8" if rows <= 16 else "B32"
    return batch, "32K" if max_len <= 65536 else "128K"


# The table was measured at DeepSeek-V3.2's attention shape: 128 query heads over one 512 + 64 latent.
TUNED_NUM_HEADS = 128
TUNED_HEAD_DIM = 576


def dsa_launch(rows: int, max_len: int, device: torch.device, num_heads: int = TUNED_NUM_HEADS,
               head_dim: int = TUNED_HEAD_DIM) -> dict:
    """Launch parameters for the backend: {} (the kernels' defaults) unless the tuned table is switched on, this
    is a CUDA device (the table was measured on one; the interpreter keeps its small fixed tiles) and the layer
    has the shape it was measured at (other head counts keep the kernels' own defaults, e.g. tiny test models)."""
    if not USE_TUNED_DSA_LAUNCH or device.type != "cuda" or (num_heads, head_dim) != (TUNED_NUM_HEADS, TUNED_HEAD_DIM):
        return {}
    return TUNED_DSA_LAUNCH[shape_class(rows, max_len)]


def select_topk(logits: torch.Tensor, n_valid: torch.Tensor, k: int, method: str = "radix", **launch):
    """Top-k positions (and slots) by `method` ("radix": kernels/dsa_topk.py, "sampled":
    kernels/dsa_topk_sampled.py); both follow the same contract, so the choice is only a speed one."""
    if method not in TOPK_METHODS:
        raise ValueError(f"select_topk: method={method!r} is not allowed; allowed: {sorted(TOPK_METHODS)}")
    return TOPK_METHODS[method](logits, n_valid, k, **launch)
