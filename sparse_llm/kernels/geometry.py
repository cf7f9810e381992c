"""Tile geometry shared by the Triton kernels and their torch references.

Skip-softmax decisions are made per KV tile, so the tile shape and the processing order are part of
the rule's meaning: a calibrated factor is only portable between implementations that cut the same
tiles. Every kernel and every reference reads its geometry from here (tests may pass smaller tiles
to both sides). Pure Python: importing this module does not import Triton.

Prefill: one program per (query tile of BLOCK_M rows, query head). The dense build visits KV tiles in
ascending key order. The skip-softmax build visits them "sink, diagonal, then the rest nearest first"
(PREFILL_ORDER, `prefill_tile_order`): tile 0 (the attention sink; the first processed tile, never
skipped), then the diagonal tiles (those the causal mask cuts), then the remaining fully visible tiles in
descending key order. The running max then holds the sink and the local attention before the middle
tiles are judged, so more of them fall below it at any λ (SmolLM2 at 2K, λ → 1: 0.62 of the tiles
skipped in ascending order, 0.715 in this one). Online softmax is exact in any order.

Decode: one program per (KV head, sequence, split of `split_tiles` tiles), tiles ascending, each split
with its own running max (flash-decoding), the rows being the group's query heads. With skip-softmax
on, every decode split seeds its running max with the row max of the sequence's first KV tile
("sink-seeded splits", kernels/decode.py), so only split 0's tile 0 is never skipped.
"""
from __future__ import annotations

import math

import torch

PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
# The skip build's prefill KV tile order, recorded in calibrated checkpoints (calibration/export.py) and
# checked when they are read (configs/checkpoint.py): factors fitted to another order mean other skips.
PREFILL_ORDER = "sink_diagonal_rest_descending"
# Relative widening of the key min/max box in the prefill bound pre-skip (kernels/prefill.py): it must exceed
# the rounding of the box to bf16 (2^-8) plus tf32 / fp32 accumulation error, so ub >= the kernel's score.
PREFILL_BOUND_WIDEN = 2.0 ** -6
DECODE_BLOCK_N = 64
SUPPORTED_HEAD_DIMS = (64, 128)
# SM count assumed where there is no GPU (CPU reference, Triton interpreter): an H100 / H200.
DEFAULT_NUM_SMS = 132
# Enough programs to keep every SM busy with a few resident programs each.
DECODE_PROGRAMS_PER_SM = 4
# A split shorter than this spends too much on its merge traffic.
DECODE_MIN_SPLIT_TILES = 4
# With skip-softmax every split also reads the sink tile to seed its running max: longer splits amortise it.
DECODE_MIN_SPLIT_TILES_SKIP = 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of `device`; DEFAULT_NUM_SMS on CPU so CPU and interpreter agree."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def decode_split_tiles(
    max_kv_len: int, num_seqs: int, num_kv_heads: int, sms: int, block_n: int = DECODE_BLOCK_N, skip: bool = False
) -> int:
    """KV tiles per decode split: enough splits that batch × kv_heads × splits fills the GPU.

    The decode skip decisions depend on this (each split keeps its own running max), so the Triton
    backend, the torch reference and calibration all call this with the same inputs; `skip` (the
    skip-softmax build) raises the minimum split length to DECODE_MIN_SPLIT_TILES_SKIP and never asks
    for more programs than one wave (rounds the split count down, not up): a partial second wave of
    its longer-lived programs costs more than a longer split (H100, 32K batch 16: 5 splits = 640
    programs 623.6 us, 4 = 512 programs 574.1 us at the same factor; the dense build is 728 us either
    way; benchmarks/results/skip_decode_split_sweep_s7_h100.json).
    """
    if max_kv_len < 1 or num_seqs < 1 or num_kv_heads < 1:
        raise ValueError(
            f"decode_split_tiles needs positive sizes, got max_kv_len={max_kv_len}, "
            f"num_seqs={num_seqs}, num_kv_heads={num_kv_heads}"
        )
    tiles = cdiv(max_kv_len, block_n)
    programs, heads = DECODE_PROGRAMS_PER_SM * sms, num_seqs * num_kv_heads
    want_splits = max(1, programs // heads if skip else cdiv(programs, heads))
    min_tiles = DECODE_MIN_SPLIT_TILES_SKIP if skip else DECODE_MIN_SPLIT_TILES
    return min(tiles, max(min_tiles, cdiv(tiles, want_splits)))


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernels; allowed: {SUPPORTED_HEAD_DIMS}")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def prefill_tile_order(first_pos: torch.Tensor, end_pos: torch.Tensor, block_n: int, n_cols: int) -> torch.Tensor:
    """KV tile indices in the skip build's processing order, [num_query_tiles, n_cols] (int64).

    first_pos / end_pos [num_query_tiles]: the position of a query tile's first row and one past its last
    valid row's. The tile visits n = cdiv(end_pos, block_n) KV tiles; m = (first_pos + 1) // block_n of them
    are visible to every row. Column t < n holds the t-th processed tile: 0, then the diagonal tiles m..n-1,
    then m-1 down to 1 (when m == 0, tile 0 is itself diagonal: 0..n-1). Columns t >= n hold t, so each row
    is a permutation of range(n_cols) (n_cols >= max n) and `t < n` marks the processed steps.
    """
    t = torch.arange(n_cols, device=first_pos.device)[None, :]
    m = ((first_pos + 1) // block_n)[:, None]
    n = ((end_pos + block_n - 1) // block_n)[:, None]
    if n.numel() and int(n.max()) > n_cols:
        raise ValueError(f"n_cols={n_cols} is fewer than the {int(n.max())} KV tiles a query tile visits")
    sink_diag_rest = torch.where(t == 0, 0, torch.where(t <= n - m, m + t - 1, n - t))
    return torch.where((t >= n) | (m == 0), t, sink_diag_rest)
